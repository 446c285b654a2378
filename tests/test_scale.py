"""Scaling out: 2-process DDP, mixed precision, the non-finite guard, speed options, multirun, sweeper/SLURM configs."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from diffusion.checkpoint import NET_PREFIX, read_checkpoint, sub_state_dict
from diffusion.errors import user_error_message
from diffusion.model import DiffusionModel
from diffusion.module import DiffusionModule, NonFiniteLossError
from diffusion.process.discrete import NoiseSchedule
from diffusion.unet import UNet
from tests.conftest import CONF, TINY, compose_train, run_cli, run_train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NO_GRIDS = ["callbacks.sample_grid.every_n_steps=0"]
# The per-run pieces of TINY, for runs that pick their own trainer.
TINY_CLI = [o for o in TINY if not o.startswith("trainer=")]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread here and in subprocesses: on a loaded 2-core machine, 2 OpenMP threads per process made
    the tiny U-Net's forward ~40x slower (busy-waiting threads), and DDP runs 2 processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


class PoisonBatch(L.Callback):
    """Test-only: fills the images of the batch at optimizer step `at_step` (0-based) with NaN, after recording
    the bytes of every checkpoint then on disk in `SNAPSHOT`."""

    SNAPSHOT: dict[Path, bytes] = {}

    def __init__(self, at_step: int, dirpath: str) -> None:
        self.at_step = at_step
        self.dirpath = Path(dirpath)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            PoisonBatch.SNAPSHOT = {p: p.read_bytes() for p in self.dirpath.glob("*.ckpt")}
            batch[0].fill_(float("nan"))


def _poison(run: Path, at_step: int) -> list[str]:
    return [
        "+callbacks.poison._target_=tests.test_scale.PoisonBatch",
        f"+callbacks.poison.at_step={at_step}",
        f"+callbacks.poison.dirpath={run}/checkpoints",
    ]


def test_ddp_two_cpu_processes_then_resume_in_one(tmp_path):
    run = tmp_path / "ddp"
    result = run_cli("train.py", *TINY_CLI, "trainer=ddp_cpu", f"hydra.run.dir={run}", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    # Batch is per device: 16 x 2 processes.
    assert result.stdout.count("effective batch 32 (16 per device x 2 devices x 1 nodes x 1 accumulation)") == 1
    # Rank zero alone writes: one set of checkpoints and grids.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step_000002.ckpt",
        "step_000004.ckpt",
    ]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])  # no DDP wrapper prefix

    resumed = tmp_path / "single"
    run_train(resumed, [f"ckpt_path={run}", "trainer.max_steps=6", *NO_GRIDS])
    assert read_checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_bf16_mixed_on_cpu_trains(tmp_path):
    run = tmp_path / "run"
    _, val_loss = run_train(run, ["trainer.precision=bf16-mixed", "trainer.max_steps=6", *NO_GRIDS])
    assert val_loss is not None and 0 < val_loss < 10
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.startswith(NET_PREFIX))  # fp32 master weights
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    metrics = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    losses = [
        float(r.split(",")[header.index("train/loss")]) for r in metrics[1:] if r.split(",")[header.index("train/loss")]
    ]
    assert len(losses) == 6 and all(0 < x < 10 for x in losses)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3;") as info:
        run_train(run, [*_poison(run, at_step=2), "trainer.max_steps=6", *NO_GRIDS])
    # The edge prints it as one line naming the step.
    assert user_error_message(info.value).startswith("non-finite loss at step 3; stopped before updating")
    ckpts = {p: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")}
    assert sorted(p.name for p in ckpts) == ["last.ckpt", "step_000002.ckpt"]
    assert PoisonBatch.SNAPSHOT == ckpts  # byte for byte what was there before the bad step
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_nonfinite_skip_mode_drops_and_counts_the_step(tmp_path):
    run = tmp_path / "run"
    run_train(run, [*_poison(run, at_step=2), "module.nonfinite=skip", *NO_GRIDS])
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    # The skipped step left AdamW's moments alone: 3 real updates, not 4.
    assert all(int(s["step"]) == 3 for s in ckpt["optimizer_states"][0]["state"].values())


def test_speed_options_train_and_keep_plain_checkpoints(tmp_path, caplog):
    caplog.set_level("INFO")
    run = tmp_path / "run"
    options = [
        "trainer.accumulate_grad_batches=2",
        "optim.optimizer.fused=true",
        "module.channels_last=true",
        "model.gradient_checkpointing=true",
        "data.num_workers=1",
        *NO_GRIDS,
    ]
    cfg, _ = run_train(run, options)
    lr = cfg.optim.lr  # the default's
    assert f"effective batch 32 (16 per device x 1 devices x 1 nodes x 2 accumulation), lr {lr}" in caplog.text
    hparams = yaml.safe_load((run / "csv" / "version_0" / "hparams.yaml").read_text())
    assert hparams["effective_batch_size"] == 32 and hparams["optim"]["lr"] == lr
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    plain = UNet(**DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt").net.config)
    assert set(sub_state_dict(ckpt["state_dict"], NET_PREFIX)) == set(plain.state_dict())


def test_compile_keeps_the_networks_state_dict_keys():
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), norm_groups=4)
    module = DiffusionModule(model=DiffusionModel(net=net, process=NoiseSchedule(num_steps=10)), compile=True)
    assert all(k.startswith((NET_PREFIX, "val_")) and "_orig_mod" not in k for k in module.state_dict())
    assert module.compiled_forward is not net and "compiled_forward" not in dict(module.named_children())


def test_bad_nonfinite_option_is_named():
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), norm_groups=4)
    with pytest.raises(ValueError, match="module.nonfinite='ignore' is not one of"):
        DiffusionModule(model=DiffusionModel(net=net, process=NoiseSchedule(num_steps=10)), nonfinite="ignore")


def run_tiny_multirun(sweep: Path, *overrides: str):
    """`python train.py -m <overrides>` of tiny 2-step CPU runs into `sweep`; the finished process."""
    searched = any(o.startswith(("process=", "hparams_search=")) for o in overrides)  # the sweep picks process=
    return run_cli(
        "train.py",
        "-m",
        *(o for o in TINY_CLI if not (searched and o.startswith("process"))),
        "trainer=cpu",
        "trainer.max_steps=2",
        *NO_GRIDS,
        *overrides,
        f"hydra.sweep.dir={sweep}",
        timeout=240,
    )


def tiny_multirun(sweep: Path, *overrides: str) -> list[float]:
    """run_tiny_multirun, which must succeed; each job's optimized metric."""
    result = run_tiny_multirun(sweep, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = "optimized_metric val/loss = "
    return [float(line[len(prefix) :]) for line in result.stdout.splitlines() if line.startswith(prefix)]


def test_multirun_runs_every_combination_in_its_own_folder(tmp_path):
    sweep = tmp_path / "sweep"
    values = tiny_multirun(sweep, "process=linear,cosine", "optim.lr=0.001", "logger=csv")
    assert (sweep / "multirun.yaml").exists()
    for job, kind in [("0", "linear"), ("1", "cosine")]:
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert f"process={kind}" in overrides and "optim.lr=0.001" in overrides
        assert read_checkpoint(sweep / job / "checkpoints" / "last.ckpt")["diffusion"]["process"]["kind"] == kind
        assert "val/loss" in (sweep / job / "csv" / "version_0" / "metrics.csv").read_text()
    assert len(values) == 2 and all(v > 0 for v in values)


def test_requeued_slurm_job_resumes_in_its_own_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_train(run, NO_GRIDS)
    # A requeued job (SLURM_RESTART_COUNT >= 1) starts again with the same command and the same folder.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_train(run, ["trainer.max_steps=6", *NO_GRIDS])
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert (run / "checkpoints" / "step_000006.ckpt").exists()


def test_slurm_run_folder_is_keyed_by_job_id(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    hydra_cfg = OmegaConf.load(CONF / "hydra" / "default.yaml")
    root = OmegaConf.create({"paths": {"runs_dir": "/runs"}, "task_name": "train", "hydra": hydra_cfg})
    assert root.hydra.run.dir == "/runs/train/4242"


@pytest.mark.parametrize("name", ["cifar10_ddpm", "celeba64"])
def test_experiments_compose(tmp_path, name):
    """The papers' settings (tests/test_recipes.py trains every recipe a few steps)."""
    cfg = compose_train(tmp_path / "run", [f"experiment={name}"], tiny=False)
    assert cfg.model.base_channels == 128 and cfg.model.dropout == 0.1
    assert cfg.process.kind == "linear" and cfg.optim.lr == 2e-4 and cfg.data.batch_size == 128
    assert cfg.data.flip is True and cfg.trainer.max_steps in (800_000, 500_000)


def test_optuna_sweeper_config_composes(tmp_path):
    cfg = compose_train(tmp_path / "run", ["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == {"optim.lr", "optim.warmup_steps", "process", "process.prediction"}
    assert cfg.optimized_metric == "val/loss"


def test_optuna_sweep_runs_trials_and_reports_the_best(tmp_path):
    """`python train.py -m hparams_search=optuna` (the plugin comes with .[dev]): 2 trials, each a run folder."""
    sweep = tmp_path / "sweep"
    values = tiny_multirun(sweep, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    assert len(values) == 2 and all(v > 0 for v in values)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optim.lr", "optim.warmup_steps", "process", "process.prediction"}
    assert best["best_value"] == pytest.approx(min(values))
    for job in ("0", "1"):
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("optim.lr=") for o in overrides)  # the trial's sampled values
        assert read_checkpoint(sweep / job / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_slurm_launcher_config_composes(tmp_path):
    cfg = compose_train(tmp_path / "run", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4 and launcher.nodes == 1
    assert launcher.max_num_timeout > 0


# --- GPU only ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda
def test_compile_on_cuda_trains_and_saves_plain_keys(tmp_path):
    run = tmp_path / "run"
    run_train(
        run,
        ["trainer=gpu", "module.compile=true", "module.channels_last=true", "optim.optimizer.fused=true", *NO_GRIDS],
    )
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and not any("_orig_mod" in k for k in ckpt["state_dict"])
    DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt")  # strict key match against a fresh network


@pytest.mark.gpu
@cuda
def test_16_mixed_on_cuda_trains(tmp_path):
    run = tmp_path / "run"
    _, val_loss = run_train(run, ["trainer=gpu", "trainer.precision=16-mixed", "trainer.max_steps=6", *NO_GRIDS])
    assert val_loss is not None and 0 < val_loss < 10
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_module_without_trainer_still_steps():
    """training_step outside a Trainer (research use) logs nothing and returns the loss."""
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), norm_groups=4)
    module = DiffusionModule(
        model=DiffusionModel(net=net, process=NoiseSchedule(num_steps=10)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    loss = module.training_step((torch.zeros(2, 1, 8, 8), torch.full((2,), -1)), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
