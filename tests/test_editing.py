"""Image-to-image (SDEdit) and inpainting (RePaint) through `DiffusionModel.generate`, for every sampler and process
family: strength 0 is the input, strength 1 is plain generation, a pixel model's kept region is the input exactly,
the latent path (a tiny VAE) keeps its known latents, and bad arguments are one-line errors."""

import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.errors import ConfigError
from diffusion.model import DiffusionModel
from diffusion.process import EDM, Flow
from diffusion.process.discrete import NoiseSchedule
from diffusion.samplers import (
    Edit,
    ddim_sample,
    ddpm_sample,
    dpmpp_sample,
    euler_sample,
    heun_sample,
    unipc_sample,
)
from tests.conftest import tiny_unet

SAMPLERS = {
    "ddpm": partial(ddpm_sample, steps=5),
    "ddim_eta1": partial(ddim_sample, steps=5, eta=1.0),  # stochastic: fresh noise from each image's stream
    "dpmpp": partial(dpmpp_sample, steps=5),
    "euler": partial(euler_sample, steps=5),
    "heun": partial(heun_sample, steps=4),
    "unipc": partial(unipc_sample, steps=5),  # multistep with a corrector: the kept region after both
}
PROCESSES = {"discrete": lambda: NoiseSchedule(num_steps=50), "edm": EDM, "flow": Flow}
SEEDS = [3, 4, 5]


