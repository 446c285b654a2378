"""Checkpoints written before the model object (format 1, by main at f09aeb7) still resume, sample, validate and
export, with the same numbers as then.

tests/fixtures/ holds two such checkpoints, made with that commit's train.py (3 steps on the built-in digits, tiny
U-Net, EMA on): a class-conditional one (`experiment=digits_cond`) and a text-conditional one (`experiment=digits_text`,
its jointly trained encoder and tokenizer in the state dict). Next to them: what that commit's sample.py drew from them
(`*_samples.npz`) and the parameter sums its train.py reached when resuming each to step 4 (`f09aeb7_resumed.json`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.checkpoint import FORMAT, NET_PREFIX, read_checkpoint
from diffusion.export import export
from diffusion.model import DiffusionModel
from tests.conftest import ROOT, compose_train
from tests.test_sample_cli import sample_in_process

FIXTURES = ROOT / "tests" / "fixtures"
RUN = [
    "trainer=cpu",
    "trainer.val_check_interval=3",
    "data.batch_size=8",
    "sampler=ddim",
    "sampler.steps=2",
    "callbacks.sample_grid.num_images=4",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "process=cosine",
    "process.num_steps=50",
    "logger=none",
    "trainer.enable_progress_bar=false",
]
KINDS = {
    "class": (["experiment=digits_cond", "model=unet_tiny", "model.num_classes=10"], ["label=[3,7]"]),
    "text": (
        [
            "experiment=digits_text",
            "model=unet_tiny",
            "model.attention_resolutions=[4]",
            "conditioning.encoder.dim=16",
            "conditioning.encoder.depth=1",
            "conditioning.encoder.heads=2",
        ],
        ["prompt=[a handwritten seven,a 3]"],
    ),
}
SAMPLE = ["n=2", "sampler=ddim", "sampler.steps=3", "guidance=2", "npz=true"]


def fixture(kind: str) -> Path:
    return FIXTURES / f"f09aeb7_{kind}.ckpt"


@pytest.mark.parametrize("kind", KINDS)
def test_an_old_checkpoint_reads_as_todays_format(kind):
    raw = torch.load(fixture(kind), weights_only=True)
    assert raw["diffusion"]["format"] == 1 and "schedule" in raw["diffusion"]  # really written by the old code
    ckpt = read_checkpoint(fixture(kind))
    assert ckpt["diffusion"]["format"] == FORMAT and ckpt["diffusion"]["process"] == raw["diffusion"]["schedule"]
    assert all(k.startswith(("model.net.", "model.conditioning.")) for k in ckpt["state_dict"])
    assert sum(k.startswith(NET_PREFIX) for k in ckpt["state_dict"]) == sum(
        k.startswith("net.") for k in raw["state_dict"]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_an_old_checkpoint_samples_the_same_images(tmp_path, kind):
    sample_in_process(tmp_path / "out", f"ckpt={fixture(kind)}", *SAMPLE, *KINDS[kind][1])
    got = np.load(tmp_path / "out" / "samples.npz")
    expected = np.load(FIXTURES / f"f09aeb7_{kind}_samples.npz")
    assert np.array_equal(got["arr_0"], expected["arr_0"]) and np.array_equal(got["arr_1"], expected["arr_1"])


@pytest.mark.parametrize("kind", KINDS)
def test_an_old_checkpoint_exports_and_the_export_samples_the_same(tmp_path, kind):
    from diffusion.samplers import ddim_sample

    export(fixture(kind), tmp_path / "st", format="safetensors")
    export(fixture(kind), tmp_path / "ckpt", format="ckpt")
    assert json.loads((tmp_path / "st" / "config.json").read_text())["format"] == FORMAT
    ours = DiffusionModel.from_checkpoint(fixture(kind))
    conditions = [3, 7] if kind == "class" else ["a handwritten seven", "a 3"]
    for model in (
        DiffusionModel.from_export(tmp_path / "st"),
        DiffusionModel.from_checkpoint(tmp_path / "ckpt" / "model.ckpt"),
    ):
        for a, b in zip(model.state_dict().values(), ours.state_dict().values(), strict=True):
            assert torch.equal(a, b) if torch.is_tensor(a) else a == b  # (a tokenizer: the encoder's extra state)
        args = dict(seeds=[0, 1], sampler=lambda *a, **k: ddim_sample(*a, steps=3, **k), guidance=2.0)
        assert torch.equal(model.generate(conditions, **args), ours.generate(conditions, **args))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_an_old_checkpoint_resumes_to_the_same_weights(tmp_path, kind):
    """Resumed one step by today's train.py, it reaches exactly the weights f09aeb7's train.py reached."""
    import train

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(fixture(kind), run / "checkpoints" / "last.ckpt")
    train.train(compose_train(run, [*KINDS[kind][0], *RUN, "trainer.max_steps=4", f"ckpt_path={run}"], tiny=False))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    expected = json.loads((FIXTURES / "f09aeb7_resumed.json").read_text())[kind]
    assert ckpt["global_step"] == expected["global_step"] == 4 and ckpt["diffusion"]["format"] == FORMAT
    old_key = {"model.net.": "net.", "model.conditioning.": "conditioning."}
    sums = {}
    for key, value in ckpt["state_dict"].items():
        if torch.is_tensor(value) and value.is_floating_point():
            prefix = next(p for p in old_key if key.startswith(p))
            sums[old_key[prefix] + key[len(prefix) :]] = float(value.double().sum())
    assert sums == expected["state_dict"]
    ema = {k: float(v.double().sum()) for k, v in ckpt["ema_state_dict"].items() if v.is_floating_point()}
    assert ema == expected["ema"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_an_old_checkpoint_validates(tmp_path, kind):
    import train

    cfg = compose_train(
        tmp_path / "v", [*KINDS[kind][0], *RUN, "validate_only=true", f"ckpt_path={fixture(kind)}"], tiny=False
    )
    value = train.train(cfg)
    report = json.loads((tmp_path / "v" / train.VALIDATE_FILE).read_text())
    assert report["global_step"] == 3 and report["weights"] == "ema" and value == report["metrics"]["val/loss"] > 0
