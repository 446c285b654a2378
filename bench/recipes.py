"""Training recipes for the built-in digits compared at the same wall-clock budget, scored by the digit classifier.

    python bench/recipes.py --minutes 2 --recipe small --recipe lean_b128       # one row per recipe
    python bench/recipes.py --list                                           # the recipes and their overrides
    python bench/recipes.py --table                                          # the rows gathered so far

Each recipe is a list of Hydra overrides on conf/train.yaml (pinned in full, so a row keeps its meaning when the
defaults change). One recipe at a time, this
1. times a few training steps of the recipe's network (and a sampling forward) in this process, and from that sets
   `trainer.max_steps` so that the whole `train.py` run (start-up, training, validation, sample grids,
   checkpoints) fits in `--minutes`, with `trainer.max_time` as the hard stop (the last checkpoint and EMA are
   saved at that stop too); a recipe that pins `trainer.max_steps` keeps it, and so does `default` (no
   overrides: `python train.py` as conf/ has it);
2. runs `python train.py <overrides>` as a subprocess, as a user would;
3. draws 500 samples with fixed seeds (0..499) from the run's last checkpoint through `python sample.py` and its
   default sampler (DPM-Solver++, 20 steps), EMA weights;
4. scores them with bench/digits_eval.py and prints one row: parameters, images seen, images/s in the training
   loop (validation and grids included; start-up not), wall time of the whole train.py run, share at p >= 0.9,
   classes drawn and FD next to its real-vs-real floor.
Rows are added to a JSON file (default outputs/bench_recipes/results.json; a recipe run again replaces its row).
Speed figures mean something only when nothing else runs on the machine (here: under `flock /tmp/heavy.lock`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import digits_eval  # noqa: E402
from diffusion.files import write_bytes  # noqa: E402

# Everything the recipes vary, at the values `python train.py` had before this benchmark (issue 13).
BASE = [
    "data=digits",
    "model=unet_small",
    "data.batch_size=64",
    "optim.lr=2e-3",
    "optim.warmup_steps=100",
    "optim.lr_decay=cosine",
    "process=cosine",
    "process.prediction=v",
    "trainer.val_check_interval=200",
    "callbacks.sample_grid.every_n_steps=300",
    "callbacks.model_checkpoint.every_n_train_steps=200",
]
# A U-Net of 0.7M parameters: one block per level, two levels (16x16 and 8x8), no attention.
COMPACT = ["model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[]"]
# One block per level, three levels, attention at 4x4 (1.2M).
LEAN = ["model.num_res_blocks=1"]
RARE = ["trainer.val_check_interval=1000", "callbacks.sample_grid.every_n_steps=0"]  # validate, draw less often
LEAN_B128 = [*BASE, *RARE, *LEAN, "data.batch_size=128", "optim.lr=3e-3"]  # the best at 2 minutes
LEAN_B128_ANY = [o for o in LEAN_B128 if not o.startswith("process")]  # for another process (process=edm|flow)
RECIPES: dict[str, list[str]] = {
    "small_600": [*BASE, "trainer.max_steps=600"],  # the old default as it shipped: 600 steps
    "small": BASE,  # the old default's recipe, trained for the budget
    "small_rare": [*BASE, *RARE],
    "small_b128": [*BASE, *RARE, "data.batch_size=128", "optim.lr=3e-3"],
    "lean": [*BASE, *RARE, *LEAN],
    "lean_b128": LEAN_B128,
    "lean_b128_eps": [*LEAN_B128, "process.prediction=eps"],
    "lean_b128_minsnr": [*LEAN_B128, "process.min_snr_gamma=5.0"],
    "lean_b128_lr5e-3": [*LEAN_B128, "optim.lr=5e-3"],
    "lean_b128_ema_short": [*LEAN_B128, "callbacks.ema.power=0.5"],  # decay 0.9916 -> 0.972 at step 1300
    "lean_b128_bf16": [*LEAN_B128, "trainer.precision=bf16-mixed"],
    "lean_b128_edm": [*LEAN_B128_ANY, "process=edm"],  # Karras et al. 2022, sampled by DPM-Solver++ on its sigmas
    "lean_b128_flow": [*LEAN_B128_ANY, "process=flow"],  # flow matching, logit-normal t
    "compact": [*BASE, *RARE, *COMPACT],
    "compact_b128": [*BASE, *RARE, *COMPACT, "data.batch_size=128", "optim.lr=3e-3"],
    # Relative to the default (conf/ as of issue 21: unet_digits, batch 128, lr 3e-3; cosine v-prediction until
    # flow matching won below and became the default): each family at the default's 1300 steps.
    "default_flow": ["process=flow", "trainer.max_steps=1300"],
    "default_cosine": ["process=cosine", "trainer.max_steps=1300"],  # the default before issue 21
    "default_flow_budget": ["process=flow"],
    # A DiT of the default's size (dit_digits: width 128, 4 blocks, patch 2; 1.27M) for the budget; transformers
    # want a lower peak lr than the U-Net's 3e-3 (1e-3, as small ViTs train with AdamW).
    "dit_flow": ["model=dit_digits", "optim.lr=1e-3", "process=flow"],
    "dit_v": ["model=dit_digits", "optim.lr=1e-3", "process=cosine"],
    "default": [],  # `python train.py` as conf/ now has it, its own trainer.max_steps included
}
STARTUP_S = 12.0  # python, imports, Hydra, data: measured about 8-10 s on 2 cores
SPEED_MARGIN = 0.9  # Lightning, EMA and logging on top of the bare steps the probe times
OUT = ROOT / "outputs" / "bench_recipes" / "results.json"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def overrides_value(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == key]
    return values[-1] if values else None


def probe(overrides: list[str], *, steps: int = 8) -> dict:
    """Seconds per training step of the recipe's network at its batch size (bare forward, backward, AdamW
    step; median of `steps` after 2 warm-up steps) and seconds per sampling forward of a 100-image grid."""
    from hydra.utils import instantiate

    cfg = compose(overrides)
    net = instantiate(cfg.model)
    batch = int(cfg.data.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    t = torch.randint(0, 1000, (batch,))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss = (net(x, t, None) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    grid = int(cfg.callbacks.sample_grid.num_images) if cfg.callbacks.get("sample_grid") else 0
    with torch.no_grad():
        start = time.perf_counter()
        if grid:
            net(torch.randn(grid, *x.shape[1:]), torch.randint(0, 1000, (grid,)), None)
        sample_forward = time.perf_counter() - start
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "batch": batch,
        "step_s": statistics.median(times[2:]),
        "grid_s": sample_forward * int(cfg.sampler.get("steps") or cfg.process.num_steps),
        "grid_every": int(cfg.callbacks.sample_grid.every_n_steps or 0) if grid else -1,
        "val_every": int(cfg.trainer.val_check_interval),
    }


def steps_for(budget_s: float, p: dict) -> int:
    """The most optimizer steps whose training, validation and grids fit in the budget after start-up."""
    step_s = p["step_s"] / SPEED_MARGIN
    val_s = 0.1 * 3  # three validation batches of the 180 held-out digits: about a tenth of a second each

    def cost(n: int) -> float:
        grids = 0 if p["grid_every"] < 0 else (n // p["grid_every"] if p["grid_every"] else 0) + 1
        return STARTUP_S + n * step_s + grids * p["grid_s"] + (n // p["val_every"]) * val_s

    n = int((budget_s - STARTUP_S) / step_s)
    while n > 1 and cost(n) > budget_s:
        n -= max(1, n // 200)
    return n


def clock(seconds: float) -> str:
    """Seconds as Lightning's max_time string, DD:HH:MM:SS."""
    s = int(seconds)
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def run(cmd: list[str], log: Path) -> float:
    """Run a command from the repository root, output into `log`; its wall time in seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def train_seconds(ckpt: dict) -> float | None:
    """Seconds in `trainer.fit`'s training loop (validation and sample grids inside it included), from the
    state of Lightning's Timer callback (present because every run here has `trainer.max_time`)."""
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith("Timer"):
            return float(state["time_elapsed"]["train"])
    return None


