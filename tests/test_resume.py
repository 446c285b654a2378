"""Exact resume (issue 12, section 3): a run stopped and resumed ends where the uninterrupted run ends, bit for bit;
a resume with another optim.lr trains at it; nonfinite=skip stops after too many skipped steps in a row."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from diffusion.checkpoint import read_checkpoint
from diffusion.model import DiffusionModel
from diffusion.module import NonFiniteLossError
from tests.conftest import run_train

# 1617 training digits in batches of 512: 3 batches per epoch (the partial one is dropped), so step 4 of 8 is the
# second batch of epoch 1, and the 8 steps cross two epoch boundaries. Flips, label dropout and the network's
# dropout are on, so every random stream of a training step is exercised.
EXACT = [
    "data.batch_size=512",
    "data.flip=true",
    "model.num_classes=10",
    "model.dropout=0.1",
    "module.cond_drop_prob=0.3",
    "trainer.deterministic=true",
    "seed=3",
]


def assert_same_tensors(a, b, where: str = "") -> None:
    """Equal nested dicts / lists of tensors and plain values, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {set(a) ^ set(b)}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# Mid-epoch: last.ckpt as training ends at max_steps=4. Epoch end: last.ckpt refreshed every step, so the one
# read is the step-3 save in on_train_batch_end (a preemption's or a periodic refresh's); a last.ckpt written in
# on_train_end right after an epoch's last batch holds Lightning's loop counters in a state from which Lightning
# itself resumes one batch short (ResumeCheckpoint should write its final save in on_train_batch_end).
# The DiT (diffusion/dit.py) goes through the same path: its mid-epoch case.
@pytest.mark.parametrize(
    ("stop", "every", "position", "model"),
    [(4, 2, (1, 512), "unet_tiny"), (3, 1, (0, 3 * 512), "unet_tiny"), (4, 2, (1, 512), "dit_tiny")],
    ids=["mid-epoch", "epoch-end", "dit-mid-epoch"],
)
def test_stopped_and_resumed_ends_as_the_uninterrupted_run(tmp_path, stop, every, position, model):
    straight, split = tmp_path / "straight", tmp_path / "split"
    exact = [f"model={model}", *EXACT]
    run_train(straight, [*exact, "trainer.max_steps=8"])
    saves = f"callbacks.model_checkpoint.every_n_train_steps={every}"
    run_train(split, [*exact, saves, f"trainer.max_steps={stop}"])
    half = read_checkpoint(str(split / "checkpoints" / "last.ckpt"))
    run_train(split, [*exact, saves, "trainer.max_steps=8", f"ckpt_path={split}"])

    a = read_checkpoint(str(straight / "checkpoints" / "last.ckpt"))
    b = read_checkpoint(str(split / "checkpoints" / "last.ckpt"))
    assert a["global_step"] == b["global_step"] == 8 and a["epoch"] == b["epoch"] == 2
    for key in ("state_dict", "ema_state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_tensors(a[key], b[key], key)
    assert_same_tensors(a["training_rng"], b["training_rng"])
    assert a["DigitsDataModule"] == b["DigitsDataModule"] == {"epoch": 2, "position": 2 * 512}
    # Where the first part stopped (epoch, items of it trained on), and the comparison can fail: weights moved.
    assert half["global_step"] == stop and half["DigitsDataModule"] == dict(zip(("epoch", "position"), position))
    assert any(not torch.equal(v, half["state_dict"][k]) for k, v in a["state_dict"].items())


def test_flips_are_a_function_of_seed_epoch_and_item():
    from diffusion.data.base import flip_mask

    m = flip_mask(0, 0, range(4096))
    assert torch.equal(m[100:200], flip_mask(0, 0, range(100, 200)))  # the same item flips alike wherever it is
    assert 0.45 < m.float().mean() < 0.55
    assert not torch.equal(m, flip_mask(0, 1, range(4096))) and not torch.equal(m, flip_mask(1, 0, range(4096)))


def test_resume_with_a_lower_lr_trains_at_it(tmp_path, caplog):
    run = tmp_path / "run"
    common = ["optim.warmup_steps=8", "optim.lr_decay=cosine"]
    run_train(run, [*common, "optim.lr=1e-3", "trainer.max_steps=2"])
    assert read_checkpoint(str(run / "checkpoints" / "last.ckpt"))["lr_schedulers"][0]["base_lrs"] == [1e-3]

    caplog.set_level(logging.INFO)
    run_train(run, [*common, "optim.lr=5e-4", "trainer.max_steps=3", f"ckpt_path={run}"])
    ckpt = read_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    (group,) = ckpt["optimizer_states"][0]["param_groups"]
    # one step after the resume the schedule stands at step 3 of the warm-up: 4/8 of the NEW rate (not of 1e-3)
    assert group["lr"] == pytest.approx(5e-4 * 4 / 8) and group["initial_lr"] == 5e-4
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [5e-4]
    lines = [r.getMessage() for r in caplog.records if "resuming with optim.lr" in r.getMessage()]
    assert lines == ["resuming with optim.lr=0.0005 (the checkpoint's was 0.001); the schedule continues from step 2"]


class PoisonEveryStep(L.Callback):
    """Test-only: every batch's images are NaN from optimizer step `from_step` (0-based) on."""

    def __init__(self, from_step: int) -> None:
        self.from_step = from_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.from_step:
            batch[0].fill_(float("nan"))


def test_skip_stops_after_too_many_consecutive_skips(tmp_path):
    poison = ["+callbacks.poison._target_=tests.test_resume.PoisonEveryStep", "+callbacks.poison.from_step=1"]
    with pytest.raises(NonFiniteLossError, match=r"module\.max_consecutive_skips=3"):
        run_train(
            tmp_path / "run",
            [*poison, "module.nonfinite=skip", "module.max_consecutive_skips=3", "trainer.max_steps=20"],
        )
    # within the limit the run goes on (and a finite step would start the count again)
    run_train(
        tmp_path / "ok",
        [*poison, "module.nonfinite=skip", "module.max_consecutive_skips=3", "trainer.max_steps=4"],
    )
    assert read_checkpoint(str(tmp_path / "ok" / "checkpoints" / "last.ckpt"))["skipped_steps"] == 3


def test_a_finite_step_ends_a_run_of_skips():
    from diffusion.module import DiffusionModule
    from diffusion.process.discrete import NoiseSchedule
    from diffusion.unet import UNet

    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1], num_res_blocks=1, norm_groups=4)
    model = DiffusionModel(net=net, process=NoiseSchedule(num_steps=10))
    guard = DiffusionModule(model=model, nonfinite="skip", max_consecutive_skips=1).guard
    guard._checked(1, step=1)
    guard._checked(0, step=2)
    guard._checked(2, step=3)
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        guard._checked(1, step=4)
    assert guard.skipped_steps == 3


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    try:
        run_train(run, ["logger=wandb", "trainer.max_steps=2"])
        wandb.finish()
        run_train(run, ["logger=wandb", "trainer.max_steps=4", f"ckpt_path={run}"])
    finally:
        wandb.finish()
    # offline-run-<time to the second>-<id>: one folder per start, or one for both when they fall in the same
    # second; a resume under another id would leave a folder with that other id.
    ids = {r.name.rsplit("-", 1)[1] for r in (run / "wandb").glob("offline-run-*")}
    run_id = (run / "wandb" / "run_id.txt").read_text()
    assert ids == {run_id}
    # a new run in another folder gets another id
    other = tmp_path / "other"
    try:
        run_train(other, ["logger=wandb", "trainer.max_steps=1"])
    finally:
        wandb.finish()
    assert (other / "wandb" / "run_id.txt").read_text() != run_id


