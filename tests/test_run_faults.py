"""Faults a run meets from its surroundings (issue 24): a full disk, a stop signal, a secret on the command line,
a second run into the same folder. Each ends in one line naming what happened, with an exit code that says so,
and nothing written that should not be."""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion.checkpoint import read_checkpoint
from diffusion.files import atomic_write
from tests.conftest import ROOT, TINY, run_cli, run_train
from tests.test_resume import assert_same_tensors
from tests.test_safety import one_line_error

# A learning rate that does not depend on trainer.max_steps (the cosine plan does), so that a run stopped at
# any step and resumed to step N can be compared with one that trained to N straight.
EXACT_STOP = ["optim.lr_decay=constant", "trainer.deterministic=true"]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The `error: ...` lines of a command's stderr, checked to be all it says besides Python warnings."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


# --- a full disk -----------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of 4 MiB (mounting needs root; skipped where the test cannot mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill `disk`'s filesystem but for about `leave` bytes."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with open(disk / "filler", "ab") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_failed_torch_save_is_one_line_naming_the_file_and_keeps_the_previous_one(tmp_path):
    """torch.save reports a write the disk refused as RuntimeError('unexpected pos ...'), not as the OSError."""
    path = tmp_path / "w.pt"
    atomic_write(path, lambda f: torch.save({"w": torch.ones(10)}, f))
    before = path.read_bytes()

    class FullDisk:  # the file as a full disk makes it: the first write beyond a few bytes fails
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if self.f.tell() + len(data) > 100:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    message = one_line_error(atomic_write, path, lambda f: torch.save({"w": torch.zeros(1000)}, FullDisk(f)))
    assert message == f"could not save {path} (No space left on device); the previous file there is intact"
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.pt"]
    new = tmp_path / "new.pt"
    message = one_line_error(atomic_write, new, lambda f: torch.save({"w": torch.zeros(1000)}, FullDisk(f)))
    assert message == f"could not save {new} (No space left on device); no file was there before"


def test_a_full_disk_is_one_line_and_exit_1_in_train_sample_and_export(small_disk):
    """On a real small filesystem: resuming a run, sampling and exporting when the disk fills up."""
    run = small_disk / "run"
    quiet = ["callbacks.model_checkpoint.every_n_train_steps=1000", "callbacks.sample_grid=null", "logger=none"]
    run_train(run, [*quiet, "trainer.max_steps=2"])
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    fill(small_disk, leave=30_000)  # room for the logs, not for a second checkpoint (0.9 MB)

    result = run_cli("train.py", *TINY, *quiet, "trainer.max_steps=4", f"ckpt_path={run}", f"hydra.run.dir={run}")
    assert result.returncode == 1 and error_lines(result) == [
        f"error: could not save checkpoint {last} (No space left on device); the previous checkpoint there is intact"
    ]
    assert last.read_bytes() == before and read_checkpoint(str(last))["global_step"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary file left

    fill(small_disk, leave=8_000)
    for script, args, out in [
        ("sample.py", ["n=64", "npz=true", "device=cpu"], small_disk / "samples"),
        ("export.py", ["format=ckpt"], small_disk / "export"),
    ]:
        result = run_cli(script, f"ckpt={last}", f"out={out}", *args)
        assert result.returncode == 1 and len(error_lines(result)) == 1
        assert error_lines(result)[0].startswith(f"error: could not save {out}/"), result.stderr
        assert "(No space left on device)" in result.stderr
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


# --- secrets in the config -------------------------------------------------------------------------------------

SECRET = "s3cr3tValue"


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ([f"data.path=https://user:{SECRET}@example.com/x"], "data.path carries credentials"),
        ([f"data.path='https://example.com/x?X-Amz-Signature={SECRET}'"], "data.path carries a signed"),
        (["data.path=s3://bucket/x", f"+data.storage.aws_secret_access_key={SECRET}"], "data.storage.aws_secret"),
        (["-m", f"data.path=/data/a,https://user:{SECRET}@example.com/x"], "data.path carries credentials"),
    ],
    ids=["user-password", "signed-url", "storage-key", "sweep"],
)
def test_a_secret_in_the_config_is_refused_before_anything_is_written(tmp_path, overrides, says):
    """Hydra writes .hydra/ (config, overrides) and train.log as the job starts: the refusal comes first."""
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    flags = [o for o in overrides if o.startswith("-")]  # -m before the overrides
    overrides = [o for o in overrides if o not in flags]
    args = [*flags, *TINY, "data=shards", *overrides, f"hydra.run.dir={run}", f"hydra.sweep.dir={sweep}"]
    result = run_cli("train.py", *args, cwd=tmp_path)
    assert result.returncode == 1 and len(error_lines(result)) == 1 and says in error_lines(result)[0]
    assert SECRET not in result.stdout + result.stderr
    assert not run.exists() and not sweep.exists() and sorted(tmp_path.iterdir()) == []


def test_options_named_like_a_secret_that_are_none_pass():
    from diffusion.data.shards import check_config_secrets

    check_config_secrets({"data": {"path": "s3://bucket/x", "storage": {"skip_signature": True, "region": "eu"}}})
    check_config_secrets({"hydra": {"overrides": {"task": ["data.path=https://example.com/x?page=2"]}}})


# --- one run per folder ----------------------------------------------------------------------------------------


