"""Progress bar and learning-rate monitor that fit the configs' switches (`trainer.enable_progress_bar`, `logger=none`).

Lightning refuses a progress-bar callback when `trainer.enable_progress_bar=false`, and its
`LearningRateMonitor` raises when the run has no logger. These wrappers let `callbacks/default.yaml` list both
while those switches keep working.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info


def progress_bar(*, enabled: bool = True, refresh_rate: int = 1, leave: bool = False) -> L.Callback:
    """A TQDM progress bar updated every `refresh_rate` batches, or a no-op callback when `enabled` is false."""
    return TQDMProgressBar(refresh_rate=refresh_rate, leave=leave) if enabled else L.Callback()


class LearningRateMonitor(_LearningRateMonitor):
    """Lightning's monitor with the metrics under `train/` (`train/lr-AdamW`, `train/lr-AdamW-momentum`, ...);
    it turns itself off with one line when the run has no logger instead of raising."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.active = True

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if not trainer.loggers:
            self.active = False
            rank_zero_info("callbacks.lr_monitor: no logger (logger=none), so learning rates are not recorded")
            return
        super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if self.active:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if self.active:
            super().on_train_epoch_start(trainer, *args, **kwargs)

    def _extract_stats(self, trainer, interval: str) -> dict[str, float]:
        return {f"train/{k}": v for k, v in super()._extract_stats(trainer, interval).items()}
