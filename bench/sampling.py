"""Sampling benchmark: rank samplers x timestep grids x step counts on any checkpoint, any process family.

    python bench/sampling.py [ckpt=PATH] [n=500] [samplers=ddim,dpmpp,unipc,unipc+order=3]
                             [spacings=trailing,logsnr,null] [steps=10,20] [reference=ddim:200]
                             [judge=auto] [batch_size=500] [seed=0] [device=auto] [use_ema=true]

ckpt defaults to the newest outputs/train/*/checkpoints/last.ckpt (train it with `python train.py`). Every row
samples the same `n` seeds (unconditional, or the null condition of a conditional model), so rows differ only by
the sampler. `samplers` entries are a name of `diffusion.samplers.SAMPLERS` with options after `+`
(`unipc+order=3`, `ddim+eta=1`); `spacings` are `sampler.spacing` values, `null` the family's default grid. A
grid that does not apply to the checkpoint's process family (a discrete spacing on EDM / flow) is skipped, and so
is one that visits the same levels as an earlier row (null where it names the same grid). The figures:

- `ms / image`: wall-clock of the sampler call over images (batch `batch_size`), `NFE` the network calls counted;
- `RMSE to ref` (any checkpoint, any family): the root mean square difference, in the data range [-1, 1], between
  each image and the same seed's image from the `reference` sampler run to convergence (`ddim:200`: DDIM, 200
  steps, the family's grid): how far the sampler is from the ODE solution it approximates;
- for 16x16 single-channel checkpoints (the built-in digits; `judge=digits` forces it, `judge=none` drops it) the
  independent digit classifier of `bench/digits_eval.py`: `FD` (Frechet distance of its features to the
  training digits), `vs ref` (FD over the reference's FD, minus 1: the goal is 10 steps within 10%), `p>=0.9` and
  `classes`. Its floors: `fd_real500` (500 real digits against the rest, what a perfect sampler scores) is printed.

Rows are ranked within each step count by FD (digits) or RMSE to ref; the table is markdown on stdout, progress on
stderr. Keep a CPU run short: `n=500` with a few samplers and 10 / 20 steps takes a few minutes on 2 cores.
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion.checkpoint import resolve_ckpt_path  # noqa: E402
from diffusion.errors import ConfigError  # noqa: E402
from diffusion.model import DiffusionModel  # noqa: E402
from diffusion.samplers import SAMPLERS  # noqa: E402

DEFAULTS = dict(
    ckpt="", n="500", samplers="ddim,dpmpp,unipc,unipc+order=3", spacings="trailing,logsnr,null", steps="10,20",
    reference="ddim:200", judge="auto", batch_size="500", seed="0", device="auto", use_ema="true",
)  # fmt: skip


def parse_args(argv: list[str]) -> dict[str, str]:
    args = dict(DEFAULTS)
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in DEFAULTS:
            raise SystemExit(f"error: unknown argument {a!r}; expected key=value with key in {', '.join(DEFAULTS)}")
        args[key] = value
    return args


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def parse_sampler(spec: str) -> tuple[str, dict]:
    """A `samplers` entry "unipc+order=3" as ("unipc", {"order": 3}); the name must be one of SAMPLERS."""
    name, *options = spec.split("+")
    if name not in SAMPLERS:
        raise SystemExit(f"error: samplers: {name!r} is not one of {', '.join(SAMPLERS)}")
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise SystemExit(f"error: samplers: {spec!r}: options are key=value after '+', e.g. unipc+order=3")
        parsed[key] = _value(value)
    return name, parsed


def counted(sampler, calls: list[int]):
    """`sampler` whose network calls are counted into calls[0] (the NFE of one batch)."""

    def run(model, process, noise, **kw):
        calls[0] = 0

        def model_counted(x, t):
            calls[0] += 1
            return model(x, t)

        return sampler(model_counted, process, noise, **kw)

    return run


def generate(model: DiffusionModel, sampler, *, n: int, batch_size: int, seed: int) -> tuple[torch.Tensor, float, int]:
    """(n images (N, C, H, W) in [-1, 1] on the CPU, seconds per image, network calls per batch)."""
    calls, out, elapsed = [0], [], 0.0
    cuda = model.device.type == "cuda"
    for lo in range(0, n, batch_size):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        x = model.generate(seeds=range(seed + lo, seed + min(n, lo + batch_size)), sampler=counted(sampler, calls),
                           batch_size=batch_size)  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        out.append(x.float().cpu())
    return torch.cat(out), elapsed / n, calls[0]


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square of a - b over all pixels, averaged over images as a mean square."""
    return float((a - b).square().mean().sqrt())


