"""A run's report: plots of what its CSV logs hold and a strip of its sample grids, as PNGs in `<run>/report/` and
one self-contained `<run>/report.html` (the images inlined as base64) that opens offline.

Read from the run folder only, so it works for a finished run, a running one and a copied one alike: the CSV
logger's `csv/version_*/metrics.csv` (a resumed run adds a version; later rows win), and `samples/step_*.png`.
Plotted where logged: the training loss (with a moving average) and the validation loss, the validation loss per
noise-level bucket (`val/loss_<bucket>`), the learning rate (`train/lr`), FID / KID (`val/fid`, `val/kid`) and
throughput (`train/images_per_sec`). A run logged only to W&B or TensorBoard has no metrics.csv: its report
holds the sample grids and says where the curves are. matplotlib (a base dependency) draws with the Agg backend.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from collections.abc import Iterable
from pathlib import Path

from diffusion.errors import MissingPathError, NotAFolderError
from diffusion.files import write_bytes

REPORT_DIR = "report"  # <run>/report/<plot>.png
REPORT_HTML = "report.html"  # <run>/report.html
MAX_STRIP = 8  # sample grids shown over time (evenly spaced, the first and the last included)
STEP_GRID = re.compile(r"step_(\d+)\.png$")

Series = dict[str, list[tuple[int, float]]]  # metric -> [(step, value)] sorted by step


def read_metrics(run: Path) -> Series:
    """Every metric in the run's CSV logs as (step, value) pairs sorted by step; {} when there is no metrics.csv.

    The versions are read in order (a resume writes the next one) and a later value for the same step wins."""
    files = sorted(run.glob("csv/version_*/metrics.csv"), key=lambda p: _version(p.parent.name))
    files = files or sorted(run.glob("**/metrics.csv"))  # a CSV logger with another name / save_dir
    merged: dict[str, dict[int, float]] = {}
    for path in files:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                step = _number(row.get("step"))
                if step is None:
                    continue
                for key, text in row.items():
                    value = _number(text)
                    if key in ("step", "epoch") or value is None:
                        continue
                    merged.setdefault(key, {})[int(step)] = value
    return {k: sorted(v.items()) for k, v in merged.items()}


def _version(name: str) -> int:
    found = re.search(r"(\d+)$", name)
    return int(found.group(1)) if found else -1


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def sample_grids(run: Path, *, limit: int = MAX_STRIP) -> list[tuple[int, Path]]:
    """Up to `limit` of the run's `samples/step_*.png` as (step, path), evenly spaced, first and last included."""
    found = sorted((int(m.group(1)), p) for p in run.glob("samples/step_*.png") if (m := STEP_GRID.search(p.name)))
    if len(found) <= limit:
        return found
    picks = sorted({round(i * (len(found) - 1) / (limit - 1)) for i in range(limit)})
    return [found[i] for i in picks]


