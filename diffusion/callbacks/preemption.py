"""Save `last.ckpt` when a run is told to end, at the next step boundary: the cluster's warning, or a stop signal.

SLURM sends a signal some time before a job's time limit or preemption (the submitit launcher asks for
`--signal=USR2@<signal_delay_s>`). Saving inside the signal handler would write whatever half-done step the
process was in, so the handler only raises a flag; the next `on_train_batch_end` (every rank at the same step,
the flag agreed under DDP) writes `checkpoints/last.ckpt`, the file `ckpt_path=<run folder>` and a requeued job
resume from. Then the handler that was there before ours runs (submitit's: it requeues the job and exits); with
none (a local run), training stops cleanly instead.

A stop signal (SIGTERM from `kill`, `scancel`, `docker stop` or Kubernetes; SIGINT from Ctrl-C) is saved the same
way, and then the process ends with exit code 128 + the signal's number (143, 130), as a process killed by it
would, so that schedulers and scripts know the run did not finish. Lightning's own SIGTERM handling (a clean exit
with code 0 and nothing saved) is replaced while training runs. A second stop signal ends the process at once.
"""

from __future__ import annotations

import os
import signal as signals
from pathlib import Path

from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion.callbacks.checkpoints import LAST, ResumeCheckpoint, checkpointing_off
from diffusion.errors import ConfigError


class Stopped(SystemExit):
    """Ends the process after a stop signal's checkpoint: its code is 128 + the signal's number."""


def signal_number(name: str, key: str) -> int:
    """The number of signal `name` ("SIGTERM"), or a one-line ConfigError naming config key `key`."""
    if not hasattr(signals, name) or not name.startswith("SIG") or name.startswith("SIG_"):
        raise ConfigError(f"{key}={name!r} is not a signal name such as 'SIGUSR2'")
    return int(getattr(signals, name))


class PreemptionCheckpoint(Checkpoint):
    """On `signal`, write `dirpath/last.ckpt` at the next step boundary, then hand the signal on (or stop); on one
    of `stop_signals`, write it and end the process with exit code 128 + the signal's number.

    A `Checkpoint`, so that Lightning calls it after the other callbacks (as the checkpoint callbacks): its save
    holds the EMA of the step it is written at, as a periodic last.ckpt does, and the resume is exact.

    Args:
        dirpath: the run's checkpoint folder.
        signal: the signal's name, e.g. "SIGUSR2"; null: submitit's (`SIG` + `$SUBMITIT_PREEMPT_SIGNAL`, USR2).
        stop_signals: the signals that end the run (default SIGTERM and SIGINT); [] leaves them to Lightning.
        check_every_n_steps: under DDP, how often the ranks agree on whether a signal came (one small
            collective then, not every step); a single process looks every step.
    """

    def __init__(
        self,
        *,
        dirpath: str,
        signal: str | None = None,
        stop_signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGINT"),
        check_every_n_steps: int = 10,
    ) -> None:
        name = signal or "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        self.signum = signal_number(name, "callbacks.preemption.signal")
        self.stop_signums = [signal_number(s, "callbacks.preemption.stop_signals") for s in stop_signals or ()]
        if self.signum in self.stop_signums:
            raise ConfigError(f"callbacks.preemption.signal={name} is also in callbacks.preemption.stop_signals")
        if check_every_n_steps < 1:
            raise ConfigError(f"callbacks.preemption.check_every_n_steps={check_every_n_steps} must be >= 1")
        self.dirpath = Path(dirpath)
        self.check_every_n_steps = check_every_n_steps
        self.received = False
        self.stop_signal: int | None = None  # the stop signal that came, if one did
        self._previous = None
        self._installed = False
        self._stop_previous: dict[int, object] = {}  # the stop signals' handlers ours replaced while training

    def _on_signal(self, signum, frame) -> None:
        self.received = True  # only a flag: the save happens at the next step boundary

    def _on_stop(self, signum, frame) -> None:
        if self.stop_signal is not None:  # the second one: end now, as the signal does by default
            signals.signal(signum, signals.SIG_DFL)
            signals.raise_signal(signum)
        self.stop_signal = signum  # only a flag, as for the preemption signal

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

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning set its SIGTERM handler (a clean exit, code 0, nothing saved); its teardown, which comes
        # after on_train_end and on_exception, puts back the handlers of before the run.
        self.stop_signal = None
        for signum in self.stop_signums:
            try:
                self._stop_previous[signum] = signals.signal(signum, self._on_stop)
            except ValueError:  # not the main thread
                return

    def _restore_stop_handlers(self) -> None:
        for signum, previous in self._stop_previous.items():
            signals.signal(signum, previous if previous is not None else signals.SIG_DFL)
        self._stop_previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_stop_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_stop_handlers()
        # Before training started, Lightning handled the stop signal itself: Ctrl-C, or SIGTERM (in the sanity check)
        early = {signals.SIGINT: KeyboardInterrupt, signals.SIGTERM: SIGTERMException}
        for signum, kind in early.items():
            if signum in self.stop_signums and isinstance(exception, kind) and trainer.global_step == 0:
                rank_zero_info(
                    f"{signals.Signals(signum).name}: stopped before the first training step (nothing to save)"
                )
                raise Stopped(128 + signum) from exception

    def _due(self, trainer) -> tuple[bool, bool]:
        """Whether to save for the preemption signal, and whether for a stop signal (agreed by every rank)."""
        if trainer.world_size == 1:
            return self.received, self.stop_signal is not None
        if trainer.global_step % self.check_every_n_steps:
            return False, False
        reduce = trainer.strategy.reduce_boolean_decision
        return bool(reduce(self.received, all=False)), bool(reduce(self.stop_signal is not None, all=False))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        preempted, stopped = self._due(trainer)
        if not (preempted or stopped):
            return
        self.received = False
        signum = (self.stop_signal or signals.SIGTERM) if stopped else self.signum
        path = self.dirpath / LAST
        if not checkpointing_off(trainer):
            resume = next((c for c in trainer.callbacks if isinstance(c, ResumeCheckpoint) and c.path == path), None)
            if resume is not None:  # its save records the step, so it does not write last.ckpt again at train end
                resume.save(trainer)
            else:
                trainer.save_checkpoint(path)
            saved = f"saved {path} at step {trainer.global_step}"
        else:
            saved = f"stopped at step {trainer.global_step} (trainer.fast_dev_run: no checkpoint)"
        name = signals.Signals(signum).name
        if stopped:
            rank_zero_info(f"{name}: {saved}; resume with ckpt_path={self.dirpath.parent}")
            raise Stopped(128 + signum)  # what a shell reports for a process the signal ended
        rank_zero_info(f"{name}: {saved}")
        trainer.should_stop = True  # a local run ends here; under submitit, rank zero's requeue ends the job
        if callable(self._previous):
            self._previous(self.signum, None)  # submitit: requeue the job and exit (rank zero)