def digits_judge(model: DiffusionModel, judge: str):
    """bench/digits_eval.py's `score` when the images are 16x16 single-channel digits (or `judge=digits`)."""
    if judge == "none":
        return None
    shape = (model.spec.sample_shape[0], model.spec.image_size) if model.codec.config.get("kind") == "identity" else ()
    if judge == "auto" and shape != (1, 16):
        return None
    from bench import digits_eval

    return digits_eval


def main(argv: list[str]) -> list[dict]:
    args = parse_args(argv)
    ckpt = resolve_ckpt_path(args["ckpt"] or "last", str(ROOT / "outputs"))
    want = args["device"]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want)
    loaded = DiffusionModel.from_checkpoint(ckpt, use_ema=args["use_ema"].lower() == "true", map_location=device)
    process = loaded.process
    n, batch_size, seed = int(args["n"]), int(args["batch_size"]), int(args["seed"])
    judge = digits_judge(loaded, args["judge"])
    print(
        f"checkpoint {ckpt} (step {loaded.global_step}, {loaded.weights} weights, process {process.family}); "
        f"{device}, {torch.get_num_threads()} threads; {n} images a row",
        flush=True,
    )

    def run(name: str, options: dict, steps: int, spacing) -> dict:
        sampler = partial(SAMPLERS[name], steps=steps, spacing=spacing, **options)
        images, sec, nfe = generate(loaded, sampler, n=n, batch_size=batch_size, seed=seed)
        row = dict(sampler="+".join([name, *(f"{k}={v}" for k, v in options.items())]), steps=steps,
                   spacing="null" if spacing is None else spacing, nfe=nfe, sec=sec, images=images)  # fmt: skip
        if judge is not None:
            row["digits"] = judge.score(judge.quantize(images[:, :1]))  # as a saved PNG is
        return row

    ref_name, _, ref_steps = args["reference"].partition(":")
    ref = run(*parse_sampler(ref_name), int(ref_steps or 200), None)
    print(f"  reference {ref['sampler']} {ref['steps']} steps: {1000 * ref['sec']:.1f} ms/image", file=sys.stderr)
    rows, seen = [], set()
    for steps in (int(s) for s in args["steps"].split(",")):
        for spec in args["samplers"].split(","):
            name, options = parse_sampler(spec)
            for spacing in (_value(s) for s in args["spacings"].split(",")):
                try:
                    levels = tuple(process.sampling_levels(steps, spacing, sampler=name))
                except ConfigError:  # a grid of another process family
                    continue
                key = (spec, steps, levels)
                if key in seen:
                    continue
                seen.add(key)
                rows.append(run(name, options, steps, spacing))
                rows[-1]["rmse"] = rmse(rows[-1]["images"], ref["images"])
                print(f"  {spec} {steps} steps {spacing}: {1000 * rows[-1]['sec']:.1f} ms/image, RMSE to ref "
                      f"{rows[-1]['rmse']:.4f}", file=sys.stderr, flush=True)  # fmt: skip
    print_table(rows, ref, judge)
    return [ref, *rows]


def print_table(rows: list[dict], ref: dict, judge) -> None:
    figure = (lambda r: r["digits"]["fd"]) if judge is not None else (lambda r: r["rmse"])
    ranked = sorted(rows, key=lambda r: (r["steps"], figure(r)))
    head = "| rank | sampler | spacing | steps | NFE | ms / image | RMSE to ref |"
    if judge is not None:
        head += " FD | vs ref | p>=0.9 | classes |"
        ref_fd = ref["digits"]["fd"]
        floors = judge.reference()
        print(f"\nFD floors: two halves of the training digits {floors['fd_floor']:.3f}, 500 real digits against "
              f"the rest {floors['fd_real500']:.3f}\n")  # fmt: skip
    print(head)
    print("|" + "---|" * (head.count("|") - 1))

    def line(rank, r, distance: str) -> str:
        text = f"| {rank} | {r['sampler']} | {r['spacing']} | {r['steps']} | {r['nfe']} | {1000 * r['sec']:.1f} |"
        text += f" {distance} |"
        if judge is not None:
            d = r["digits"]
            text += f" {d['fd']:.3f} | {d['fd'] / ref_fd - 1:+.1%} | {d['share_p90']:.1%} | {d['classes']} |"
        return text

    print(line("ref", ref, "0"))
    rank, last_steps = 0, None
    for r in ranked:
        rank = 1 if r["steps"] != last_steps else rank + 1
        last_steps = r["steps"]
        print(line(rank, r, f"{r['rmse']:.4f}"))
    if not math.isfinite(sum(figure(r) for r in rows)):
        print("\n(non-finite figures: a sampler diverged)")


if __name__ == "__main__":
    main(sys.argv[1:])
