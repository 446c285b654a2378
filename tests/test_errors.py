"""Sweeps that survive a failed job, and errors and logs (issue 12, sections 4 and 5).

A user error (a config value, a path, a file's contents) is one line naming what it is about; anything else is
a bug and keeps its traceback. A sweep job that diverges or refuses its config returns NaN and the sweep goes on.
"""

from __future__ import annotations

import csv
import logging
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from diffusion.data import CIFAR10DataModule, ImageFolderDataModule
from diffusion.errors import ConfigError, UserError, exit_on_user_error, user_error_message, worker_error_line
from tests.conftest import ROOT, compose_train, run_cli, run_train, write_image
from tests.fabricate import cifar10
from tests.test_data import _truncated_jpeg
from tests.test_scale import NO_GRIDS, TINY_CLI, run_tiny_multirun


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread in subprocesses: the machine is small and shared."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    message = user_error_message(info.value)
    assert message is not None and "\n" not in message, f"not a one-line user error: {info.value!r}"
    return message


# --- 4. sweeps that survive ----------------------------------------------------------------------------------------
def test_a_diverging_job_does_not_end_the_sweep_and_everything_is_in_train_log(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_tiny_multirun(
        sweep,
        "+callbacks.poison._target_=tests.test_scale.PoisonBatch",
        "+callbacks.poison.at_step=7,0,8",  # job 1 gets a NaN batch at its first step; jobs 0 and 2 never do
        f"+callbacks.poison.dirpath={tmp_path}",
        "logger=csv",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "sweep: 1 of 3 jobs failed" in output, output[-3000:]
    assert "+callbacks.poison.at_step=0" in output and "non-finite loss at step" in output
    assert (sweep / "1" / "failed.txt").read_text().startswith("non-finite loss at step")
    values = [float(v) for v in re.findall(r"optimized_metric val/loss = (\S+)", output)]
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert not (sweep / "0" / "failed.txt").exists() and not (sweep / "2" / "failed.txt").exists()

    # everything the run says is in its train.log (it went through logging, not print)
    log = (sweep / "0" / "train.log").read_text()
    said = ("Seed set to", "run folder:", "effective batch", "Trainable params", "done at step 2", "optimized_metric")
    for line in said:  # ours, and Lightning's (its model summary too)
        assert line in log, log
    assert "job 1 failed: non-finite loss" in (sweep / "1" / "train.log").read_text()

    # the learning rate is logged once (by the module), not also by a callback
    (metrics,) = (sweep / "0").rglob("metrics.csv")
    with open(metrics) as f:
        columns = next(csv.reader(f))
    assert [c for c in columns if "lr" in c] == ["train/lr"]


def test_an_optuna_study_survives_trials_that_diverge(tmp_path):
    """Optuna ends the whole study on a NaN result: a failed trial gives it the worst value (+inf, minimizing)."""
    sweep = tmp_path / "sweep"
    result = run_tiny_multirun(
        sweep,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "+callbacks.poison._target_=tests.test_scale.PoisonBatch",
        "+callbacks.poison.at_step=0",  # every trial diverges at its first step
        f"+callbacks.poison.dirpath={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep: 2 of 2 jobs failed" in result.stdout + result.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == math.inf


def test_ddp_inside_a_local_sweep_is_refused_in_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py", "-m", "trainer=ddp_cpu", "seed=1,2", *TINY_CLI, *NO_GRIDS, f"hydra.sweep.dir={sweep}", timeout=120
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: trainer=ddp cannot run inside a local -m sweep (Lightning relaunches the script")
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not list(sweep.rglob("*.ckpt"))


# --- 5. errors and logs --------------------------------------------------------------------------------------------
def test_an_error_in_a_loader_worker_is_one_line_naming_the_file(image_folder):
    _truncated_jpeg(image_folder / "cats" / "cut.jpg")
    dm = ImageFolderDataModule(path=str(image_folder), image_size=16, num_workers=1, val_fraction=0.0, batch_size=4)
    dm.setup()  # the header is intact: setup passes, the read in the worker fails
    with pytest.raises(OSError) as info:
        for _ in dm.train_dataloader():
            pass
    assert "Original Traceback" in str(info.value)  # what torch re-raises: the worker's whole traceback
    message = user_error_message(info.value)
    assert message.startswith("in DataLoader worker 0: cannot decode image ") and "cut.jpg" in message, message
    assert re.search(r"\(raised at \S+folder\.py:\d+\)$", message) and len(message) < 500, message


def test_worker_error_line_of_a_flattened_traceback():
    flattened = (
        "Caught KeyError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
        '  File "/x/torch/utils/data/_utils/worker.py", line 349, in _worker_loop\n    data = fetch(index)\n'
        '  File "/x/diffusion/data/base.py", line 42, in __getitem__\n    return self.items[i]\n'
        "KeyError: 'label'\n"
    )
    assert worker_error_line(flattened) == "in DataLoader worker 3: 'label' (raised at /x/diffusion/data/base.py:42)"
    assert worker_error_line("an ordinary message") is None


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["trainer=cpu", "trainer.max_steps=abc"], ["trainer.max_steps='abc' is not an int"]),
        (["trainer=cpu", "optim.lr=-1"], ["optim.optimizer", "Invalid learning rate", "optim.lr=-1"]),
        (["trainer=cpu", "+trainer.no_such_option=1"], ["trainer:", "no_such_option"]),
        pytest.param(
            ["trainer=gpu"],
            ["trainer: No supported gpu backend found!", "trainer=cpu", "trainer=default"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU"),
        ),
    ],
)
def test_a_config_group_that_cannot_be_built_is_one_line_naming_its_option(tmp_path, overrides, words):
    run = tmp_path / "run"
    message = one_line(run_train, run, [*TINY_CLI, *overrides], tiny=False)
    assert all(w in message for w in words), message
    assert "Error in call to target" not in message and "full_key" not in message
    assert not (run / "checkpoints").exists()


def test_a_bad_trainer_value_is_named_without_advice_to_change_trainer(tmp_path):
    """Lightning's refusal of a value (max_steps=-5) names the key; the advice to choose another trainer is only for
    what this machine cannot do (no GPU, too many devices)."""
    message = one_line(run_train, tmp_path / "run", [*TINY_CLI, "trainer=cpu", "trainer.max_steps=-5"], tiny=False)
    assert message.startswith("trainer.max_steps=-5: `max_steps` must be a non-negative integer"), message
    assert "choose a trainer" not in message


def test_a_bug_keeps_its_traceback_and_the_log_file_gets_it(tmp_path):
    assert user_error_message(KeyError("data")) is None  # a missing key in our own code: a bug
    try:
        int("abc")
    except ValueError as e:
        assert user_error_message(e) is None  # a ValueError that is not one of our checks
    assert user_error_message(ConfigError("data.batch_size=0 must be >= 1")) == "data.batch_size=0 must be >= 1"
    missing = FileNotFoundError(2, "No such file or directory", str(tmp_path / "x.png"))
    assert user_error_message(missing) == f"[Errno 2] No such file or directory: '{tmp_path / 'x.png'}'"

    def bug():
        return {}["data"]

    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(KeyError):
            exit_on_user_error(bug)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    log = (tmp_path / "train.log").read_text()
    assert "a bug: please report it" in log and 'return {}["data"]' in log and "KeyError: 'data'" in log


def test_a_cifar_batch_with_unexpected_keys_names_the_file(tmp_path):
    folder = cifar10(tmp_path)
    (folder / "data_batch_1").write_bytes(pickle.dumps({"pixels": [1, 2, 3]}))
    message = one_line(CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup)
    assert f"{folder / 'data_batch_1'} is not a CIFAR batch file" in message and "'pixels'" in message, message


def test_a_symlink_loop_in_a_data_folder_is_named_or_skipped(image_folder):
    loop = image_folder / "cats" / "loop.png"
    loop.symlink_to(loop)
    (image_folder / "dogs" / "again").symlink_to(image_folder / "dogs")  # a folder loop: scanned once
    kw = dict(path=str(image_folder), image_size=16, num_workers=0, val_fraction=0.0)
    message = one_line(ImageFolderDataModule(**kw).setup)
    assert str(loop) in message and "symbolic links" in message and "data.skip_bad=true" in message, message
    for cache in (False, True):
        dm = ImageFolderDataModule(**kw, skip_bad=True, cache=cache)
        dm.prepare_data()
        dm.setup()
        assert dm.num_skipped == 1 and len(dm.train_set) == 13


def test_a_corrupt_cache_index_is_named_and_rebuilt(image_folder, caplog):
    kw = dict(path=str(image_folder), image_size=16, num_workers=0, val_fraction=0.0, cache=True)
    first = ImageFolderDataModule(**kw)
    first.setup()
    index = first.cache_file.with_suffix(".json")
    index.write_text('{"version": 1, "skipp')  # e.g. a disk that filled up while another tool wrote it
    caplog.set_level(logging.INFO)
    again = ImageFolderDataModule(**kw)
    again.setup()
    assert f"the cache index {index} is corrupt" in caplog.text and "rebuilding" in caplog.text
    assert again.cache_file == first.cache_file and index.read_text().startswith("{")
    assert len(again.train_set) == 13


@pytest.mark.parametrize("damage", ["truncated", "not an array", "other shape"])
def test_a_damaged_cache_array_is_named_and_rebuilt(image_folder, caplog, damage):
    """As a corrupt index: a cache .npy cut short (a full disk, an interrupted copy), overwritten or of another
    shape is named in one line and rebuilt at setup, not met by the loader workers mid-training."""
    kw = dict(path=str(image_folder), image_size=16, num_workers=0, val_fraction=0.0, cache=True, flip=False)
    first = ImageFolderDataModule(**kw)
    first.setup()
    npy, good = first.cache_file, first.cache_file.read_bytes()
    damaged = {
        "truncated": good[: len(good) // 2],
        "not an array": b"not an array",
        "other shape": good.replace(b"(13, 3, 16, 16)", b"(12, 3, 16, 16)").removesuffix(good[-3 * 16 * 16 :]),
    }[damage]
    assert damaged != good
    npy.write_bytes(damaged)
    caplog.set_level(logging.INFO)
    again = ImageFolderDataModule(**kw)
    again.setup()
    assert f"the cache {npy} is damaged" in caplog.text and "rebuilding" in caplog.text, caplog.text
    assert again.cache_file == npy and npy.read_bytes() == good
    x, _ = next(iter(again.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16)


def test_a_stale_cache_is_found_when_the_folder_name_holds_glob_characters(image_folder, tmp_path):
    folder = image_folder.rename(tmp_path / "photos [2024] *")
    kw = dict(path=str(folder), image_size=16, num_workers=0, val_fraction=0.0, cache=True)
    first = ImageFolderDataModule(**kw)
    first.setup()
    write_image(folder / "cats" / "c0.png", (44, 40), seed=123)  # a changed file: the cache is stale
    changed = ImageFolderDataModule(**kw)
    changed.setup()
    assert changed.cache_file != first.cache_file
    assert not first.cache_file.exists() and not first.cache_file.with_suffix(".json").exists()


def test_no_private_lightning_attributes_and_one_learning_rate_metric(tmp_path):
    sources = [*Path(ROOT, "diffusion").rglob("*.py"), *(Path(ROOT, s) for s in ("train.py", "sample.py", "export.py"))]
    for name in ("_batches_that_stepped", "_extract_stats", "_last_checkpoint_saved"):
        used = [str(p) for p in sources if name in p.read_text()]
        assert not used, f"{name} (a private Lightning attribute) in {used}"
    cfg = compose_train(tmp_path / "run")
    targets = [str(c.get("_target_")) for c in cfg.callbacks.values() if c]
    assert not [t for t in targets if "LearningRateMonitor" in t], targets


def test_user_errors_keep_their_builtin_kinds():
    from diffusion.errors import BadFileError, MissingPathError, PathExistsError

    assert issubclass(ConfigError, ValueError) and issubclass(BadFileError, ValueError)
    assert issubclass(MissingPathError, FileNotFoundError) and issubclass(PathExistsError, FileExistsError)
    assert all(issubclass(k, UserError) for k in (ConfigError, BadFileError, MissingPathError, PathExistsError))
