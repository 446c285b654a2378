"""Train a diffusion model: python train.py [model=... data=... schedule=... trainer.max_steps=...].

Composes the Hydra config in conf/, builds the datamodule, network, schedule, LightningModule, callbacks,
loggers and Trainer from it, and fits. Every run writes into its own folder (the resolved config in
.hydra/, checkpoints/, samples/, logs). Returns the metric named by `optimized_metric` for sweepers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.errors import exit_on_user_error


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: str, key: str = "ckpt_path") -> str | None:
    """ckpt_path as given: a .ckpt file, a run folder (its checkpoints/last.ckpt), or "last" (newest under runs_dir).

    `key` is the config key named in error messages (ckpt_path, init_from, ...).
    """
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        found = sorted(Path(runs_dir).rglob("checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"{key}=last: no checkpoints/last.ckpt under {runs_dir}")
        return str(found[-1])
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"{key}={ckpt_path}: {path} does not exist")
    return str(path)


def occupied(output_dir: Path) -> str | None:
    """Why a NEW run may not start in `output_dir` (it already holds checkpoints), or None."""
    if any((output_dir / "checkpoints").glob("*.ckpt")):
        return (
            f"run folder {output_dir} already holds checkpoints; resume with ckpt_path={output_dir} "
            "or choose another hydra.run.dir"
        )
    return None


class RunFolderGuard(Callback):
    """Refuses a new run into a folder that holds checkpoints before Hydra writes anything there.

    Hydra writes .hydra/config.yaml, hydra.yaml and overrides.yaml when the job starts, before `train` runs:
    `on_run_start` comes first. A callback's exceptions only become warnings in Hydra, so this one exits.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if config.get("ckpt_path") not in (None, "") or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) >= 1:
            return  # resuming writes into its own folder
        message = occupied(Path(str(config.hydra.run.dir)).absolute())
        if message:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)


def check_resume(ckpt_path: str, ckpt: dict, net, schedule) -> None:
    """A one-line ValueError when checkpoint `ckpt` (at ckpt_path) cannot be resumed with `net` and `schedule`.

    Its weights must fit the network the config builds; the message names the config keys where the
    checkpoint's own description differs from the config (or, if none does, the tensors that differ).
    Config changes that keep the weights' shapes (e.g. model.gradient_checkpointing) are allowed and printed.
    """
    from diffusion.checkpoint import describe, description_differences, net_state_dict, weights_mismatch

    differences = description_differences(ckpt["diffusion"], describe(net, schedule))
    shown = [f"{k}={saved} where the config has {now}" for k, saved, now in differences]
    mismatch = weights_mismatch(net, net_state_dict(ckpt, use_ema=False)[0])
    if mismatch:
        more = f" (and {len(shown) - 1} more: {', '.join(k for k, _, _ in differences[1:])})" if len(shown) > 1 else ""
        what = f"was trained with {shown[0]}{more}" if shown else f"does not fit the model: {mismatch}"
        raise ValueError(
            f"ckpt_path={ckpt_path} {what}; resume with that run's config (its .hydra/overrides.yaml), or start "
            "a new run from its weights with init_from="
        )
    if shown:
        print(f"resuming {ckpt_path} with config changes: {'; '.join(shown)}")


def slurm_requeue_path(output_dir: Path) -> str | None:
    """The checkpoint a requeued SLURM job resumes from: the newer of Lightning's hpc_ckpt_N.ckpt (written on
    the requeue signal) and checkpoints/last.ckpt in its own run folder; None when this is not a requeue."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    found = [*output_dir.glob("hpc_ckpt_*.ckpt"), *output_dir.glob("checkpoints/last.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def effective_batch(batch_size: int, trainer) -> tuple[int, str]:
    """Images per optimizer step across all processes, and how it is made up."""
    devices, nodes, accumulate = trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
    total = batch_size * devices * nodes * accumulate
    return total, f"{batch_size} per device x {devices} devices x {nodes} nodes x {accumulate} accumulation"


def train(cfg: DictConfig) -> float | None:
    """Build everything from `cfg` and fit; returns cfg.optimized_metric's last value (if logged)."""
    import lightning as L

    from diffusion.checkpoint import read_checkpoint
    from diffusion.finetune import init_from_checkpoint

    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.runs_dir)
    if ckpt_path is None:
        ckpt_path = slurm_requeue_path(output_dir)  # a preempted SLURM job continues in its own folder
    resumed = read_checkpoint(ckpt_path) if ckpt_path is not None else None  # a clear error now, not in Lightning
    if resumed is None and occupied(output_dir):
        raise FileExistsError(occupied(output_dir))
    init_path = resolve_ckpt_path(cfg.get("init_from"), cfg.paths.runs_dir, key="init_from")
    init = cfg.get("init") or {}
    if init.get("required") and init_path is None:
        raise ValueError("init_from is required (init.required=true, e.g. experiment=finetune): init_from=PATH")
    if init_path is not None:
        if ckpt_path is not None:
            raise ValueError(
                "init_from and ckpt_path exclude each other: ckpt_path resumes a run (optimizer, step), "
                "init_from starts a new one from a checkpoint's weights"
            )

    datamodule = instantiate(cfg.data)
    schedule = instantiate(cfg.schedule)
    net = instantiate(cfg.model)
    if resumed is not None:
        check_resume(ckpt_path, resumed, net, schedule)
    if init_path is not None:  # weights only: the optimizer and the step count start fresh (reads the file once)
        report = init_from_checkpoint(
            net,
            init_path,
            ignore_keys=list(init.get("ignore_keys") or []),
            strict=init.get("strict", True),
            use_ema=init.get("use_ema", True),
        )
        print(report.summary())
    module = instantiate(cfg.module, net=net, schedule=schedule, optimizer=instantiate(cfg.optim.optimizer))
    if init_path is not None and init.get("ema_from_init", True):
        module.ema_init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    batch, batch_parts = effective_batch(int(getattr(datamodule, "batch_size", cfg.data.get("batch_size", 0))), trainer)
    resolved["effective_batch_size"] = batch
    for logger in loggers:
        logger.log_hyperparams(resolved)
    n_params = sum(p.numel() for p in net.parameters())
    if trainer.is_global_zero:
        print(f"run folder: {output_dir}  ({type(net).__name__}, {n_params / 1e6:.2f}M parameters)")
        print(f"effective batch {batch} ({batch_parts}), lr {cfg.optim.get('lr')}, precision {trainer.precision}")

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    if trainer.is_global_zero:
        print(f"done at step {trainer.global_step}; run folder: {output_dir}")
    metric = cfg.get("optimized_metric")
    value = trainer.callback_metrics.get(metric) if metric else None
    value = float(value) if value is not None else None
    if trainer.is_global_zero and metric:
        print(f"optimized_metric {metric} = {value}")
    return value


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return exit_on_user_error(train, cfg)


if __name__ == "__main__":
    main()
