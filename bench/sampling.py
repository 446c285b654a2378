"""Sampling benchmark: time per image and sample quality for each sampler at 10, 20, 50 and all steps.

    python bench/sampling.py [ckpt=PATH] [n=500] [full_n=50] [samplers=ddpm,ddim,dpmpp] [steps=10,20,50,full]
                             [batch_size=500] [seed=0] [device=auto] [use_ema=true]

ckpt defaults to the newest outputs/train/*/checkpoints/last.ckpt (train it with `python train.py`). Quality is
measured for models of the built-in digits dataset with a small classifier trained on the real digits
(scikit-learn MLP, one hidden layer of 128 ReLUs, on the real images at the model's resolution):
- conf: the classifier's mean top-class probability on the samples (how recognisable they are as digits);
- KID: kernel inception distance (Binkowski et al. 2018) computed in the classifier's hidden-feature space
  between the samples and all 1797 real digits, x1000: the unbiased MMD^2 with the cubic polynomial kernel, so
  runs with different sample counts are comparable (FID is biased by n);
- classes: how many of the 10 digits the classifier sees among the samples, and the largest class's share.
The "real (held-out)" row is the same figure for real digits the classifier did not see: the floor.
Prints a markdown table.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion.checkpoint import resolve_ckpt_path  # noqa: E402
from diffusion.data import DigitsDataModule, to_unit_range  # noqa: E402
from diffusion.model import DiffusionModel  # noqa: E402
from diffusion.process.discrete import sampling_timesteps  # noqa: E402
from diffusion.samplers import SAMPLERS  # noqa: E402

DEFAULTS = dict(
    ckpt="", n="500", full_n="50", samplers="ddpm,ddim,dpmpp", steps="10,20,50,full", batch_size="500",
    seed="0", device="auto", use_ema="true",
)  # fmt: skip


def parse_args(argv: list[str]) -> dict[str, str]:
    args = dict(DEFAULTS)
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in DEFAULTS:
            raise SystemExit(f"error: unknown argument {a!r}; expected key=value with key in {', '.join(DEFAULTS)}")
        args[key] = value
    return args


class DigitJudge:
    """A small MLP classifier of the real digits; its hidden layer is the feature space for KID."""

    def __init__(self, image_size: int, seed: int = 0) -> None:
        from sklearn.neural_network import MLPClassifier

        x, y = DigitsDataModule(image_size=image_size, channels=1).load()
        self.real = to_unit_range(x[:, 0]).flatten(1).numpy()  # (1797, S*S) in [0, 1]
        labels = y.numpy()
        idx = np.random.default_rng(seed).permutation(len(labels))
        self.train_idx, self.test_idx = idx[: int(0.8 * len(idx))], idx[int(0.8 * len(idx)) :]
        self.clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=seed)
        self.clf.fit(self.real[self.train_idx], labels[self.train_idx])
        self.test_accuracy = float(self.clf.score(self.real[self.test_idx], labels[self.test_idx]))

    def features(self, x: np.ndarray) -> np.ndarray:
        """Hidden ReLUs that fire on real digits, standardized with the real digits' statistics: (N, <=128)."""
        h = lambda v: np.maximum(v @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0)  # noqa: E731
        if not hasattr(self, "_stats"):
            real = h(self.real)
            live = real.std(0) > 1e-3  # units that never fire on real digits carry no scale to standardize by
            self._stats = live, real[:, live].mean(0), real[:, live].std(0)
        live, mean, std = self._stats
        return (h(x)[:, live] - mean) / std

    def judge(self, x: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
        """x: (N, S*S) images in [0, 1]; reference: real images to compare with (default: all real digits)."""
        probs = self.clf.predict_proba(x)
        counts = np.bincount(probs.argmax(1), minlength=10)
        ref = self.real if reference is None else reference
        return {
            "conf": float(probs.max(1).mean()),
            "kid": 1000 * kid(self.features(x), self.features(ref)),
            "classes": int((counts > 0).sum()),
            "top_share": float(counts.max() / counts.sum()),
        }


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 between feature sets with the kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018)."""
    d = a.shape[1]
    kaa, kbb, kab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    m, n = len(a), len(b)
    return float(
        (kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1)) - 2 * kab.mean()
    )


def generate(model, sampler, *, n: int, batch_size: int, seed: int, device, **options) -> tuple[np.ndarray, float]:
    """n unconditional samples as (n, S*S) in [0, 1] (channel 0, quantized to 8 bits like a PNG) and seconds per
    image (`DiffusionModel.generate`, one call per batch)."""
    out, elapsed = [], 0.0
    for lo in range(0, n, batch_size):
        seeds = range(seed + lo, seed + min(n, lo + batch_size))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x = model.generate(seeds=seeds, sampler=partial(sampler, **options), batch_size=batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        out.append((to_unit_range(x[:, 0].float().cpu()).clamp(0, 1) * 255).round() / 255)
    return torch.cat(out).flatten(1).numpy(), elapsed / n


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    ckpt = resolve_ckpt_path(args["ckpt"] or "last", str(ROOT / "outputs"))
    want = args["device"]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want)
    loaded = DiffusionModel.from_checkpoint(ckpt, use_ema=args["use_ema"].lower() == "true", map_location=device)
    T = loaded.process.num_steps
    n, full_n, batch_size, seed = int(args["n"]), int(args["full_n"]), int(args["batch_size"]), int(args["seed"])
    judge = DigitJudge(loaded.spec.image_size)
    print(
        f"checkpoint {ckpt} (step {loaded.global_step}, {loaded.weights} weights, {T} steps, "
        f"{loaded.process.kind}/{loaded.process.prediction}); {device}, {torch.get_num_threads()} threads; "
        f"judge: MLP on real digits, held-out accuracy {judge.test_accuracy:.3f}\n",
        flush=True,
    )
    rows = []
    real = judge.judge(judge.real[judge.test_idx], reference=judge.real[judge.train_idx])
    rows.append(("real (held-out)", "-", "-", len(judge.test_idx), math.nan, real))
    for name in args["samplers"].split(","):
        sampler = SAMPLERS[name]
        for steps in sorted({min(T, T if s == "full" else int(s)) for s in args["steps"].split(",")}):
            count = full_n if steps == T and steps > 50 else n
            x, sec = generate(loaded, sampler, n=count, batch_size=batch_size, seed=seed, device=device, steps=steps)
            spacing = inspect.signature(sampler).parameters["spacing"].default
            nfe = len(sampling_timesteps(T, steps, spacing, alpha_bar=loaded.process.alpha_bar))
            rows.append((name, steps, nfe, count, sec, judge.judge(x)))
            print(f"  {name} {steps} steps: {1000 * sec:.1f} ms/image, {rows[-1][-1]}", file=sys.stderr, flush=True)
    print("| sampler | steps | NFE | images | ms / image | conf | KID x1000 | classes (top share) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, steps, nfe, count, sec, q in rows:
        ms = "-" if math.isnan(sec) else f"{1000 * sec:.1f}"
        print(
            f"| {name} | {steps} | {nfe} | {count} | {ms} | {q['conf']:.3f} | {q['kid']:.2f} | "
            f"{q['classes']} ({q['top_share']:.0%}) |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
