"""End to end through the real config tree: train, checkpoint, sample grid, resume; and bad input."""

from pathlib import Path

import pytest
import torch

from diffusion.checkpoint import NET_PREFIX, read_checkpoint
from diffusion.model import DiffusionModel
from tests.conftest import ROOT, compose_train, run_cli, run_train, write_image


def test_train_writes_checkpoint_grid_and_config(tmp_path):
    run = tmp_path / "run"
    cfg, metric = run_train(run, ["logger=csv"])
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and "step_000004.ckpt" in ckpts
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["step_000002.png", "step_000004.png"]
    from PIL import Image

    with Image.open(run / "samples" / "step_000004.png") as img:
        # 2x2 grid of 16x16 images
        assert img.size == (2 * 66 + 2, 2 * 66 + 2)  # 16 px drawn 4x, 2-pixel padding
    assert metric is not None and metric > 0  # val/loss, returned for sweepers
    metrics = (run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss_t0-4" in metrics

    # The checkpoint describes itself: network and schedule rebuild from the file alone.
    loaded = DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert loaded.global_step == 4 and loaded.process.num_steps == 50
    assert loaded.net.config["base_channels"] == cfg.model.base_channels
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert loaded.weights == "ema"  # callbacks.ema is on by default; the raw weights are still in state_dict
    raw = DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt", use_ema=False)
    for k, v in raw.net.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][NET_PREFIX + k])


def test_resume_continues_the_global_step(tmp_path):
    first = tmp_path / "first"
    run_train(first, ["callbacks.sample_grid.every_n_steps=0"])
    second = tmp_path / "second"
    run_train(second, [f"ckpt_path={first}", "trainer.max_steps=8", "callbacks.sample_grid.every_n_steps=0"])
    assert read_checkpoint(second / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert (second / "checkpoints" / "step_000006.ckpt").exists()
    assert not (second / "checkpoints" / "step_000002.ckpt").exists()
    # "last" finds the newest last.ckpt under the runs folder (here: the second run's)
    third = tmp_path / "third"
    run_train(third, ["ckpt_path=last", "trainer.max_steps=10", "callbacks.sample_grid.every_n_steps=0"])
    assert read_checkpoint(third / "checkpoints" / "last.ckpt")["global_step"] == 10


def test_model_follows_data_config(tmp_path, image_folder):
    cfg = compose_train(
        tmp_path / "run",
        ["data=folder", f"data.path={image_folder}", "data.image_size=24", "data.channels=3", "model=unet_small"],
    )
    assert cfg.model.in_channels == 3 and cfg.model.image_size == 24


def test_folder_run_end_to_end(tmp_path, image_folder):
    run = tmp_path / "run"
    run_train(
        run,
        [
            "data=folder",
            f"data.path={image_folder}",
            "data.image_size=16",
            "data.batch_size=4",
            "data.num_workers=0",
            "trainer.max_steps=2",
        ],
    )
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "samples" / "step_000002.png").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data=folder", "data.path={tmp}/missing"], "missing does not exist"),
        (["data=folder", "data.path={tmp}/empty"], "holds no images"),
        (["data=folder", "data.path={tmp}/corrupt"], "broken.jpg"),
        (["data=folder", "data.path={tmp}/small"], "smaller than data.image_size=16"),
        (["ckpt_path={tmp}/nope.ckpt"], "nope.ckpt does not exist"),
        (["ckpt_path={tmp}/not_a_ckpt.ckpt"], "not_a_ckpt.ckpt is not a readable checkpoint"),
        (["process=cosine", "process.kind=quadratic"], "process.kind='quadratic' is not one of"),
        (["model.norm_groups=3"], "model.norm_groups=3 does not divide"),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, overrides, message):
    (tmp_path / "empty").mkdir()
    write_image(tmp_path / "corrupt" / "ok.png", (20, 20))
    (tmp_path / "corrupt" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    write_image(tmp_path / "small" / "a.png", (8, 8))
    (tmp_path / "not_a_ckpt.ckpt").write_text("hello")
    run = tmp_path / "run"
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    result = run_cli(
        "train.py",
        *overrides,
        "trainer.max_steps=1",
        "model=unet_tiny",
        "trainer=cpu",
        "data.image_size=16",
        f"hydra.run.dir={run}",
        timeout=180,
    )
    assert result.returncode != 0
    err_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and message in err_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (run / "checkpoints").exists()


def test_unknown_option_is_named(tmp_path):
    result = run_cli("train.py", "trainer.max_stepz=3", f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert result.returncode != 0
    assert "max_stepz" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("train.py", "model=unet_huge", f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert result.returncode != 0 and "unet_huge" in result.stderr


def test_failed_run_never_overwrites_existing_checkpoints(tmp_path):
    run = tmp_path / "run"
    run_train(run, ["callbacks.sample_grid.every_n_steps=0"])
    before = {p: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")}
    # A second run into the same folder without ckpt_path refuses to start.
    result = run_cli("train.py", "model=unet_tiny", "trainer=cpu", "trainer.max_steps=2", f"hydra.run.dir={run}")
    assert result.returncode != 0 and "already holds checkpoints" in result.stderr
    assert {p: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")} == before


def test_cli_train_runs(tmp_path):
    """`python train.py` as a user runs it, with tiny overrides."""
    run = tmp_path / "run"
    result = run_cli(
        "train.py",
        "model=unet_tiny",
        "trainer=cpu",
        "trainer.max_steps=3",
        "process=cosine",
        "process.num_steps=20",
        "sampler.steps=3",
        "callbacks.sample_grid.num_images=4",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "samples" / "step_000003.png").exists()
    assert (run / ".hydra" / "config.yaml").exists()
    assert f"run folder: {run}" in result.stdout
    assert Path(ROOT / "train.py").exists()
