"""FID and KID during training: sample from the (EMA) model, compare with cached real-data features.

FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium";
KID: Binkowski et al. 2018, "Demystifying MMD GANs". Both compare feature statistics of generated and real
images; the values are computed by torchmetrics' `FrechetInceptionDistance` / `KernelInceptionDistance` on
features that are extracted once here (so one Inception pass serves both metrics), in float64.

1. Real features are computed once per (dataset, preprocessing, feature extractor, count) and cached on disk as
   `<cache_dir>/real_<hash>.pt`. The hash covers every datamodule setting that changes the reference pixels
   (image size, channels, crop, crop size, split, path, ...) and which images the split holds; settings that do
   not (batch size, workers, flips, the data cache's folder) leave it alone. Reference images are never flipped.
2. Every N steps each DDP rank generates its contiguous share of `num_samples` images from fixed seeds (sample
   i from noise seed + i, as in `SampleGrid`), so the set of samples does not depend on the number of ranks.
   The network runs in the trainer's precision (bf16 under `bf16-mixed`); the sampler's arithmetic in fp32.
3. Rank 0 feeds the real features, every rank its fake ones; torchmetrics sums (FID) or gathers (KID) the
   states across ranks in `compute`, so the result equals a single-process evaluation of the same samples.

The default extractor is the standard FID Inception-v3: torch-fidelity's port of the TensorFlow graph, fed
uint8 images at their own size, which it resizes to 299x299 with TensorFlow 1.x's bilinear resize, as the
original FID code does. Its weights come from `weights_path` or torch hub's cache (downloaded there once).
They are read weights-only here, before torch-fidelity sees them (it would unpickle the file as code), and
handed to it as tensors we serialised ourselves. A FID that cannot run (no weights offline, a file that is not
plain tensors, no torch-fidelity) stops the run when the callback is built, before training. Any `nn.Module`
mapping images in [-1, 1] to (B, D) features can be injected instead (tests use `RandomFeatures`); its
`cache_key` names it in the cache hash. FID is skipped under `trainer.fast_dev_run` (debug=fdr) and runs once at
the end of `trainer.validate` (train.py validate_only=true).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from diffusion.callbacks.ema import ema_weights
from diffusion.callbacks.progress import bar_enabled
from diffusion.callbacks.sample_grid import generate
from diffusion.data import image_loader, to_unit_range
from diffusion.data.base import _FlipBatch
from diffusion.errors import BadFileError, ConfigError, MissingPathError, PathError
from diffusion.files import atomic_write
from diffusion.progress import progress
from diffusion.samplers import precision_from_trainer

CACHE_FORMAT = 2
log = logging.getLogger(__name__)
info = rank_zero_only(log.info)
INCEPTION_URL = (  # torch-fidelity's weights (its URL_INCEPTION_V3), converted from the TF graph of 2015-12-05
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS = INCEPTION_URL.rsplit("/", 1)[1]  # its file name, also in the torch hub cache
RealSplit = Literal["train", "val"]


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def inception_weights_file(weights_path: str | None) -> Path:
    """The Inception weights file: `weights_path`, else torch hub's cached copy (downloaded there once)."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise MissingPathError(f"callbacks.fid.weights_path={weights_path} does not exist")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not path.is_file():
        rank_zero_info(f"callbacks.fid: downloading the FID Inception weights to {path} (once)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=False)  # temp file, then rename
        except Exception as e:  # offline: URLError, HTTPError, timeouts, ...
            raise PathError(
                f"callbacks.fid: cannot download the FID Inception weights ({first_line(e)}); on offline machines "
                f"download {INCEPTION_URL} once and pass callbacks.fid.weights_path=/path/to/{INCEPTION_WEIGHTS}"
            ) from e
    return path


def load_weights(path: Path, *, name: str) -> tuple[dict[str, Tensor], str]:
    """(state dict, sha256 of the file) of a weights file, read weights-only: a file whose unpickling would run
    code, or that holds anything but named tensors, is refused with a one-line error naming `name`."""
    try:
        data = path.read_bytes()  # read once: what is hashed is what is loaded
    except OSError as e:
        raise PathError(f"{name} cannot be read ({e.strerror or first_line(e)})") from e
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadFileError(f"{name} is not a plain file of tensors (refused to unpickle it: {first_line(e)})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise BadFileError(f"{name} holds no state dict of tensors")
    return state, hashlib.sha256(data).hexdigest()


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 [0, 255], rounded as sample.py's PNGs; a uint8 image u that the data
    pipeline turned into u * 2/255 - 1 comes back as exactly u."""
    return (to_unit_range(x.float()) * 255).round().to(torch.uint8)


class InceptionFeatures(nn.Module):
    """The standard FID Inception-v3 (torch-fidelity's port of the TF graph) as a feature extractor for images
    in [-1, 1].

    Images are quantised to uint8 (as when saved to PNG), grayscale is repeated to RGB, and torch-fidelity
    resizes the uint8 images to 299x299 inside (TF 1.x bilinear, as the original FID). `weights_path` is a local
    copy of `weights-inception-2015-12-05-6726825d.pth`; without it the copy in torch hub's cache is used,
    downloaded there on first use. The file is read weights-only (`load_weights`) before torch-fidelity sees it.
    """

    def __init__(self, *, num_features: int = 2048, weights_path: str | None = None) -> None:
        super().__init__()
        if num_features not in (64, 192, 768, 2048):
            raise ConfigError(f"callbacks.fid.feature_extractor.num_features={num_features} is not 64/192/768/2048")
        from diffusion.optional import require

        feature = "callbacks.fid's Inception features (or set callbacks.fid.feature_extractor)"
        FeatureExtractorInceptionV3 = require(  # noqa: N806 (a class)
            "torch_fidelity.feature_extractor_inceptionv3", feature=feature
        ).FeatureExtractorInceptionV3
        path = inception_weights_file(weights_path)
        name = f"callbacks.fid.weights_path={weights_path}" if weights_path else f"the Inception weights {path}"
        state, sha256 = load_weights(path, name=name)
        # torch-fidelity unpickles its weights file with weights_only=False: it gets tensors we serialised.
        verified = io.BytesIO()
        torch.save(state, verified)
        verified.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", [str(num_features)], feature_extractor_weights_path=verified
            )
        except RuntimeError as e:  # load_state_dict: missing or unexpected keys, wrong shapes
            raise BadFileError(f"{name} is not the FID Inception-v3 weights ({first_line(e)})") from e
        self.num_features = num_features
        self.weights_sha256 = sha256
        self.cache_key = f"inception-v3-tf1x-{num_features}-{sha256[:16]}"

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = to_uint8(x)  # (B, C, H, W) at the images' own size: torch-fidelity resizes uint8 to 299 itself
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        return self.net(x)[0]  # (B, num_features) float32


class RandomFeatures(nn.Module):
    """A fixed, randomly initialised conv net (seeded) as a cheap feature extractor, for tests and smoke runs.

    Its distances are not comparable with Inception FIDs; they do rise and fall with sample quality.
    """

    def __init__(self, *, num_features: int = 32, in_channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.num_features, self.in_channels = num_features, in_channels
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Conv2d(32, num_features, 3)]
        )
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / (conv.weight[0].numel() ** 0.5))
                conv.bias.zero_()
        self.requires_grad_(False)
        self.cache_key = f"random-features-{num_features}-seed{seed}"

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x.mean(dim=(2, 3))  # (B, D)


class _Precomputed(nn.Module):
    """Identity 'extractor' so torchmetrics' metrics take features computed elsewhere."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def fid_kid(
    real: Tensor | None,
    fake: Tensor,
    *,
    num_real: int,
    num_fake: int,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID (mean, std) of two feature sets with torchmetrics, syncing across ranks when distributed.

    Each rank passes its share: `real` on one rank only (None elsewhere), `fake` split in contiguous chunks;
    `num_real`/`num_fake` are the totals. The KID subset size is capped at the smaller total.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    dim = fake.shape[1]
    subset = min(kid_subset_size, num_real, num_fake)
    fid = FrechetInceptionDistance(feature=_Precomputed(dim)).to(fake.device)
    with warnings.catch_warnings():  # "KID will save all extracted features": that is what it is for
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subset_size=subset, subsets=kid_subsets)
    kid = kid.to(fake.device)
    # float64 features: FID's sums are float64 anyway, and its result takes the features' dtype (as do KID's
    # kernels), so float32 features would round the values to float32.
    fake = fake.double()
    # Every rank updates both sides, if only with zero rows: torchmetrics skips empty list states when syncing.
    real = real.to(fake) if real is not None else fake.new_zeros(0, dim)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    fid_value = fid.compute()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID's random subsets: the same on every rank and every run
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid_value), "kid": float(kid_mean), "kid_std": float(kid_std)}


