"""A run's report (diffusion/report.py, callbacks.report, report.py): plots from the CSV logs and the sample grids,
and one self-contained HTML page."""

from __future__ import annotations

import base64
import re

import pytest
from PIL import Image

from diffusion.errors import MissingPathError
from diffusion.report import read_metrics, sample_grids, write_report
from tests.conftest import CONF

HEADER = "epoch,step,train/loss,train/lr,train/images_per_sec,val/loss,val/loss_t0-9,val/loss_t10-19,val/fid,val/kid"


def fake_run(run, *, versions=2):
    """A run folder as train.py leaves it: metrics.csv of a run resumed once (version_1 repeats step 20) and
    sample grids every 10 steps."""
    rows = {
        0: ["0,0,1.0,0.001,50,,,,,", "0,10,0.8,0.002,60,0.9,1.5,0.3,,", "0,20,0.7,0.002,61,,,,,"],
        1: ["0,20,0.6,0.002,62,0.5,1.0,0.2,80.0,0.05", "0,30,0.5,0.001,63,,,,,"],
    }
    for v in range(versions):
        folder = run / "csv" / f"version_{v}"
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text("\n".join([HEADER, *rows[v]]) + "\n")
    (run / "samples").mkdir()
    for step in range(10, 110, 10):
        Image.new("L", (40, 40), step).save(run / "samples" / f"step_{step:06d}.png")


def test_metrics_merge_resumed_versions(tmp_path):
    fake_run(tmp_path)
    series = read_metrics(tmp_path)
    assert series["train/loss"] == [(0, 1.0), (10, 0.8), (20, 0.6), (30, 0.5)]  # the resume's step 20 wins
    assert series["val/loss"] == [(10, 0.9), (20, 0.5)]
    assert series["val/fid"] == [(20, 80.0)] and "epoch" not in series and "step" not in series
    steps = [s for s, _ in sample_grids(tmp_path, limit=4)]
    assert steps == [10, 40, 70, 100]  # evenly spaced, the first and the last included


def test_report_writes_plots_and_a_self_contained_page(tmp_path):
    fake_run(tmp_path)
    page = write_report(tmp_path)
    assert page == tmp_path / "report.html"
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == sorted(
        f"{n}.png" for n in ("loss", "val_loss_buckets", "lr", "fid_kid", "images_per_sec", "samples")
    )
    for png in (tmp_path / "report").glob("*.png"):
        with Image.open(png) as im:
            if png.name == "samples.png":  # 8 grids of 40 px, 8 px apart, under a 16 px line of step labels
                assert im.size == (8 * 40 + 7 * 8, 40 + 16)
            else:
                assert im.width > 300 and im.height > 200
    text = page.read_text()
    sources = re.findall(r'src="([^"]+)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # nothing to fetch: offline
    assert not re.search(r"(href|src)=\"(http|/|\.)", text)
    assert len(sources) == 5 + 8  # the five plots and a strip of 8 of the 10 grids
    first = base64.b64decode(sources[5].split(",", 1)[1])
    assert first == (tmp_path / "samples" / "step_000010.png").read_bytes()
    assert "val/loss_t10-19" in text and "step 100" in text


def test_report_without_csv_says_where_the_curves_are(tmp_path):
    fake_run(tmp_path, versions=0)
    text = write_report(tmp_path).read_text()
    assert "No metrics.csv" in text and "logger=wandb" in text
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["samples.png"]
    with pytest.raises(MissingPathError, match="run=.*does not exist"):
        write_report(tmp_path / "nope")


def test_report_entry_point_for_a_run_folder(tmp_path):
    """python report.py run=DIR (in-process on the composed config), and run=last."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import report

    run = tmp_path / "outputs" / "train" / "2026-01-01_12-00-00"
    run.mkdir(parents=True)
    fake_run(run)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    for arg in (f"run={run}", "run=last"):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("report", overrides=[arg], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.cwd = str(tmp_path)
        HydraConfig().set_config(cfg)
        (run / "report.html").unlink(missing_ok=True)
        assert report.report(cfg) == run / "report.html" and (run / "report.html").is_file()