def moving_average(values: list[float], window: int) -> list[float]:
    """The trailing mean over `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _bucket_key(name: str) -> float:
    """Sort `val/loss_t0-99`, `val/loss_sigma0.06-0.13`, `val/loss_t0.3-0.4` by their first number."""
    found = re.search(r"(-?\d+(?:\.\d+)?)", name.removeprefix("val/loss_"))
    return float(found.group(1)) if found else math.inf


def _figure(title: str, *, ylabel: str, log_y: bool = False):
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only, no display (a server, CI)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return fig, ax


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot_lines(ax, series: Series, names: Iterable[str], *, label=lambda n: n, marker: str | None = None) -> None:
    for name in names:
        steps, values = zip(*series[name], strict=True)
        ax.plot(steps, values, label=label(name), marker=marker, markersize=3)


def plots(series: Series) -> dict[str, bytes]:
    """Plot name -> PNG bytes, for each kind of metric that `series` holds."""
    out: dict[str, bytes] = {}
    if "train/loss" in series or "val/loss" in series:
        positive = all(v > 0 for n in ("train/loss", "val/loss") for _, v in series.get(n, []))
        fig, ax = _figure("loss", ylabel="loss", log_y=positive)
        if "train/loss" in series:
            steps, values = zip(*series["train/loss"], strict=True)
            ax.plot(steps, values, alpha=0.3, label="train/loss")
            window = max(1, len(values) // 20)
            if window > 1:
                ax.plot(steps, moving_average(list(values), window), label=f"train/loss (mean of {window})")
        if "val/loss" in series:
            _plot_lines(ax, series, ["val/loss"], marker="o")
        ax.legend()
        out["loss"] = _png(fig)
    buckets = sorted((n for n in series if n.startswith("val/loss_")), key=_bucket_key)
    if buckets:
        fig, ax = _figure("validation loss per noise level (low to high)", ylabel="val/loss", log_y=True)
        import matplotlib

        colors = matplotlib.colormaps["viridis"]
        for i, name in enumerate(buckets):
            steps, values = zip(*series[name], strict=True)
            ax.plot(steps, values, marker="o", markersize=3, color=colors(i / max(1, len(buckets) - 1)), label=name)
        ax.legend(fontsize="x-small", ncols=2)
        out["val_loss_buckets"] = _png(fig)
    if "train/lr" in series:
        fig, ax = _figure("learning rate", ylabel="train/lr")
        _plot_lines(ax, series, ["train/lr"])
        out["lr"] = _png(fig)
    quality = [n for n in ("val/fid", "val/kid") if n in series]
    if quality:
        fig, ax = _figure("sample quality (lower is better)", ylabel=quality[0])
        _plot_lines(ax, series, quality[:1], marker="o")
        if len(quality) > 1:
            twin = ax.twinx()
            _plot_lines(twin, series, quality[1:], marker="s")
            twin.set_ylabel(quality[1])
            twin.lines[0].set_color("tab:orange")
            fig.legend(loc="upper right")
        out["fid_kid"] = _png(fig)
    if "train/images_per_sec" in series:
        fig, ax = _figure("throughput", ylabel="images / s")
        _plot_lines(ax, series, ["train/images_per_sec"])
        out["images_per_sec"] = _png(fig)
    return out


def _last(series: Series) -> list[tuple[str, int, float]]:
    return [(name, points[-1][0], points[-1][1]) for name, points in sorted(series.items())]


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def page(run: Path, series: Series, figures: dict[str, bytes], grids: list[tuple[int, bytes]]) -> str:
    """The report as one HTML page with every image inlined."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>run report: {html.escape(run.name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}img{max-width:100%;image-rendering:pixelated}"
        ".plots{display:flex;flex-wrap:wrap;gap:1em}.plots img{width:640px}.strip{display:flex;gap:1em;"
        "overflow-x:auto}.strip figure{margin:0;text-align:center}.strip img{height:320px;max-width:none}"
        "table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right}th{text-align:left}</style>",
        f"</head><body><h1>run report</h1><p><code>{html.escape(str(run))}</code></p>",
    ]
    if figures:
        parts.append("<h2>curves</h2><div class='plots'>")
        parts += [_img(data, name) for name, data in figures.items()]
        parts.append("</div>")
    else:
        parts.append(
            "<p>No metrics.csv in this run folder: the curves come from the CSV logger (logger=csv, the default, "
            "or a list with csv in it). With logger=tensorboard see <code>tensorboard --logdir</code>; with "
            "logger=wandb the run's W&amp;B page.</p>"
        )
    if grids:
        parts.append("<h2>samples over training</h2><div class='strip'>")
        parts += [f"<figure>{_img(data, f'step {s}')}<figcaption>step {s}</figcaption></figure>" for s, data in grids]
        parts.append("</div>")
    if series:
        parts.append("<h2>last values</h2><table><tr><th>metric</th><th>step</th><th>value</th></tr>")
        parts += [f"<tr><th>{html.escape(n)}</th><td>{s}</td><td>{v:.6g}</td></tr>" for n, s, v in _last(series)]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def find_run(run: str, *, runs_dir: str | Path) -> Path:
    """The run folder `run` names: a folder, or "last" (the newest train.py run under `runs_dir`)."""
    if run == "last":
        found = sorted(Path(runs_dir).rglob(".hydra/config.yaml"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise MissingPathError(f"run=last: no run folder (with .hydra/config.yaml) under {runs_dir}")
        return found[-1].parent.parent
    return Path(run).expanduser()


def write_report(run: str | Path) -> Path:
    """Write the plots into `<run>/report/` and `<run>/report.html`; returns the HTML page's path."""
    run = Path(run).expanduser()
    if not run.exists():
        raise MissingPathError(f"run={run} does not exist")
    if not run.is_dir():
        raise NotAFolderError(f"run={run} is not a run folder")
    series = read_metrics(run)
    figures = plots(series)
    grids = [(step, path.read_bytes()) for step, path in sample_grids(run)]
    if figures:
        (run / REPORT_DIR).mkdir(exist_ok=True)
    for name, data in figures.items():
        write_bytes(run / REPORT_DIR / f"{name}.png", data, fsync=False)
    if grids:
        (run / REPORT_DIR).mkdir(exist_ok=True)
        write_bytes(run / REPORT_DIR / "samples.png", _strip(grids), fsync=False)
    path = run / REPORT_HTML
    write_bytes(path, page(run, series, figures, grids).encode(), fsync=False)
    return path


def _strip(grids: list[tuple[int, bytes]]) -> bytes:
    """The sample grids side by side with their steps above them, as one PNG (samples.png)."""
    from PIL import Image, ImageDraw

    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in grids]
    height = max(im.height for im in images)
    gap, label = 8, 16
    strip = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), height + label), "white")
    draw, x = ImageDraw.Draw(strip), 0
    for (step, _), im in zip(grids, images, strict=True):
        strip.paste(im, (x, label))
        draw.text((x + 2, 2), f"step {step}", fill="black")
        x += im.width + gap
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    return buffer.getvalue()