# Datamodule attributes that never change the reference pixels: loader settings, how files are read and checked
# (which files a split holds is keyed separately, by its items), labels, and the training flips (reference images
# are never flipped: `reference_images`).
PIXEL_NEUTRAL = frozenset(
    {
        "batch_size",
        "num_workers",
        "prepare_data_per_node",
        "allow_zero_length_dataloader_with_multiple_devices",
        "trainer",
        "flip",
        "cache",
        "cache_dir",
        "cache_file",
        "verify",
        "download",
        "num_skipped",
        "labels",
        "classes",
        "num_classes",
    }
)


def _plain(value):
    """A datamodule setting as JSON; an unknown object by its repr, so it still changes the key."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def reference_images(datamodule: L.LightningDataModule, split: str) -> Dataset | None:
    """The split's (image, label) dataset as the reference statistics see it: without training flips."""
    pixels = getattr(datamodule, f"{split}_pixels", None)  # a latent cache's datamodule keeps its pixels apart
    dataset = pixels if pixels is not None else getattr(datamodule, f"{split}_set", None)
    return dataset.dataset if isinstance(dataset, _FlipBatch) else dataset


def describe_dataset(datamodule: L.LightningDataModule, split: str) -> dict:
    """What identifies the real images of a split: the datamodule's class, every setting that changes pixels
    (all public attributes but `PIXEL_NEUTRAL`; dataclasses such as the folder's `Preprocess` field by field),
    the split and which items it holds: each file's path, size and modification time (so edited folders get
    new statistics), or the uint8 data cache's content-addressed name and rows."""
    desc: dict = {}
    for name, value in sorted(vars(datamodule).items()):
        if name.startswith("_") or name in PIXEL_NEUTRAL or isinstance(value, Dataset):
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            desc.update({f"{name}.{k}": _plain(v) for k, v in dataclasses.asdict(value).items()})
        else:
            desc[name] = _plain(value)
    desc["class"] = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
    desc["split"] = split
    dataset = reference_images(datamodule, split)
    files, images = getattr(dataset, "files", None), getattr(dataset, "images", None)
    h = hashlib.sha256()
    if files is not None:
        for f in files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        desc["items"] = h.hexdigest()
    elif isinstance(images, (str, Path)):  # a data cache: its name hashes its sources and preprocessing
        rows = torch.as_tensor(getattr(dataset, "rows", [])).tolist()
        h.update(f"{Path(images).name}\0{rows}".encode())
        desc["items"] = h.hexdigest()
    return desc


