"""U-Net: shapes, conditioning, parameter count, bad options."""

import pytest
import torch
from hydra.utils import instantiate

from diffusion.unet import UNet, timestep_embedding
from tests.conftest import compose_train


def _randomize_output(net: UNet) -> UNet:
    # The output conv and residual branches start at zero (ADM); perturb them so inputs reach the output.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()  # eval: no dropout


@pytest.mark.parametrize(
    "channels, size, kwargs",
    [
        (1, 16, dict(base_channels=8, channel_mult=(1, 2), norm_groups=4, attention_resolutions=(8,))),
        (3, 32, dict(base_channels=16, channel_mult=(1, 2, 2), norm_groups=8, attention_resolutions=(16, 8))),
        (4, 8, dict(base_channels=8, channel_mult=(1,), norm_groups=8, num_res_blocks=3, scale_shift_norm=True)),
        (3, 24, dict(base_channels=8, channel_mult=(1, 2, 2, 2), norm_groups=8, attention_resolutions=())),
    ],
)
def test_output_shape_equals_input_shape(channels, size, kwargs):
    net = UNet(in_channels=channels, image_size=size, **kwargs)
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_timestep_changes_output():
    net = _randomize_output(UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), norm_groups=4))
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([10])), net(x, torch.tensor([500])))


def test_label_changes_output_and_null_label_is_default():
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), norm_groups=4, num_classes=3)
    net = _randomize_output(net)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([100])
    assert not torch.allclose(net(x, t, torch.tensor([0])), net(x, t, torch.tensor([1])))
    torch.testing.assert_close(net(x, t, None), net(x, t, torch.tensor([3])))  # 3 = null class


def test_labels_on_unconditional_model_is_an_error():
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1,), norm_groups=4)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([0]))


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert emb[1, 0].item() == pytest.approx(torch.cos(torch.tensor(3.0)).item(), abs=1e-6)


def test_unet_base_has_ddpm_parameter_count(tmp_path):
    cfg = compose_train(
        tmp_path / "run",
        ["model=unet_base", "data=folder", "data.path=x", "data.channels=3", "data.image_size=32"],
        tiny=False,
    )
    net = instantiate(cfg.model)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.02, n


def test_gradient_checkpointing_gives_same_gradients():
    kwargs = dict(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), norm_groups=4, dropout=0.0)
    a = _randomize_output(UNet(**kwargs)).train()
    b = UNet(**kwargs, gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    a(x, t).square().mean().backward()
    b(x, t).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=10, channel_mult=(1, 2, 2)), "image_size"),
        (dict(norm_groups=5), "norm_groups"),
        (dict(num_classes=0), "num_classes"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    base = dict(in_channels=1, image_size=16, base_channels=8, channel_mult=(1, 2), norm_groups=4)
    with pytest.raises(ValueError, match=match):
        UNet(**{**base, **kwargs})
