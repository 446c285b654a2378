"""What resumes a run and what is kept: a `last.ckpt` refreshed often, and snapshots with a retention count.

A preempted run loses what it trained since its last checkpoint, so the checkpoint a run resumes from
(`checkpoints/last.ckpt`, what `ckpt_path=<run folder>` and `ckpt_path=last` read) is refreshed every
`every_n_steps` optimizer steps or every `every_n_minutes` minutes, whichever comes first, and when training
ends (also when `trainer.max_steps` is not a multiple of the period). Snapshots to keep (`step_XXXXXX.ckpt`, for
comparing or going back) come from `Snapshots`, a ModelCheckpoint every N steps that keeps the newest
`keep_last` of them. Both write through the Trainer's checkpoint IO (atomic renames, see `checkpoint_io.py`).
Neither writes under `trainer.fast_dev_run` (debug=fdr), as Lightning's own checkpoint callbacks do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from diffusion.errors import ConfigError

LAST = "last.ckpt"


def checkpointing_off(trainer: L.Trainer) -> bool:
    """Whether this run writes no checkpoints: fast_dev_run (Lightning's ModelCheckpoint skips then too)."""
    return bool(trainer.fast_dev_run)


class ResumeCheckpoint(Checkpoint):
    """Writes `dirpath/last.ckpt` every `every_n_steps` steps or `every_n_minutes` minutes, and at the end.

    Args:
        dirpath: the run's checkpoint folder.
        every_n_steps: optimizer steps between refreshes; 0 or null for none by count.
        every_n_minutes: wall-clock minutes between refreshes; 0 or null for none by time. The clock is read on
            rank zero every `check_every_n_steps` steps, and its decision is broadcast under DDP (one small
            collective then, not every step).
        check_every_n_steps: how often the clock is read.
        clock: seconds, monotonic (default `time.monotonic`; injectable for tests).
    """

    def __init__(
        self,
        *,
        dirpath: str,
        every_n_steps: int | None = 1000,
        every_n_minutes: float | None = 10.0,
        check_every_n_steps: int = 10,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 0:
            raise ConfigError(f"callbacks.resume_checkpoint.every_n_steps={every_n_steps} must be >= 0 (0: off)")
        if every_n_minutes is not None and every_n_minutes < 0:
            raise ConfigError(f"callbacks.resume_checkpoint.every_n_minutes={every_n_minutes} must be >= 0 (0: off)")
        if check_every_n_steps < 1:
            raise ConfigError(f"callbacks.resume_checkpoint.check_every_n_steps={check_every_n_steps} must be >= 1")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps or 0
        self.every_n_seconds = 60.0 * (every_n_minutes or 0.0)
        self.check_every_n_steps = check_every_n_steps
        self.clock = clock or time.monotonic
        self.last_saved_step: int | None = None
        self.last_model_path = ""  # ModelCheckpoint's name for it, read by loggers
        self._last_save_time: float | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def _due_by_time(self, trainer: L.Trainer) -> bool:
        if not self.every_n_seconds or trainer.global_step % self.check_every_n_steps:
            return False
        due = self._last_save_time is not None and self.clock() - self._last_save_time >= self.every_n_seconds
        if trainer.world_size > 1:  # every rank must take part in the save: rank zero's clock decides
            due = bool(trainer.strategy.broadcast(due, src=0))
        return due

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self.last_saved_step = trainer.global_step
        self._last_save_time = self.clock()
        self.last_model_path = str(self.path)
        for logger in trainer.loggers:  # as ModelCheckpoint does: W&B records the path (run summary)
            logger.after_save_checkpoint(proxy(self))

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_save_time = self.clock()  # the time period counts from the start (or the resume)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step == self.last_saved_step or checkpointing_off(trainer):
            return  # no optimizer step since the last save (gradient accumulation, or nothing yet)
        # The final step is saved here, not in on_train_end: after an epoch's last batch Lightning has already
        # advanced its loop counters by on_train_end, and a checkpoint written then resumes one batch short.
        final = trainer.max_steps != -1 and step >= trainer.max_steps
        if final or (self.every_n_steps and step % self.every_n_steps == 0) or self._due_by_time(trainer):
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and trainer.global_step != self.last_saved_step and not checkpointing_off(trainer):
            self.save(trainer)

    def state_dict(self) -> dict:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_saved_step = state_dict.get("last_saved_step")


class Snapshots(ModelCheckpoint):
    """`step_XXXXXX.ckpt` every `every_n_train_steps` steps, keeping the newest `keep_last` (-1 or null: all).

    A ModelCheckpoint ranked by step, newest first; `last.ckpt` is `ResumeCheckpoint`'s, not this one's.
    """

    def __init__(self, *, dirpath: str, every_n_train_steps: int = 1000, keep_last: int | None = None) -> None:
        if keep_last is not None and keep_last != -1 and keep_last < 1:
            raise ConfigError(f"callbacks.model_checkpoint.keep_last={keep_last} must be >= 1, or -1/null to keep all")
        super().__init__(
            dirpath=dirpath,
            filename="step_{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_train_steps,
            save_top_k=-1 if keep_last in (None, -1) else keep_last,
            monitor="step",
            mode="max",
            save_last=False,
        )
