"""How good are samples of the built-in digits? A small digit classifier scores them.

    python bench/digits_eval.py --samples outputs/sample/.../samples.npz   # sample.py npz=true writes it

The classifier is a small CNN trained on the real built-in digits exactly as the model sees them
(`DigitsDataModule`'s training split, 16x16, [-1, 1], through the same uint8 rounding that saved samples go
through), deterministic from its seed and trained once: its weights are cached (atomic write, weights-only load)
in `.cache/digits_eval/`. It is also taught that noise, blank images and blends of two digits are no digit (outlier
exposure: Hendrycks et al. 2019, "Deep Anomaly Detection with Outlier Exposure"; cross-entropy to the uniform
distribution on such inputs), so a malformed sample gets a low confidence instead of an arbitrary one.

What a batch of samples scores (`score`):
- `share_p90`: the share of samples the classifier labels with p >= 0.9 (a recognisable digit);
- `classes`: how many of the 10 classes those confident samples cover (argmax over the p >= 0.9 samples), and
  `counts`, the confident samples per class (a collapsed model draws few classes);
- `fd`: the Frechet distance (as in FID, Heusel et al. 2017) between the classifier's penultimate-layer features
  of the samples and of all 1617 training digits, next to `fd_floor`, the same distance between two disjoint
  halves of the training digits. FD has a finite-sample bias: 500 real digits against the other 1117 score about
  1.5x the floor (`fd_real500`), so a perfect sampler of 500 images lands near 1.5x, not 1x;
- `real_p90`: the same share for the real training digits (about 94%), what a perfect sampler would reach.
`label_share` is for conditional models: the share of samples labelled as a given class.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion.files import atomic_write  # noqa: E402

CACHE_DIR = ROOT / ".cache" / "digits_eval"
VERSION = 1  # bump when the network or its training changes: the cache file name carries it
THRESHOLD = 0.9
NUM_CLASSES = 10


class DigitClassifier(nn.Module):
    """Two conv stages (16x16 -> 8x8 -> 4x4) and a 128-wide penultimate layer (the FD features)."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 32, 8, 8)
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 64, 4, 4)
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def quantize(x: Tensor) -> Tensor:
    """[-1, 1] images through uint8 and back, as a saved sample is."""
    return (((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1).float()


@cache
def digits(split: str = "train") -> tuple[Tensor, Tensor]:
    """The built-in digits as the model trains on them: ((N, 1, 16, 16) in [-1, 1], uint8-rounded; (N,) labels)."""
    from diffusion.data import DigitsDataModule, split_indices

    dm = DigitsDataModule(image_size=16, channels=1)  # the split of conf/data/digits.yaml (val_fraction 0.1, seed 0)
    x, y = dm.load()
    train, val = split_indices(len(x), dm.val_fraction, dm.seed)  # the rows DigitsDataModule.setup trains on
    rows = torch.as_tensor(val if split == "val" else train)
    return quantize(x[rows]), y[rows]


def outliers(n: int, like: Tensor, generator: torch.Generator) -> Tensor:
    """n images that are no digit: uniform and Gaussian noise, smooth blobs, flat images, blends of two digits."""
    kind = torch.randint(0, 5, (n,), generator=generator)
    uniform = torch.rand(n, 1, 16, 16, generator=generator) * 2 - 1
    gauss = (torch.randn(n, 1, 16, 16, generator=generator) * 0.7).clamp(-1, 1)
    blobs = F.interpolate(torch.rand(n, 1, 4, 4, generator=generator) * 2 - 1, size=16, mode="bilinear")
    flat = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1).expand(-1, 1, 16, 16)
    i, j = torch.randint(0, len(like), (2, n), generator=generator)
    blend = (like[i] + like[j]) / 2
    out = torch.stack([uniform, gauss, blobs, flat, blend])  # (5, n, 1, 16, 16)
    return out[kind, torch.arange(n)]


def shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image moved by up to one pixel in each direction (background -1 fills in)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (B, 1, 18, 18)
    windows = padded.unfold(2, 16, 1).unfold(3, 16, 1)  # (B, 1, 3, 3, 16, 16): every one-pixel shift
    dy, dx = torch.randint(0, 3, (2, len(x)), generator=generator)
    return windows[torch.arange(len(x)), :, dy, dx]  # (B, 1, 16, 16)


def train_classifier(
    *, seed: int = 0, epochs: int = 30, batch_size: int = 64, outlier_weight: float = 0.2
) -> DigitClassifier:
    """Train the classifier on the training digits (one-pixel shifts; outliers pushed to the uniform label)."""
    x, y = digits("train")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps = epochs * (len(x) // batch_size)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for k in range(len(x) // batch_size):
            rows = order[k * batch_size : (k + 1) * batch_size]
            images = shift(x[rows], generator)
            odd = outliers(batch_size // 2, x, generator)
            loss = F.cross_entropy(net(images), y[rows])
            loss = (
                loss - outlier_weight * F.log_softmax(net(odd), dim=1).mean()
            )  # cross-entropy to uniform (minus a const)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr.step()
    return net.eval()


def classifier_path(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or CACHE_DIR) / f"digits_classifier_v{VERSION}_seed{seed}.pt"


@cache
def _load(seed: int, cache_dir: str) -> DigitClassifier:
    path = classifier_path(seed, cache_dir)
    net = DigitClassifier()
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    with torch.inference_mode(False), torch.enable_grad():
        net = train_classifier(seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(net.state_dict(), f))
    return net


def load_classifier(*, seed: int = 0, cache_dir: str | Path | None = None) -> DigitClassifier:
    """The classifier for `seed`: read from the cache, or trained (about 25 s on 2 cores) and cached."""
    return _load(seed, str(cache_dir or CACHE_DIR))


def as_images(samples) -> Tensor:
    """(N, 1, 16, 16) float in [-1, 1] from uint8 NHWC (sample.py's npz) or float [-1, 1] NCHW/NHWC, as is."""
    x = torch.as_tensor(samples)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float().clamp(-1, 1)
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if tuple(x.shape[1:]) != (1, 16, 16):
        raise ValueError(f"expected 16x16 digit images, got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def predict(x: Tensor, classifier: DigitClassifier | None = None) -> tuple[Tensor, Tensor]:
    """(probabilities (N, 10), penultimate features (N, 128)) of images in [-1, 1]."""
    net = classifier or load_classifier()
    feats = torch.cat([net.features(b) for b in as_images(x).split(512)])
    return net.head(feats).softmax(1), feats


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """The Frechet distance of two feature sets (N, D), computed as FID is (`diffusion.callbacks.fid.fid_kid`)."""
    from diffusion.callbacks.fid import fid_kid

    return fid_kid(a, b, num_real=len(a), num_fake=len(b), kid_subset_size=min(len(a), len(b)), kid_subsets=1)["fid"]


@cache
def reference(seed: int = 0) -> dict:
    """The real training digits' share at p >= 0.9, the FD floor (two disjoint halves), the FD of 500 training
    digits against the other 1117, and the classifier's accuracy on the held-out digits."""
    net = load_classifier(seed=seed)
    x, _ = digits("train")
    p, feats = predict(x, net)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n = len(x) // 2
    x_val, y_val = digits("val")
    return {
        "real_p90": float((p.max(1).values >= THRESHOLD).float().mean()),
        "fd_floor": frechet_distance(feats[perm[:n]], feats[perm[n : 2 * n]]),
        "fd_real500": frechet_distance(feats[perm[:500]], feats[perm[500:]]),
        "val_accuracy": float((predict(x_val, net)[0].argmax(1) == y_val).float().mean()),
        "train_features": feats,
    }


def score(samples, *, seed: int = 0, threshold: float = THRESHOLD) -> dict:
    """Scores of a batch of samples (see the module doc): share_p90, classes, counts, fd, fd_floor, real_p90."""
    ref = reference(seed)
    p, feats = predict(samples, load_classifier(seed=seed))
    confident = p.max(1).values >= threshold
    counts = torch.bincount(p.argmax(1)[confident], minlength=NUM_CLASSES)
    return {
        "n": len(p),
        "share_p90": float(confident.float().mean()),
        "classes": int((counts > 0).sum()),
        "counts": counts.tolist(),
        "fd": frechet_distance(feats, ref["train_features"]),
        "fd_floor": ref["fd_floor"],
        "fd_real500": ref["fd_real500"],
        "real_p90": ref["real_p90"],
    }


def label_share(samples, label: int, *, threshold: float | None = None, seed: int = 0) -> float:
    """The share of samples the classifier labels `label` (argmax; with `threshold`, also p >= threshold)."""
    p, _ = predict(samples, load_classifier(seed=seed))
    hit = p.argmax(1) == label
    if threshold is not None:
        hit &= p.max(1).values >= threshold
    return float(hit.float().mean())


def format_row(result: dict) -> str:
    """One line: share at p >= 0.9 (and the real digits'), classes drawn, FD next to its floor, class counts."""
    return (
        f"p>=0.9 {100 * result['share_p90']:5.1f}% (real {100 * result['real_p90']:.1f}%)  "
        f"classes {result['classes']:2d}/10  FD {result['fd']:7.2f} (floor {result['fd_floor']:.2f})  "
        f"counts {result['counts']}"
    )


def load_samples(path: str | Path) -> Tensor:
    """The images of an .npz written by sample.py npz=true (uint8 (N, H, W, C) arr_0), as (N, 1, 16, 16) in [-1, 1]."""
    from bench.fid import load_npz

    return as_images(load_npz(Path(path)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="an .npz from sample.py npz=true (uint8 (N, H, W, C) arr_0)")
    p.add_argument("--seed", type=int, default=0, help="the classifier's seed")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line instead")
    args = p.parse_args(argv)
    result = score(load_samples(args.samples), seed=args.seed)
    print(json.dumps(result) if args.json else f"{args.samples}  n={result['n']}  {format_row(result)}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
