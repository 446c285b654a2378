"""Experiment loggers built for the run folder: W&B that never prompts or hangs without credentials.

`wandb_logger` returns Lightning's `WandbLogger` writing into `<run folder>/wandb`. With credentials
(`WANDB_API_KEY`, or an api.wandb.ai entry in ~/.netrc from `wandb login`) it runs online; with none, or with
`WANDB_MODE=offline`, it runs offline and prints one line saying how to upload the run later with `wandb sync`.
Metrics, the resolved config (train.py's `log_hyperparams`), sample grids and the paths of saved checkpoints
(in the run summary, `checkpoint/last` and `checkpoint/latest`) go to W&B; checkpoints themselves are uploaded
only with `log_model=true`. The run's `tags` (train.yaml) are W&B tags; `log_tags` also shows them in TensorBoard
(a text entry), and every logger has them in its hyperparameters. A run folder keeps one W&B run: its id is kept
in `<run folder>/wandb/run_id.txt`, so a resumed run (`ckpt_path=`, a SLURM requeue) continues the same W&B run,
online and offline.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from diffusion.extras import run_tags
from diffusion.files import atomic_write

log = logging.getLogger(__name__)


def tensorboard_logger(**kwargs) -> TensorBoardLogger:
    """Lightning's TensorBoardLogger(**kwargs) (logger=tensorboard), or one line naming the extra to install."""
    from diffusion.optional import require

    require("tensorboard", feature="logger=tensorboard")
    return TensorBoardLogger(**kwargs)


def wandb_credentials_found() -> bool:
    """Whether W&B could log in without asking: WANDB_API_KEY, or a ~/.netrc (NETRC) entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_run_id(save_dir: str | Path) -> str:
    """The W&B run id of the run folder `save_dir`: the one in `wandb/run_id.txt`, or a new one written there.

    Only rank zero writes (it is the rank that logs); other ranks read what is there.
    """
    path = Path(save_dir) / "wandb" / "run_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], what W&B's own ids look like
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(run_id.encode()))
    return run_id


class RunFolderWandbLogger(WandbLogger):
    """WandbLogger that also records where checkpoints were saved (run summary `checkpoint/...`)."""

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        self._record_checkpoint_paths(checkpoint_callback)

    @rank_zero_only
    def _record_checkpoint_paths(self, checkpoint_callback) -> None:
        saved = [Path(p) for p in getattr(checkpoint_callback, "best_k_models", {}) if Path(p).exists()]
        # last.ckpt is ResumeCheckpoint's (it reports it as last_model_path); for Snapshots, the same folder's
        last = getattr(checkpoint_callback, "last_model_path", "") or Path(checkpoint_callback.dirpath, "last.ckpt")
        paths = {
            "checkpoint/last": last,
            "checkpoint/latest": max(saved, key=lambda p: p.stat().st_mtime) if saved else "",
            "checkpoint/best": getattr(checkpoint_callback, "best_model_path", ""),
        }
        self.experiment.summary.update({k: str(v) for k, v in paths.items() if v})


def wandb_logger(
    *,
    save_dir: str,
    project: str = "diffusion",
    name: str | None = None,
    entity: str | None = None,
    tags: list[str] | None = None,
    log_model: bool | str = False,
    offline: bool | None = None,
    **kwargs,
) -> WandbLogger:
    """A WandbLogger in `save_dir` (the run folder); `offline=None` decides from the environment (see module doc)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if offline is None:
        offline = mode in ("offline", "dryrun") or (mode != "disabled" and not wandb_credentials_found())
    if offline and log_model:
        log_model = False  # nothing can be uploaded offline; `wandb sync` uploads the run (not the checkpoints)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if "id" not in kwargs and "version" not in kwargs:  # resuming in this run folder: the same W&B run
        kwargs["id"] = wandb_run_id(save_dir)
        kwargs.setdefault("resume", "allow")
    if offline:
        os.environ["WANDB_MODE"] = "offline"  # also for anything else that calls wandb in this process
        reason = (
            "WANDB_MODE=offline"
            if mode in ("offline", "dryrun")
            else "no W&B credentials (WANDB_API_KEY / wandb login)"
        )
        rank_zero_only(log.info)(
            f"wandb: {reason}: logging offline; upload later with: wandb sync {Path(save_dir) / 'wandb'}/offline-run-*"
        )
    return RunFolderWandbLogger(
        save_dir=save_dir,
        project=project,
        name=name,
        entity=entity,
        tags=run_tags(tags),
        log_model=log_model,
        offline=offline,
        **kwargs,
    )


def log_tags(loggers, tags: list[str]) -> None:
    """Show the run's tags where a logger has a place for them beyond its hyperparameters: TensorBoard's text tab.

    W&B takes them when the run starts (`wandb_logger(tags=...)`); CSV and TensorBoard have them in hparams.yaml.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    if not tags:
        return
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("tags", ", ".join(tags), global_step=0)