def start_train(run: Path, *args: str) -> subprocess.Popen:
    """`python train.py` on the tiny config into `run`, in the background; output captured as text."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    argv = [sys.executable, str(ROOT / "train.py"), *TINY, *args, f"hydra.run.dir={run}"]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, done, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"ended (exit {proc.returncode}) before {what}: {out[-2000:]} {err[-2000:]}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def test_a_run_holds_its_folder_and_a_killed_one_leaves_it_free(tmp_path):
    run = tmp_path / "run"
    first = start_train(run, "trainer.max_steps=100000", "callbacks.model_checkpoint.every_n_train_steps=100000")
    try:  # training, and no checkpoint yet: a second run would pass the 'holds checkpoints' check
        wait_for(first, lambda: "effective batch" in read_text(run / "train.log"), "training")
        before = read_text(run / ".hydra" / "config.yaml")
        second = run_cli("train.py", *TINY, f"hydra.run.dir={run}", "seed=1")
        assert second.returncode == 1 and error_lines(second) == [
            f"error: run folder {run} is in use by another run (pid {first.pid}); wait for it to end, or choose "
            "another hydra.run.dir"
        ]
        assert read_text(run / ".hydra" / "config.yaml") == before  # the second wrote nothing there
    finally:
        first.kill()  # SIGKILL: no clean-up of its own
        first.communicate()
    third = run_cli("train.py", *TINY, "trainer.max_steps=1", f"hydra.run.dir={run}")
    assert third.returncode == 0, third.stderr[-3000:]
    assert not (run / ".lock").exists()  # a run that ends removes its lock file


def read_text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


# --- stop signals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_last_ckpt_exits_non_zero_and_resumes_exactly(tmp_path, signum, code):
    """kill, scancel, docker stop, Kubernetes (SIGTERM) and Ctrl-C (SIGINT) sent to a local train.py."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    exact = [*EXACT_STOP, "trainer.val_check_interval=100000", "callbacks.sample_grid.every_n_steps=100000"]
    proc = start_train(run, *exact, "trainer.max_steps=100000")
    try:
        wait_for(proc, lambda: (run / "checkpoints" / "step_000004.ckpt").exists(), "step 4")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    last = run / "checkpoints" / "last.ckpt"
    assert proc.returncode == code, out[-2000:] + err[-3000:]
    step = read_checkpoint(str(last))["global_step"]
    name = signal.Signals(signum).name
    assert f"{name}: saved {last} at step {step}; resume with ckpt_path={run}\n" in out, out[-2000:]
    assert 4 <= step < 100000 and "Traceback" not in err, err[-3000:]

    # both continuations in processes like the stopped one: an earlier test in this process may have changed
    # torch's global state (threads, flags), and bit-exactness is between like processes
    for folder, resume in ((run, [f"ckpt_path={run}"]), (straight, [])):
        done = run_cli("train.py", *TINY, *exact, f"trainer.max_steps={step + 2}", *resume, f"hydra.run.dir={folder}")
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = (read_checkpoint(str(r / "checkpoints" / "last.ckpt")) for r in (straight, run))
    assert a["global_step"] == b["global_step"] == step + 2
    for key in ("state_dict", "ema_state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_tensors(a[key], b[key], key)


# --- leftovers and plans on resume ---------------------------------------------------------------------------
def test_a_killed_saves_temporary_files_are_removed_on_resume(tmp_path, caplog):
    """kill -9 during a checkpoint save leaves `.last.ckpt.tmp-<hex>`: the next run in the folder removes it (and
    nothing else)."""
    run = tmp_path / "run"
    run_train(run, ["trainer.max_steps=2", "logger=none", "callbacks.sample_grid.every_n_steps=0"])
    stale = run / "checkpoints" / ".last.ckpt.tmp-0123456789ab"
    stale.write_bytes(b"half a checkpoint")
    mine = run / "checkpoints" / "notes.tmp"
    mine.write_text("the user's")
    caplog.set_level("INFO")
    run_train(run, ["trainer.max_steps=3", "logger=none", "callbacks.sample_grid.every_n_steps=0", f"ckpt_path={run}"])
    assert not stale.exists() and mine.read_text() == "the user's"
    assert "removed 1 temporary file(s) an interrupted save left: .last.ckpt.tmp-0123456789ab" in caplog.text


def test_a_mid_epoch_resume_is_exact_and_says_nothing_about_unreliable_results(tmp_path, recwarn):
    """Our loaders resume through their sampler: Lightning's 'dataloader is not resumable' warning is wrong here."""
    run = tmp_path / "run"
    quiet = ["logger=none", "callbacks.sample_grid.every_n_steps=0"]
    run_train(run, ["trainer.max_steps=2", *quiet])  # 2 of the digits' 12 batches an epoch
    run_train(run, ["trainer.max_steps=3", *quiet, f"ckpt_path={run}"])
    assert not [w for w in recwarn if "ended before the epoch ended" in str(w.message)]


def test_resuming_with_a_longer_run_says_what_happens_to_the_cosine_plan(tmp_path, caplog):
    run = tmp_path / "run"
    quiet = ["logger=none", "callbacks.sample_grid.every_n_steps=0", "optim.lr_decay=cosine", "optim.warmup_steps=0"]
    run_train(run, ["trainer.max_steps=4", *quiet])
    caplog.set_level("INFO")
    cfg, _ = run_train(run, ["trainer.max_steps=8", *quiet, f"ckpt_path={run}"])
    assert "resuming at step 4 with the cosine decay to 0 at step 8 (trainer.max_steps), where the checkpoint's " \
        "ended at step 4: from here the learning rate follows the new plan" in caplog.text  # fmt: skip
    ckpt = read_checkpoint(str(run / "checkpoints" / "step_000006.ckpt"))  # the old plan would be at 0 by now
    lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    assert ckpt["lr_plan"]["total"] == 8 and lr == pytest.approx(cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * 6 / 8)))
