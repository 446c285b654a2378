"""Latent diffusion: the VAE codec against diffusers' formula, schedules read from pipeline folders against
diffusers' schedulers, scaled_linear betas, and the latent cache (round trip, key, through train.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.codec import IdentityCodec, VAECodec, build_codec
from diffusion.pipeline import schedule_from_pipeline
from diffusion.process.discrete import make_betas
from tests.conftest import run_train, write_image


def save_vae(folder, *, scaling_factor=0.5, shift_factor=0.1, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    vae.save_pretrained(str(folder))
    return vae.eval()


@pytest.mark.parametrize(
    "scheduler",
    [
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon"),
        dict(beta_schedule="linear", num_train_timesteps=500, prediction_type="v_prediction"),
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"),
    ],
)
def test_schedule_from_a_pipeline_folder_equals_diffusers(tmp_path, scheduler):
    from diffusers import DDPMScheduler

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    ours = schedule_from_pipeline(path=str(tmp_path))
    theirs = DDPMScheduler(**scheduler)
    assert ours.num_steps == theirs.config.num_train_timesteps
    assert ours.prediction == {"epsilon": "eps", "v_prediction": "v"}[scheduler["prediction_type"]]
    torch.testing.assert_close(ours.alpha_bar, theirs.alphas_cumprod.float(), rtol=1e-6, atol=1e-7)


def test_scaled_linear_betas():
    betas = make_betas("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    assert betas.dtype == torch.float64
    torch.testing.assert_close(betas[[0, -1]], torch.tensor([0.00085, 0.012], dtype=torch.float64))
    torch.testing.assert_close(betas.sqrt().diff(), torch.full((999,), (0.012**0.5 - 0.00085**0.5) / 999).double())


def test_vae_codec_follows_diffusers_formula_and_stays_out_of_state_dicts(tmp_path):
    vae = save_vae(tmp_path / "vae")
    codec = VAECodec(path=str(tmp_path / "vae"))
    assert codec.latent_shape(3, 16) == (4, 8) and codec.config == {
        "kind": "vae",
        "path": str(tmp_path / "vae"),
        "sample": True,
        "dtype": "fp32",
    }
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        torch.testing.assert_close(codec.encode(x, sample=False), (dist.mean - 0.1) * 0.5)
        torch.manual_seed(3)
        sampled = codec.encode(x)  # sample=True: mean + std * noise from torch's generator
        torch.manual_seed(3)
        torch.testing.assert_close(sampled, (dist.sample() - 0.1) * 0.5)
        # cached moments give the same latents as pixels
        torch.testing.assert_close(codec.encode(codec.moments(x), sample=False), codec.encode(x, sample=False))
        z = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(codec.decode(z), vae.decode(z / 0.5 + 0.1).sample.clamp(-1, 1))
    holder = torch.nn.Module()
    holder.codec, holder.lin = codec, torch.nn.Linear(2, 2)
    assert list(holder.state_dict()) == ["lin.weight", "lin.bias"]
    holder.load_state_dict(holder.state_dict())  # strict: the codec keeps its own weights
    with pytest.raises(FileNotFoundError, match=f"decodes through the VAE at {tmp_path / 'gone'}, which does not"):
        build_codec({"kind": "vae", "path": str(tmp_path / "gone")}, source="checkpoint c.ckpt")
    assert isinstance(build_codec(None), IdentityCodec)
    save_vae(tmp_path / "other", seed=1)
    other = VAECodec(path=str(tmp_path / "other"))
    assert other.fingerprint() != codec.fingerprint()


@pytest.mark.slow
def latent_overrides(images: Path, vae: Path) -> list[str]:
    """A latent run (codec=vae) on a folder of 16x16 images, their latents cached."""
    return [
        "data=folder",
        f"data.path={images}",
        "data.image_size=16",
        "data.batch_size=2",
        "data.cache=true",
        "data.num_workers=0",
        "data.val_fraction=0.34",
        "codec=vae",
        f"codec.path={vae}",
    ]


def test_a_truncated_latent_cache_is_named_and_rebuilt(tmp_path, caplog):
    from diffusion.data import ImageFolderDataModule

    save_vae(tmp_path / "vae")
    for i in range(4):
        write_image(tmp_path / "images" / f"{i}.png", (16, 16), seed=i)
    kw = dict(path=str(tmp_path / "images"), image_size=16, cache=True, num_workers=0, flip=True, val_fraction=0.0)
    first = ImageFolderDataModule(**kw, codec=VAECodec(path=str(tmp_path / "vae")))
    first.setup()
    latents = first.latent_file
    good = latents.read_bytes()
    latents.write_bytes(good[:-100])  # an interrupted copy
    caplog.set_level("INFO")
    again = ImageFolderDataModule(**kw, codec=VAECodec(path=str(tmp_path / "vae")))
    again.setup()
    assert f"the cache {latents} is damaged" in caplog.text and "rebuilding" in caplog.text
    assert again.latent_file == latents and latents.read_bytes() == good


def test_latent_cache_round_trip_key_and_training(tmp_path):
    from diffusion.data import ImageFolderDataModule

    save_vae(tmp_path / "vae")
    save_vae(tmp_path / "vae2", seed=1)
    root = tmp_path / "images"
    for i in range(6):
        write_image(root / f"{i}.png", (16, 16), seed=i)
    codec = VAECodec(path=str(tmp_path / "vae"))
    dm = ImageFolderDataModule(
        path=str(root),
        image_size=16,
        batch_size=2,
        val_fraction=0.34,
        cache=True,
        codec=codec,
        num_workers=0,
        flip=True,
    )
    dm.prepare_data()
    dm.setup()
    # 1. round trip: the cached moments are the codec's moments of the cached pixels (and of their mirror image)
    pixels = torch.from_numpy(np.load(dm.cache_file)).float() * (2 / 255) - 1
    moments = torch.from_numpy(np.load(dm.latent_file))
    assert moments.shape == (12, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(moments[:6], codec.moments(pixels), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moments[6:], codec.moments(pixels.flip(-1)), rtol=1e-5, atol=1e-5)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 8, 8, 8) and x.dtype == torch.float32
    assert dm.val_pixels is not None and len(dm.val_pixels) == len(dm.val_set)
    # 2. the key: the same codec reuses the cache, another VAE builds its own and the stale one goes
    again = ImageFolderDataModule(path=str(root), image_size=16, cache=True, codec=codec, num_workers=0, flip=True)
    again.setup()
    assert again.latent_file == dm.latent_file
    other = ImageFolderDataModule(
        path=str(root), image_size=16, cache=True, num_workers=0, flip=True, codec=VAECodec(path=str(tmp_path / "vae2"))
    )
    other.setup()
    assert other.latent_file != dm.latent_file and not dm.latent_file.exists()
    # 3. through train.py: our U-Net on cached latents (4 channels, 8x8), grids decoded to pixels
    run = tmp_path / "run"
    run_train(
        run,
        [
            *latent_overrides(root, tmp_path / "vae"),
            "trainer.val_check_interval=2",
            "+trainer.limit_val_batches=1",
            "logger=none",
        ],
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["diffusion"]["net"]["config"]["in_channels"] == 4
    assert ckpt["diffusion"]["net"]["config"]["image_size"] == 8
    assert ckpt["diffusion"]["codec"]["path"] == str(tmp_path / "vae")
    assert not any(".codec." in k or k.startswith("codec.") for k in ckpt["state_dict"])
    from PIL import Image

    with Image.open(sorted((run / "samples").glob("*.png"))[-1]) as grid:
        assert grid.size == (2 * 66 + 2, 2 * 66 + 2)  # 2x2 grid of 16x16 decoded pixels drawn 4x, 2-pixel padding
