"""Draw a run's report: python report.py run=DIR (a run folder, or run=last).

Writes the plots of its CSV logs (losses, per-noise-level validation loss, learning rate, FID/KID, images/s) into
`DIR/report/` and one self-contained `DIR/report.html` (images inlined; opens offline), the same report that
callbacks.report writes when training ends. Works on a running or copied run folder too. The work is done by
`diffusion.report`; this file is only the command line.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from diffusion.errors import exit_on_user_error

log = logging.getLogger(__name__)


def report(cfg: DictConfig):
    from diffusion.report import find_run, write_report

    path = write_report(find_run(str(cfg.run), runs_dir=cfg.paths.runs_dir))
    log.info(f"report: {path} (plots in {path.parent / 'report'})")
    return path


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(report, cfg)


if __name__ == "__main__":
    main()