def test_the_preemption_signal_saves_last_ckpt_and_the_run_resumes_from_it(tmp_path):
    """What a SLURM job gets from submitit `signal_delay_s` before its time limit, sent to a local train.py."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, TINY

    run = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=100000", "trainer.val_check_interval=100000", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step_000004.ckpt").exists():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    step = read_checkpoint(str(run / "checkpoints" / "last.ckpt"))["global_step"]
    assert 4 <= step < 100000 and f"SIGUSR2: saved {run / 'checkpoints' / 'last.ckpt'} at step {step}" in out

    run_train(run, [f"trainer.max_steps={step + 2}", f"ckpt_path={run}"])
    assert read_checkpoint(str(run / "checkpoints" / "last.ckpt"))["global_step"] == step + 2


def test_loader_workers_flip_and_resume_as_the_main_process():
    """Persistent loader workers see each new epoch (flips follow it), and a resumed loader yields the epoch's rest."""
    from diffusion.data import DigitsDataModule

    def batches(num_workers: int, resume: tuple[int, int] | None = None) -> list[list[torch.Tensor]]:
        dm = DigitsDataModule(batch_size=400, flip=True, num_workers=num_workers, seed=5)
        dm.setup()
        if resume is not None:
            dm.load_state_dict({"epoch": resume[0], "position": resume[1]})
        loader = dm.train_dataloader()
        out = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch start
            out.append([x for x, _ in loader])
        return out

    main, workers = batches(0), batches(1)
    for a, b in zip(main, workers, strict=True):
        assert len(a) == len(b) == 4 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(main[0][0], main[1][0])  # another order and other flips in epoch 1
    resumed = batches(0, resume=(0, 2 * 400))
    assert len(resumed[0]) == 2 and all(torch.equal(x, y) for x, y in zip(resumed[0], main[0][2:], strict=True))
    assert all(torch.equal(x, y) for x, y in zip(resumed[1], main[1], strict=True))


@pytest.mark.parametrize(
    "change, named",
    [
        (["process=edm"], "process.family=discrete where the config has edm"),
        (["process.prediction=eps"], "process.prediction=v where the config has eps"),
    ],
)
def test_resume_refuses_a_changed_objective(tmp_path, change, named):
    """Resuming with another process would train the restored optimizer state toward another target: one line
    that names the change and the way out (init_from), and nothing trained or written."""
    from diffusion.errors import ConfigError
    from tests.test_process import E2E  # TINY without its discrete-only process.num_steps

    quiet = [*E2E, "process=cosine", "logger=none", "callbacks.sample_grid.every_n_steps=0"]
    run = tmp_path / "run"
    run_train(run, [*quiet, "trainer.max_steps=2"], tiny=False)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match=f"{named}: resuming would train its optimizer state toward another"):
        run_train(run, [*quiet, "trainer.max_steps=4", f"ckpt_path={run}", *change], tiny=False)
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    # a new run from those weights is the way to a new objective
    run_train(tmp_path / "new", [*quiet, "trainer.max_steps=1", f"init_from={run}", *change], tiny=False)
