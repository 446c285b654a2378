"""SampleGrid: fixed seeds give the same grid, batch/rank splits do not change samples, EMA weights are used."""

import functools
from types import SimpleNamespace

import torch
from PIL import Image

from diffusion.callbacks.ema import EMA
from diffusion.callbacks.sample_grid import SampleGrid, generate
from diffusion.model import DiffusionModel
from diffusion.process.discrete import NoiseSchedule
from diffusion.samplers import ddim_sample
from diffusion.unet import UNet

SAMPLER = functools.partial(ddim_sample, steps=3)


def _module(seed: int = 0, num_classes: int | None = None):
    torch.manual_seed(seed)
    net = UNet(
        in_channels=1,
        image_size=8,
        base_channels=8,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[],
        norm_groups=4,
        num_classes=num_classes,
    )
    with torch.no_grad():  # an untrained U-Net outputs zeros (zero-initialised last layer): give it some weights
        for p in net.parameters():
            p.normal_(0, 0.05)
    return SimpleNamespace(
        model=DiffusionModel(net=net, process=NoiseSchedule(num_steps=20)), device=torch.device("cpu")
    )


def test_same_seed_same_grid_other_seed_other_grid(tmp_path):
    module = _module()
    grid = SampleGrid(dirpath=str(tmp_path), sampler=SAMPLER, num_images=4, seed=5)
    a, b = grid.sample(module), grid.sample(module)
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b)
    assert not torch.allclose(
        a, SampleGrid(dirpath=str(tmp_path), sampler=SAMPLER, num_images=4, seed=6).sample(module)
    )
    assert module.model.net.training  # eval only while sampling


def test_samples_do_not_depend_on_batching():
    module = _module(num_classes=3)
    whole = generate(module.model, SAMPLER, range(6), seed=1, batch_size=6)
    split = generate(module.model, SAMPLER, range(6), seed=1, batch_size=4)
    torch.testing.assert_close(whole, split)
    torch.testing.assert_close(generate(module.model, SAMPLER, [3, 4], seed=1), whole[3:5])  # a rank's share


def test_grid_uses_ema_weights_and_writes_png(tmp_path):
    module, ema_module = _module(seed=0), _module(seed=1)
    ema = EMA(decay=0.5)
    ema.update(ema_module.model.net, global_step=1)  # the average = the other net's weights
    trainer = SimpleNamespace(callbacks=[ema], global_step=1, loggers=[])
    grid = SampleGrid(dirpath=str(tmp_path), sampler=SAMPLER, num_images=4, nrow=2)
    with_ema = grid.sample(module, trainer)
    assert grid.last_used_ema
    torch.testing.assert_close(with_ema, grid.sample(ema_module))
    raw = SampleGrid(dirpath=str(tmp_path), sampler=SAMPLER, num_images=4, use_ema=False).sample(module, trainer)
    torch.testing.assert_close(raw, grid.sample(module))
    assert not torch.allclose(raw, with_ema)
    path = grid.save(trainer, module)
    assert path.name == "step_000001.png"
    with Image.open(path) as img:
        assert img.size == (2 * 66 + 2, 2 * 66 + 2)  # 8x8 images enlarged 8x to 64 px, 2-pixel padding


class _LabelNet(torch.nn.Module):
    """Outputs its class label / 10 everywhere, so a sample shows which class it was drawn for."""

    num_classes = 3
    config = {"in_channels": 1, "image_size": 2}
    in_channels, image_size = 1, 2  # the network interface's declarations (diffusion/networks.py)

    def forward(self, x, t, y=None):
        return (y.float() / 10).view(-1, 1, 1, 1).expand_as(x)


def test_conditional_grid_has_one_row_per_class(tmp_path):
    def show_model(model, schedule, noise, generator=None):
        return model(noise, torch.zeros(len(noise), dtype=torch.long))

    model = DiffusionModel(net=_LabelNet(), process=NoiseSchedule(num_steps=20))
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    trainer = SimpleNamespace(callbacks=[], global_step=3, loggers=[])
    path = SampleGrid(dirpath=str(tmp_path), sampler=show_model, num_images=7, nrow=7).save(trainer, module)
    with Image.open(path) as img:
        # 3 rows (classes) of 7 // 3 = 2 samples, 2x2 images enlarged 32x to 64 px, 2-pixel padding
        assert img.size == (2 * 66 + 2, 3 * 66 + 2)
        pixels = torch.tensor(list(img.getdata()), dtype=torch.float32).view(img.size[1], img.size[0], -1)[..., 0]
    for k in range(3):
        row = pixels[2 + 66 * k : 66 + 66 * k, 2:66]  # first sample of row k
        expected = round(255 * (k / 10 + 1) / 2)  # to_unit_range(k / 10)
        assert (row - expected).abs().max() <= 1, (k, row)
