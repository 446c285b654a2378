"""RunReport: when training ends, the run's plots and its self-contained report.html (`diffusion.report`).

It runs in `on_fit_end`, which Lightning calls after every callback's `on_train_end` (the last sample grid, the
final FID) and after the loggers are finalized (metrics.csv holds the last rows). Rank zero only. The same report
is drawn for any run folder, finished or not, by `python report.py run=DIR`.
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from diffusion.report import write_report

log = logging.getLogger(__name__)


class RunReport(L.Callback):
    """Writes `<dirpath>/report.html` and `<dirpath>/report/*.png` at the end of `trainer.fit`.

    Args:
        dirpath: the run folder (the configs use `paths.output_dir`).
    """

    def __init__(self, *, dirpath: str) -> None:
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:  # debug=fdr logs nothing to plot
            return
        try:
            path = write_report(self.dirpath)
        except Exception as e:  # the run is done and saved: a report that fails must not turn it into a failure
            log.warning(f"callbacks.report: could not write the run's report ({type(e).__name__}: {e})")
            return
        log.info(f"report: {path}")
