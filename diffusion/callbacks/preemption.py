"""Save `last.ckpt` when the cluster warns that the job is about to end, at the next step boundary.

SLURM sends a signal some time before a job's time limit or preemption (the submitit launcher asks for
`--signal=USR2@<signal_delay_s>`). Saving inside the signal handler would write whatever half-done step the
process was in, so the handler only raises a flag; the next `on_train_batch_end` (every rank at the same step,
the flag agreed under DDP) writes `checkpoints/last.ckpt`, the file `ckpt_path=<run folder>` and a requeued job
resume from. Then the handler that was there before ours runs (submitit's: it requeues the job and exits); with
none (a local run), training stops cleanly instead.
"""

from __future__ import annotations

import os
import signal as signals
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from diffusion.callbacks.checkpoints import LAST, ResumeCheckpoint
from diffusion.errors import ConfigError


class PreemptionCheckpoint(L.Callback):
    """On `signal`, write `dirpath/last.ckpt` at the next step boundary, then hand the signal on (or stop).

    Args:
        dirpath: the run's checkpoint folder.
        signal: the signal's name, e.g. "SIGUSR2"; null: submitit's (`SIG` + `$SUBMITIT_PREEMPT_SIGNAL`, USR2).
        check_every_n_steps: under DDP, how often the ranks agree on whether a signal came (one small
            collective then, not every step); a single process looks every step.
    """

    def __init__(self, *, dirpath: str, signal: str | None = None, check_every_n_steps: int = 10) -> None:
        name = signal or "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        if not hasattr(signals, name) or not name.startswith("SIG"):
            raise ConfigError(f"callbacks.preemption.signal={name!r} is not a signal name such as 'SIGUSR2'")
        if check_every_n_steps < 1:
            raise ConfigError(f"callbacks.preemption.check_every_n_steps={check_every_n_steps} must be >= 1")
        self.dirpath = Path(dirpath)
        self.signum = getattr(signals, name)
        self.check_every_n_steps = check_every_n_steps
        self.received = False
        self._previous = None
        self._installed = False

    def _on_signal(self, signum, frame) -> None:
        self.received = True  # only a flag: the save happens at the next step boundary

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self._installed:
            return
        try:
            self._previous = signals.signal(self.signum, self._on_signal)
        except ValueError:  # not the main thread: signals cannot be handled here
            return
        self._installed = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._installed:
            signals.signal(self.signum, self._previous if self._previous is not None else signals.SIG_DFL)
            self._installed = False

    def _due(self, trainer) -> bool:
        if trainer.world_size == 1:
            return self.received
        if trainer.global_step % self.check_every_n_steps:
            return False
        return bool(trainer.strategy.reduce_boolean_decision(self.received, all=False))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._due(trainer):
            return
        self.received = False
        path = self.dirpath / LAST
        resume = next((c for c in trainer.callbacks if isinstance(c, ResumeCheckpoint) and c.path == path), None)
        if resume is not None:  # its save records the step, so it does not write last.ckpt again at train end
            resume.save(trainer)
        else:
            trainer.save_checkpoint(path)
        rank_zero_info(f"{signals.Signals(self.signum).name}: saved {path} at step {trainer.global_step}")
        trainer.should_stop = True  # a local run ends here; under submitit, rank zero's requeue ends the job
        if callable(self._previous):
            self._previous(self.signum, None)  # submitit: requeue the job and exit (rank zero)