def bench(name: str, overrides: list[str], *, minutes: float, work: Path, n: int = 500) -> dict:
    """Train, sample and score one recipe (see the module doc); returns its row."""
    from diffusion.checkpoint import read_checkpoint

    budget = 60.0 * minutes
    p = probe(overrides)
    pinned = not overrides or overrides_value(overrides, "trainer.max_steps") is not None
    run_dir = work / name
    extra = [
        *([] if pinned else [f"trainer.max_steps={steps_for(budget, p)}"]),
        f"trainer.max_time='{clock(budget - STARTUP_S)}'",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    train_s = run([sys.executable, "train.py", *overrides, *extra], work / f"{name}.log")
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    loop_s = train_seconds(ckpt)
    samples = work / f"{name}_samples"
    sample_s = run(
        [sys.executable, "sample.py", f"ckpt={run_dir}", f"n={n}", "seed=0", "npz=true", "progress=false",
         f"out={samples}", "overwrite=true"],
        work / f"{name}_sample.log",
    )  # fmt: skip
    scores = digits_eval.score(digits_eval.load_samples(samples / "samples.npz"))
    return {
        "recipe": name,
        "overrides": overrides,
        "minutes": minutes,
        "params": p["params"],
        "batch": p["batch"],
        "steps": int(ckpt["global_step"]),
        "images_seen": int(ckpt["global_step"]) * p["batch"],
        "images_per_s": int(ckpt["global_step"]) * p["batch"] / loop_s if loop_s else None,
        "loop_s": loop_s,
        "train_s": train_s,
        "sample_s": sample_s,
        **{k: scores[k] for k in ("share_p90", "classes", "counts", "fd", "fd_floor", "fd_real500", "real_p90")},
    }


HEADER = (
    f"{'recipe':20s} {'params':>7s} {'batch':>5s} {'steps':>6s} {'images':>8s} {'img/s':>6s} {'time':>6s} "
    f"{'p>=0.9':>7s} {'classes':>7s} {'FD':>6s} {'floor':>6s}"
)


def row(r: dict) -> str:
    rate = f"{r['images_per_s']:6.0f}" if r.get("images_per_s") else f"{'-':>6s}"
    return (
        f"{r['recipe']:20s} {r['params'] / 1e6:6.2f}M {r['batch']:5d} {r['steps']:6d} {r['images_seen']:8d} {rate} "
        f"{r['train_s']:5.0f}s {100 * r['share_p90']:6.1f}% {r['classes']:5d}/10 {r['fd']:6.2f} {r['fd_floor']:6.2f}"
    )


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", default=[], help=f"one of {', '.join(RECIPES)} (repeatable)")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each train.py run")
    p.add_argument("--out", type=Path, default=OUT, help="the JSON file rows are added to")
    p.add_argument("--list", action="store_true", help="print the recipes and their overrides")
    p.add_argument("--table", action="store_true", help="print the rows in --out")
    args = p.parse_args(argv)
    if args.list:
        for name, overrides in RECIPES.items():
            print(f"{name:20s} {' '.join(overrides)}")
        return []
    unknown = [r for r in args.recipe if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe {', '.join(unknown)}; --list shows them")
    rows = load(args.out)
    work = args.out.parent / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    for name in args.recipe:
        work.mkdir(parents=True, exist_ok=True)
        result = bench(name, RECIPES[name], minutes=args.minutes, work=work)
        rows = [r for r in load(args.out) if (r["recipe"], r["minutes"]) != (name, args.minutes)] + [result]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(args.out, json.dumps(rows, indent=1).encode())
        print(f"{HEADER}\n{row(result)}", flush=True)
    if args.table or not args.recipe:
        print(HEADER)
        for r in sorted(rows, key=lambda r: (r["minutes"], -r["share_p90"])):
            print(f"{row(r)}  ({r['minutes']:g} min)")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
