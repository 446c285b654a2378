"""Shared fixtures: compose the real conf/ tree with tiny overrides, and fabricate small image folders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A run that takes seconds: tiny U-Net, CPU, a handful of steps, everything inside tmp_path.
TINY = [
    "model=unet_tiny",
    "trainer=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=16",
    "sampler=ddim",
    "sampler.steps=4",
    "callbacks.sample_grid.num_images=4",
    "callbacks.sample_grid.nrow=2",
    "callbacks.sample_grid.every_n_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "process=cosine",  # the discrete family (the default is flow): its 50 steps keep tiny runs cheap
    "process.num_steps=50",
]

# One intra-op thread: the test models are tiny, where threads cost more than they give, and several test
# processes (DDP ranks, subprocess CLIs) share the cores; oversubscribed threads slow them down many-fold.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def compose_train(run_dir: Path, overrides: Sequence[str] = (), tiny: bool = True) -> DictConfig:
    """The real train config, composed as `python train.py <overrides>` would, writing into run_dir."""
    run_dir = Path(run_dir)
    paths = [
        f"paths.root_dir={run_dir.parent}",
        f"paths.runs_dir={run_dir.parent}",
        f"paths.output_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*(TINY if tiny else []), *overrides, *paths], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def run_train(run_dir: Path, overrides: Sequence[str] = (), tiny: bool = True):
    """train.train on the composed config; returns (cfg, optimized metric)."""
    import train

    cfg = compose_train(run_dir, overrides, tiny)
    return cfg, train.train(cfg)


def run_cli(script: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from the repo root as a user would; output captured as text."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0, fmt: str | None = None) -> Path:
    """A random image of (width, height) in `mode`, saved in the format its suffix names."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A small tree of mixed formats and modes in two class subfolders."""
    root = tmp_path / "images"
    for i in range(6):
        write_image(root / "cats" / f"c{i}.png", (40, 36), "RGB", seed=i)
        write_image(root / "dogs" / "nested" / f"d{i}.jpg", (36, 48), "L", seed=10 + i)
    write_image(root / "dogs" / "d_extra.bmp", (32, 32), "RGB", seed=99)
    return root


def tiny_unet(**overrides):
    """A U-Net of 8x8 one-channel images with one attention level, small enough for unit tests."""
    from diffusion.unet import UNet

    config = dict(
        in_channels=1,
        image_size=8,
        base_channels=8,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        attention_head_dim=8,
        norm_groups=4,
    )
    return UNet(**{**config, **overrides})