def cache_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cache_dir).expanduser() / f"real_{digest}.pt"


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    images: Dataset | Tensor,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    bar: str | None = None,
) -> Tensor:
    """(N, D) float32 CPU features of a dataset of (image, label) items or an (N, C, H, W) tensor in [-1, 1];
    with a progress bar labelled `bar` when it is given."""
    if isinstance(images, Tensor):
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = (x for x, _ in image_loader(images, batch_size=batch_size, num_workers=num_workers))
    batches = progress(batches, desc=bar or "", total=math.ceil(len(images) / batch_size), enabled=bar is not None)
    out = [extractor(x.to(device)).float().cpu() for x in batches]
    return torch.cat(out) if out else torch.empty(0, getattr(extractor, "num_features", 0))


def read_real_features(path: Path, *, key: dict, rows: int) -> tuple[Tensor | None, str | None]:
    """(features, None) from the cache file `path` written for `key`; (None, None) when it was written for
    another key (a hash collision: recompute); (None, why) when it is damaged: not a readable file of tensors, or
    no finite (rows, D) float features."""
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        return None, first_line(e)
    if not isinstance(cached, dict) or not isinstance(cached.get("features"), Tensor):
        return None, "no features tensor in it"
    if cached.get("key") != key:
        return None, None
    features = cached["features"]
    if features.dim() != 2 or len(features) != rows or not features.is_floating_point():
        return None, f"features of shape {tuple(features.shape)} and {features.dtype}, not ({rows}, D) float"
    if not torch.isfinite(features).all():
        return None, "non-finite features"
    return features, None


