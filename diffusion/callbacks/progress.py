"""A progress bar that fits the config's switch `trainer.enable_progress_bar`.

Lightning refuses a progress-bar callback when `trainer.enable_progress_bar=false`; this factory lets
`callbacks/default.yaml` list one while that switch keeps working. `bar_enabled` lets the run's other long steps
(FID, data caches) follow the same switch. (The learning rate is logged by the module
as `train/lr`, so there is no learning-rate monitor callback.)
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


def bar_enabled(trainer: L.Trainer | None) -> bool:
    """Whether a step of `trainer`'s run may draw a progress bar (`diffusion.progress`): it has a progress-bar
    callback, which `trainer.enable_progress_bar=false` removes. No trainer (a datamodule used alone): yes."""
    return trainer is None or getattr(trainer, "progress_bar_callback", None) is not None  # (a test's stand-in: no)


def progress_bar(*, enabled: bool = True, refresh_rate: int = 1, leave: bool = False) -> L.Callback:
    """A TQDM progress bar updated every `refresh_rate` batches, or a no-op callback when `enabled` is false."""
    return TQDMProgressBar(refresh_rate=refresh_rate, leave=leave) if enabled else L.Callback()