def pixel_model(process: str) -> DiffusionModel:
    torch.manual_seed(0)
    return DiffusionModel(net=tiny_unet(), process=PROCESSES[process]()).eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    """(n, 1, 8, 8) pixels on the 8-bit grid in [-1, 1] (as sample.py reads files)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g).float() / 127.5 - 1


def half_mask(n: int = 3) -> torch.Tensor:
    mask = torch.zeros(n, 1, 8, 8)
    mask[..., :, 4:] = 1  # repaint the right half
    return mask


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_strength_bounds_and_kept_region(process, sampler):
    model, init, mask = pixel_model(process), images(), half_mask()
    run = partial(model.generate, seeds=SEEDS, sampler=SAMPLERS[sampler])
    assert torch.equal(run(init=init, strength=0.0), init)  # no step run: the input itself
    plain = run()
    assert torch.equal(run(init=init, strength=1.0), plain)  # the whole grid from pure noise
    edited = run(init=init, strength=0.6)
    assert not torch.equal(edited, init) and not torch.equal(edited, plain)
    painted = run(init=init, strength=1.0, mask=mask)
    assert torch.equal(painted[..., :4], init[..., :4])  # kept exactly
    assert not torch.equal(painted[..., 4:], init[..., 4:])  # generated
    # batching does not change an edit: each image has its own noise stream
    assert torch.equal(run(init=init, strength=0.6, batch_size=2), edited)


def test_strength_runs_the_last_share_of_the_grid():
    model, init = pixel_model("discrete"), images(1)
    levels = []

    def spy(x, t):
        levels.append(int(t[0]))
        return torch.zeros_like(x)

    for strength, expect in ((1.0, 10), (0.5, 5), (0.04, 0), (0.3, 3)):
        levels.clear()
        ddim_sample(spy, model.process, torch.randn(1, 1, 8, 8), steps=10, edit=Edit(known=init, strength=strength))
        assert len(levels) == expect
    assert levels == [14, 9, 4]  # the last 3 of trailing 49, 44, ..., 4


def test_inpainting_keeps_a_latent_models_known_latents(tmp_path):
    """The latent path: the mask max-pooled to the latent size, the known latents kept exactly at the end."""
    from diffusion.codec import VAECodec
    from tests.test_latent import save_vae

    save_vae(tmp_path / "vae")
    codec = VAECodec(path=str(tmp_path / "vae"))
    torch.manual_seed(0)
    net = tiny_unet(in_channels=4, image_size=4)
    model = DiffusionModel(net=net, process=NoiseSchedule(num_steps=50), codec=codec).eval()
    init = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 5, 1] = 1  # one pixel: its 2x2 patch's latent is repainted
    edit = model._edit(init, mask, 0, 2, 1.0, model.spec.sample_shape)
    assert edit.mask.shape == (2, 1, 4, 4) and edit.mask.sum() == 2 and edit.mask[0, 0, 2, 0] == 1
    noise = torch.randn(2, 4, 4, 4)
    z = ddim_sample(lambda x, t: torch.randn_like(x), model.process, noise, steps=4, clip_x0=False, edit=edit)
    kept = edit.mask.expand_as(z) == 0
    assert torch.equal(z[kept], edit.known[kept]) and not torch.equal(z[~kept], edit.known[~kept])
    sample = partial(model.generate, seeds=[0, 1], sampler=partial(dpmpp_sample, steps=3))
    roundtrip = codec.decode(codec.encode(init, sample=False))
    torch.testing.assert_close(sample(init=init, strength=0.0), roundtrip)  # the codec's round trip
    out = sample(init=init, mask=mask)
    assert out.shape == init.shape and torch.isfinite(out).all()


def test_bad_edit_arguments_are_one_line_errors():
    model, init = pixel_model("discrete"), images()
    run = partial(model.generate, seeds=SEEDS, sampler=SAMPLERS["ddim_eta1"])
    with pytest.raises(ConfigError, match=r"strength=1.5 must be in \[0, 1\]"):
        run(init=init, strength=1.5)
    with pytest.raises(ConfigError, match="strength=0.5 needs init="):
        run(strength=0.5)
    with pytest.raises(ConfigError, match="mask= needs init="):
        run(mask=half_mask())
    with pytest.raises(ConfigError, match="must be \\(N, C, H, W\\) with N = 3"):
        run(init=init[:2])
    with pytest.raises(ConfigError, match="mask of shape"):
        run(init=init, mask=half_mask()[:, :, :4])
    with pytest.raises(ConfigError, match="only 0 \\(keep\\) and 1"):
        run(init=init, mask=half_mask() * 0.5)
    with pytest.raises(ConfigError, match="init images of shape"):
        run(init=torch.zeros(3, 3, 8, 8))

    def custom(model, process, noise, *, generator=None, progress=False):
        return noise

    with pytest.raises(ConfigError, match="takes no edit="):
        model.generate(seeds=SEEDS, sampler=custom, init=init)


# --- end to end: sample.py on checkpoints written by tiny train.py runs -------------------------------------------
NO_GRIDS = ["callbacks.sample_grid.every_n_steps=0", "trainer.max_steps=2"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """Tiny checkpoints: unconditional and class pixel models, a text model, a latent model (a tiny VAE)."""
    from tests.conftest import run_train, write_image
    from tests.test_conditioning import TEXT
    from tests.test_latent import latent_overrides, save_vae

    root = tmp_path_factory.mktemp("ckpts")
    runs = {
        "uncond": NO_GRIDS,
        "class": [*NO_GRIDS, "model.num_classes=10"],
        "text": [*TEXT, *NO_GRIDS],
    }
    for i in range(6):
        write_image(root / "images" / f"{i}.png", (16, 16), "RGB", seed=i)
    save_vae(root / "vae")
    runs["latent"] = [*latent_overrides(root / "images", root / "vae"), *NO_GRIDS, "logger=none"]
    for name, overrides in runs.items():
        run_train(root / name, overrides)
    return {name: root / name / "checkpoints" / "last.ckpt" for name in runs}


def _png(path, arr) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_sample_py_edits_every_kind_of_model(tmp_path, ckpts):
    from tests.test_sample_cli import read_images, sample_in_process

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    for k, img in enumerate(gray):
        _png(tmp_path / "init" / f"{k}.png", img)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255  # white = repaint the right half
    _png(tmp_path / "mask.png", mask)
    common = ["sampler=ddim", "sampler.steps=3", "sampler.eta=1.0", "n=4", f"init={tmp_path / 'init'}"]

    # a pixel model: strength 0 is the input exactly (column j edits image j mod 2), the kept region is exact
    sample_in_process(tmp_path / "s0", f"ckpt={ckpts['uncond']}", *common, "strength=0")
    assert np.array_equal(read_images(tmp_path / "s0"), gray[[0, 1, 0, 1]])
    sample_in_process(tmp_path / "in", f"ckpt={ckpts['uncond']}", *common, f"mask={tmp_path / 'mask.png'}")
    painted = read_images(tmp_path / "in")
    assert np.array_equal(painted[..., :8], gray[[0, 1, 0, 1], :, :8])
    assert not np.array_equal(painted[..., 8:], gray[[0, 1, 0, 1], :, 8:])
    # strength 1 without a mask is plain generation with the same seeds
    sample_in_process(tmp_path / "s1", f"ckpt={ckpts['uncond']}", *common, "strength=1")
    sample_in_process(tmp_path / "plain", f"ckpt={ckpts['uncond']}", *common[:-1])
    assert np.array_equal(read_images(tmp_path / "s1"), read_images(tmp_path / "plain"))

    # class and text models: the condition plus the kept region
    sample_in_process(tmp_path / "cl", f"ckpt={ckpts['class']}", *common, "label=[3,7]", "guidance=2",
                      f"mask={tmp_path / 'mask.png'}", "strength=0.7")  # fmt: skip
    assert np.array_equal(read_images(tmp_path / "cl")[..., :8], gray[[0, 1, 0, 1] * 2, :, :8])
    sample_in_process(tmp_path / "tx", f"ckpt={ckpts['text']}", *common, 'prompt="a 7"', "guidance=2",
                      f"mask={tmp_path / 'mask.png'}")  # fmt: skip
    assert np.array_equal(read_images(tmp_path / "tx")[..., :8], gray[[0, 1, 0, 1], :, :8])

    # a latent model (RGB through a tiny VAE): strength 0 is the codec's round trip, the mask in latent space
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _png(tmp_path / "rgb.png", rgb)
    latent = [f"ckpt={ckpts['latent']}", *common[:-1], f"init={tmp_path / 'rgb.png'}"]
    sample_in_process(tmp_path / "l0", *latent, "strength=0")
    from diffusion.generation import read_images as read_init
    from diffusion.generation import to_uint8
    from diffusion.model import DiffusionModel

    model = DiffusionModel.from_checkpoint(ckpts["latent"])
    init = read_init(tmp_path / "rgb.png", channels=3, size=16)
    roundtrip = to_uint8(model.codec.decode(model.codec.encode(init, sample=False)))[0]
    assert np.abs(read_images(tmp_path / "l0")[0].astype(int) - roundtrip.astype(int)).max() <= 1
    sample_in_process(tmp_path / "lm", *latent, f"mask={tmp_path / 'mask.png'}")
    assert read_images(tmp_path / "lm").shape == (4, 16, 16, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["init=/nonexistent/x.png"], "init=/nonexistent/x.png does not exist"),
        (["init={tmp}/bad.png"], "init={tmp}/bad.png is not an image Pillow can read"),
        (["init={tmp}/empty"], "init={tmp}/empty holds no images"),
        (["mask={tmp}/ok.png"], "mask= needs init="),
        (["strength=0.5"], "strength=0.5 needs init="),
        (["init={tmp}/ok.png", "strength=2"], r"strength=2.0 must be in \[0, 1\]"),
        (["init={tmp}/ok.png", "mask={tmp}/bad.png"], "mask={tmp}/bad.png is not an image"),
        (["init={tmp}/ok.png", "mask={tmp}/two"], "mask= gives 2 masks for 1 init images"),
    ],
)
def test_sample_py_bad_edit_input_is_one_clear_error(tmp_path, ckpts, overrides, message):
    from diffusion.errors import user_error_message
    from tests.test_sample_cli import sample_in_process

    _png(tmp_path / "ok.png", np.zeros((16, 16), np.uint8))
    _png(tmp_path / "two" / "a.png", np.zeros((16, 16), np.uint8))
    _png(tmp_path / "two" / "b.png", np.zeros((16, 16), np.uint8))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    with pytest.raises(Exception) as info:
        sample_in_process(tmp_path / "out", f"ckpt={ckpts['uncond']}", "sampler.steps=2", "n=1", *overrides)
    line = user_error_message(info.value)
    assert line is not None and "\n" not in line, info.value
    assert re.search(message.format(tmp=tmp_path), line), line


def test_sample_py_cli_edit_error_is_one_line(tmp_path, ckpts):
    from tests.conftest import run_cli

    result = run_cli("sample.py", f"ckpt={ckpts['uncond']}", f"init={tmp_path}/none.png", f"out={tmp_path}/o")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: init={tmp_path}/none.png does not exist (an image file or a folder of images)"], lines