def load_or_compute_real_features(
    extractor: nn.Module,
    dataset: Dataset,
    *,
    key: dict,
    cache_dir: str | Path,
    num_real: int | None,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    bar: bool = False,
) -> tuple[Tensor, Path, bool]:
    """(features, cache file, computed_now). Up to `num_real` images (a seed-0 random subset) of `dataset`.

    Random crops in the dataset's transform run under a fixed seed, so the statistics are reproducible.
    """
    n = len(dataset) if num_real is None else min(num_real, len(dataset))
    key = {**key, "num_real": n, "features": getattr(extractor, "cache_key", type(extractor).__qualname__)}
    key["format"] = CACHE_FORMAT
    path = cache_path(cache_dir, key)
    if path.is_file():
        cached, problem = read_real_features(path, key=json.loads(json.dumps(key, default=str)), rows=n)
        if cached is not None:
            return cached, path, False
        if problem is not None:
            info(f"callbacks.fid: the real-feature cache {path} is damaged ({problem}); computing it again")
    if n < len(dataset):
        dataset = Subset(dataset, sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = extract_features(
            extractor,
            dataset,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            bar=f"FID reference features ({n} images, once)" if bar else None,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    cached = {"features": features, "key": json.loads(json.dumps(key, default=str))}
    atomic_write(path, lambda f: torch.save(cached, f))  # a crash never leaves a half-written cache
    return features, path, True


class FID(L.Callback):
    """Logs `val/fid`, `val/kid` (and `val/kid_std`, `val/fid_num_samples`) every `every_n_steps` and at the end.

    Args:
        sampler: a sampler with its options bound (a fast one: the conf uses DDIM), as for `SampleGrid`.
        feature_extractor: an `nn.Module`, or a zero-argument factory of one (a Hydra `_partial_`); default:
            `InceptionFeatures(weights_path=weights_path)`. Built here, so a FID that cannot run (no weights,
            unsafe weights, no torch-fidelity) stops the run before training starts.
        weights_path: a local copy of the Inception weights for the default extractor (read weights-only).
        num_samples: generated images per evaluation, split across DDP ranks (10k-50k for numbers to publish).
        num_real: real images for the statistics (null: the whole split); cached in `cache_dir`.
        real_split: "train" or "val" images of the datamodule.
        every_n_steps: period in optimizer steps (0 or null: only at the end when `at_end`).
        batch_size: images per sampling / feature-extraction batch.
        seed: sample i starts from noise seed + i; the same seed gives the same samples every evaluation.
        kid_subset_size, kid_subsets: KID's subset sampling (the size is capped by the sample counts).
        use_ema: sample with the EMA callback's weights when there is one.
    """

    def __init__(
        self,
        *,
        sampler: Callable[..., Tensor],
        feature_extractor: nn.Module | Callable[[], nn.Module] | None = None,
        weights_path: str | None = None,
        num_samples: int = 10_000,
        num_real: int | None = 10_000,
        real_split: RealSplit = "train",
        every_n_steps: int | None = 10_000,
        at_end: bool = True,
        batch_size: int = 256,
        seed: int = 0,
        cache_dir: str = "~/.cache/diffusion/fid",
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        use_ema: bool = True,
    ) -> None:
        if num_samples < 2:
            raise ConfigError(f"callbacks.fid.num_samples={num_samples} must be >= 2")
        if num_real is not None and num_real < 2:
            raise ConfigError(f"callbacks.fid.num_real={num_real} must be >= 2 (or null for the whole split)")
        if real_split not in ("train", "val"):
            raise ConfigError(f"callbacks.fid.real_split={real_split!r} is not one of 'train', 'val'")
        if batch_size < 1:
            raise ConfigError(f"callbacks.fid.batch_size={batch_size} must be >= 1")
        self.sampler = sampler
        self.num_samples = num_samples
        self.num_real = num_real
        self.real_split = real_split
        self.every_n_steps = every_n_steps or 0
        self.at_end = at_end
        self.batch_size = batch_size
        self.seed = seed
        self.cache_dir = cache_dir
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets
        self.use_ema = use_ema
        if feature_extractor is None:
            self.extractor = InceptionFeatures(weights_path=weights_path)
        else:
            self.extractor = feature_extractor if isinstance(feature_extractor, nn.Module) else feature_extractor()
        self.real: Tensor | None = None
        self.num_real_used = 0
        self.cache_file: Path | None = None
        self.real_computed = 0  # times the real statistics were computed (not read from the cache)
        self.last_step: int | None = None
        self.history: list[dict] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if getattr(trainer.datamodule, "buckets", False):
            raise ConfigError(
                "callbacks.fid needs images of one shape, and data.buckets=true gives several: leave callbacks.fid "
                "off (or train without buckets)"
            )
        if stage in ("fit", "validate"):
            self.extractor = self.extractor.eval().to(pl_module.device)

    def on_fit_start(self, trainer, pl_module) -> None:
        """The real features now (read, checked, rebuilt when damaged, or computed): a cache or reference set that
        cannot serve stops or is repaired at start-up, not when the first FID is due hours into training."""
        if not trainer.fast_dev_run and (self.every_n_steps or self.at_end) and self.real is None:
            self._real_features(trainer, pl_module)

    def _real_features(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank 0 computes (or reads) the cached real features; the other ranks then read the file."""
        dm = trainer.datamodule
        if dm is None:
            raise ConfigError("callbacks.fid needs a datamodule (trainer.fit(..., datamodule=...)) for real images")
        dataset = reference_images(dm, self.real_split)
        if dataset is None or len(dataset) < 2:
            raise ConfigError(
                f"callbacks.fid.real_split={self.real_split}: the datamodule has fewer than 2 such images"
            )
        kwargs = dict(
            key=describe_dataset(dm, self.real_split),
            cache_dir=self.cache_dir,
            num_real=self.num_real,
            batch_size=self.batch_size,
            device=pl_module.device,
            num_workers=getattr(dm, "num_workers", 0),
        )
        if trainer.is_global_zero:
            self.real, self.cache_file, computed = load_or_compute_real_features(
                self.extractor, dataset, **kwargs, bar=bar_enabled(trainer)
            )
            self.real_computed += computed
            rank_zero_info(
                f"callbacks.fid: {'computed' if computed else 'cached'} real features of {len(self.real)} "
                f"{self.real_split} images: {self.cache_file}"
            )
        trainer.strategy.barrier("fid_real_features")
        if not trainer.is_global_zero:
            self.real, self.cache_file, _ = load_or_compute_real_features(self.extractor, dataset, **kwargs)
        self.num_real_used = len(self.real)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate this rank's share, compute FID/KID across ranks, log on rank 0; returns the metrics."""
        if self.real is None:
            self._real_features(trainer, pl_module)
        rank, world = trainer.global_rank, trainer.world_size
        lo, hi = rank * self.num_samples // world, (rank + 1) * self.num_samples // world  # contiguous share
        precision = precision_from_trainer(getattr(trainer, "precision", None))  # the network's; sampler: fp32
        bar = bar_enabled(trainer) and trainer.is_global_zero
        chunks = [range(i, min(i + self.batch_size, hi)) for i in range(lo, hi, self.batch_size)]
        with ema_weights(trainer if self.use_ema else None, pl_module):  # sample i depends on i only: any chunks
            fake = torch.cat(
                [
                    generate(
                        pl_module.model, self.sampler, chunk, seed=self.seed, batch_size=len(chunk), precision=precision
                    )
                    for chunk in progress(chunks, desc=f"FID samples ({hi - lo})", enabled=bar)
                ]
            )
        fake_features = extract_features(
            self.extractor,
            fake,
            batch_size=self.batch_size,
            device=pl_module.device,
            bar="FID features" if bar else None,
        )
        values = fid_kid(
            self.real if rank == 0 else None,
            fake_features.to(pl_module.device),
            num_real=self.num_real_used,
            num_fake=self.num_samples,
            kid_subset_size=self.kid_subset_size,
            kid_subsets=self.kid_subsets,
            seed=self.seed,
        )
        metrics = {
            "val/fid": values["fid"],
            "val/kid": values["kid"],
            "val/kid_std": values["kid_std"],
            "val/fid_num_samples": float(self.num_samples),
            "val/fid_num_real": float(self.num_real_used),
        }
        step = trainer.global_step
        self.last_step = step
        self.history.append({"step": step, **metrics})
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            rank_zero_info(
                f"step {step}: val/fid {values['fid']:.3f}, val/kid {values['kid']:.5f} "
                f"({self.num_samples} samples vs {self.num_real_used} real)"
            )
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.fast_dev_run:  # debug=fdr: one batch to find a crash, not thousands of samples
            return
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.global_step != self.last_step and not trainer.fast_dev_run:
            self.evaluate(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # trainer.validate (train.py validate_only=true): the checkpoint's FID
            self.evaluate(trainer, pl_module)
