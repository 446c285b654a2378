"""U-Net: shapes, conditioning, parameter count, bad options."""

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from diffusion.unet import AttentionBlock, UNet, timestep_embedding
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


def test_output_is_zero_at_init():
    """The output convolution starts at zero (ADM), so an untrained net predicts exactly 0 (the mean target)."""
    net = UNet(in_channels=3, image_size=16, base_channels=8, channel_mult=(1, 2), norm_groups=4, num_classes=3)
    x = torch.randn(4, 3, 16, 16)
    out = net(x, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 3]))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))


def test_unet_base_attention_heads(tmp_path):
    """Every attention block has channels // attention_head_dim heads: unet_base, 256 channels at 16x16 and in
    the middle, head_dim 128."""
    cfg = compose_train(
        tmp_path / "run",
        ["model=unet_base", "data=folder", "data.path=x", "data.channels=3", "data.image_size=32"],
        tiny=False,
    )
    blocks = [m for m in instantiate(cfg.model).modules() if isinstance(m, AttentionBlock)]
    assert len(blocks) == 6  # 2 down and 3 up at 16x16, 1 in the middle
    for block in blocks:
        assert block.heads == block.qkv.in_channels // cfg.model.attention_head_dim
    assert {(block.qkv.in_channels, block.heads) for block in blocks} == {(256, 2)}


@pytest.mark.parametrize("head_dim, heads", [(4, 4), (16, 1)])
def test_attention_block_is_multi_head_attention(head_dim, heads):
    """The block is x + MultiheadAttention(GroupNorm(x)) over the H*W positions, with `heads` heads."""
    block = AttentionBlock(16, head_dim=head_dim, groups=4)
    assert block.heads == heads
    torch.nn.init.normal_(block.proj.weight, std=0.2)  # zero at init
    reference = nn.MultiheadAttention(16, heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(block.qkv.weight.view(48, 16))  # rows: q, k, v, each head by head
        reference.in_proj_bias.copy_(block.qkv.bias)
        reference.out_proj.weight.copy_(block.proj.weight.view(16, 16))
        reference.out_proj.bias.copy_(block.proj.bias)
    x = torch.randn(2, 16, 4, 4)
    seq = block.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    attended = reference(seq, seq, seq, need_weights=False)[0].transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), x + attended, atol=1e-5, rtol=1e-5)


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
