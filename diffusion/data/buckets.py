"""Aspect-ratio buckets and crop geometry for image folders (`data.buckets=true`, `data.geometry=true`).

Buckets (as SDXL trains, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis"): a set of
(height, width) sizes, multiples of `data.bucket_step`, each about `data.image_size`^2 pixels, with aspect ratios
(width / height) between `data.bucket_min_ratio` and `data.bucket_max_ratio`. Each image goes to the bucket whose
aspect ratio is nearest its own (in log ratio, so 2:1 and 1:2 are equally far from 1:1), is resized to cover it
and cropped (center, or at a random place per epoch from the seeded stream). Every batch comes from one bucket:
`BucketSampler` shuffles each bucket's images into batches and then the batches across buckets, per epoch from
(seed, epoch), so a resumed run continues the interrupted epoch's batch order exactly.

Crop geometry (SDXL's micro-conditioning): for each item, the size of the file (h, w), the crop's top-left corner
in the pixels of the resized image (before cropping), and the size the network sees. `Crops` computes both the
crop that `load_image` cuts and this geometry from the same numbers, so they always agree.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusion.data.base import ResumableSampler, flip_mask, item_hashes
from diffusion.data.images import Crop
from diffusion.errors import ConfigError

Size = tuple[int, int]  # (height, width) in pixels


def check_buckets(*, image_size: int, step: int, min_ratio: float, max_ratio: float) -> None:
    """One-line ConfigErrors for bucket settings that give no buckets."""
    if step < 1:
        raise ConfigError(f"data.bucket_step={step} must be >= 1")
    if not 0 < min_ratio <= 1 <= max_ratio:
        raise ConfigError(
            f"data.bucket_min_ratio={min_ratio} and data.bucket_max_ratio={max_ratio} (width / height) must satisfy "
            "0 < min <= 1 <= max"
        )
    if image_size < step:
        raise ConfigError(
            f"data.image_size={image_size} is smaller than data.bucket_step={step}: no bucket fits its area; "
            "lower data.bucket_step"
        )


def bucket_sizes(*, area: int, step: int, min_ratio: float, max_ratio: float) -> list[Size]:
    """Every bucket: (h, w), multiples of `step`, for each height the widest width with h * w <= `area`, kept when
    its ratio w / h is within [min_ratio, max_ratio]; with the portrait twin of each landscape size. Sorted by
    ratio (tall to wide)."""
    sizes: set[Size] = set()
    h = step
    while h * h <= area:
        w = area // h // step * step  # the widest multiple of step that keeps h * w <= area
        for size in ((h, w), (w, h)):
            if min_ratio <= size[1] / size[0] <= max_ratio:
                sizes.add(size)
        h += step
    return sorted(sizes, key=lambda s: (s[1] / s[0], s[0]))


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> int:
    """The index of the bucket whose aspect ratio is nearest `size`'s (h, w), in log ratio; ties go to the first."""
    ratio = math.log(size[1] / size[0])
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][1] / buckets[b][0]) - ratio))


def _uniforms(seed: int, epoch: int, i: int) -> tuple[float, float]:
    """Two uniforms in [0, 1) for item i's random crop in this epoch (vertical, horizontal): `item_hashes`, salt 2."""
    h = item_hashes(seed, epoch, [i], salt=2)[0]
    return (h & 0xFFFFFFFF) / 2**32, (h >> 32) / 2**32


class Crops:
    """Each item's crop and its geometry, per epoch: a function of (seed, epoch, item) only, so resumable.

    Args:
        sizes: each item's (h, w) as shown (EXIF-oriented), at full size.
        targets: each item's output (h, w): its bucket, or (S, S).
        square: the square crop of non-bucketed folders (`Preprocess`: the short side, or `crop_size`, resized to S);
            else the bucket's: resized to cover the target, then cropped to it.
        crop_size: with `square`, the side cut before resizing (None: the short side).
        random: a random place per epoch, else the center.
        flip: the items flipped this epoch (`flip_mask`) report the crop's left edge as seen in the mirror image.
        seed: the seeded stream's seed.
    """

    def __init__(
        self,
        *,
        sizes: Sequence[Size],
        targets: Sequence[Size],
        square: bool,
        crop_size: int | None = None,
        random: bool = False,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.sizes, self.targets = list(sizes), list(targets)
        self.square, self.crop_size, self.random, self.flip, self.seed = square, crop_size, random, flip, seed

    def __len__(self) -> int:
        return len(self.sizes)

    def crop(self, i: int, epoch: int) -> tuple[Crop, tuple[int, int], int]:
        """(the crop `load_image` cuts, its (top, left) in the resized image's pixels, the resized image's width)."""
        (h, w), (th, tw) = self.sizes[i], self.targets[i]
        uy, ux = _uniforms(self.seed, epoch, i) if self.random else (None, None)
        if self.square:  # as `crop_resize`: a square in the file's pixels, resized to the target
            side = min(w, h) if self.crop_size is None else min(self.crop_size, w, h)
            left = (w - side) // 2 if ux is None else int(ux * (w - side + 1))
            top = (h - side) // 2 if uy is None else int(uy * (h - side + 1))
            scale = tw / side
            box = (left, top, left + side, top + side)
            return Crop(box, (th, tw)), (round(top * scale), round(left * scale)), round(w * scale)
        scale = max(th / h, tw / w)  # resize to cover the bucket, then crop it
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        top = (rh - th) // 2 if uy is None else int(uy * (rh - th + 1))
        left = (rw - tw) // 2 if ux is None else int(ux * (rw - tw + 1))
        box = (left * w / rw, top * h / rh, (left + tw) * w / rw, (top + th) * h / rh)
        return Crop(box, (th, tw)), (top, left), rw

    def geometry(self, indices: Sequence[int], epoch: int) -> dict[str, Tensor]:
        """SDXL's micro-conditioning of a batch: original_size (h, w), crop_top_left (top, left) in the resized
        image's pixels, target_size (h, w); LongTensors (B, 2). A flipped item's left edge is the mirror's."""
        indices = [int(i) for i in indices]
        flips = flip_mask(self.seed, epoch, indices).tolist() if self.flip else [False] * len(indices)
        corners = []
        for i, flipped in zip(indices, flips, strict=True):
            _, (top, left), rw = self.crop(i, epoch)
            corners.append((top, rw - self.targets[i][1] - left if flipped else left))
        return {
            "original_size": torch.tensor([self.sizes[i] for i in indices], dtype=torch.long).view(-1, 2),
            "crop_top_left": torch.tensor(corners, dtype=torch.long).view(-1, 2),
            "target_size": torch.tensor([self.targets[i] for i in indices], dtype=torch.long).view(-1, 2),
        }


def bucket_batches(buckets: Sequence[int], batch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    """Each bucket's items (positions whose `buckets[i]` is that bucket) in batches of `batch_size`: shuffled
    within each bucket and the incomplete last batch dropped when `generator` is given (training); in order and
    kept otherwise (validation). The batches are in bucket order."""
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(int(b), []).append(i)
    batches = []
    for b in sorted(groups):
        items = groups[b]
        if generator is not None:
            items = [items[k] for k in torch.randperm(len(items), generator=generator).tolist()]
            items = items[: len(items) - len(items) % batch_size]
        batches += [items[k : k + batch_size] for k in range(0, len(items), batch_size)]
    return batches


class BucketSampler(ResumableSampler):
    """The training order of bucketed data: per epoch (seeded by seed + epoch, as `DistributedSampler`), each
    bucket's items shuffled into full batches (the incomplete one of each bucket dropped), the batches shuffled
    across buckets, then dealt out to the ranks in turn (batch k to rank k mod world; the last world - 1 batches at
    most dropped so every rank takes as many steps). Yields this rank's batches' items one after another: the
    loader's batches of `batch_size` are then one bucket each, and a resume skips whole batches.

    Every image is seen at most once per epoch across ranks; each rank's batch of a step may come from another
    bucket than the other ranks' (DDP reduces gradients, whose shapes do not depend on the images').
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        buckets: Sequence[int],
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, seed=seed, num_replicas=num_replicas, rank=rank)
        self.buckets, self.batch_size = list(buckets), batch_size
        full = sum(n // batch_size for n in Counter(self.buckets).values())
        self.steps = full // num_replicas  # batches per rank and epoch

    def epoch_batches(self) -> list[list[int]]:
        """Every rank's batches of this epoch, in order (rank r takes r, r + world, ...)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = bucket_batches(self.buckets, self.batch_size, g)
        order = torch.randperm(len(batches), generator=g).tolist()[: self.steps * self.num_replicas]
        return [batches[k] for k in order]

    def _indices(self) -> Iterator[int]:
        mine = self.epoch_batches()[self.rank :: self.num_replicas]
        return iter([i for batch in mine for i in batch])

    def __len__(self) -> int:
        return self.steps * self.batch_size


class BucketBatches(Dataset):
    """Validation batches of bucketed data, one bucket each, as items of a loader without batching (batch_size=None):
    each bucket's items in order, in batches of `batch_size` (the last one of a bucket may be smaller)."""

    def __init__(self, dataset: Dataset, buckets: Sequence[int], batch_size: int) -> None:
        self.dataset = dataset
        self.batches = bucket_batches(buckets, batch_size, None)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        return self.dataset.__getitems__(self.batches[k])


class Bucketed(Dataset):
    """A cached split spread over one dataset per bucket (a pixel or latent cache file each): item i is row
    `rows[i]` of `parts[buckets[i]]`; a batch's items share a bucket. With `mirrors` (each part's image count, when
    its file also holds the mirror images' latent moments at row n + r), item i of epoch e is read mirrored when
    `flip_mask(seed, e, [i])` says so, as `LatentMoments` does for one file."""

    def __init__(
        self,
        parts: dict[int, Dataset],
        buckets: Sequence[int],
        rows: Sequence[int],
        *,
        mirrors: dict[int, int] | None = None,
        seed: int = 0,
    ) -> None:
        self.parts, self.buckets, self.rows = parts, [int(b) for b in buckets], [int(r) for r in rows]
        self.mirrors, self.seed = mirrors, seed
        first = next(iter(parts.values()))
        self.uint8_batches = getattr(first, "uint8_batches", False)
        self.whole_batches = getattr(first, "whole_batches", False)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]):
        indices = [int(i) for i in indices]
        (b, *others) = {self.buckets[i] for i in indices}
        if others:
            raise ValueError(f"a batch mixes buckets {sorted([b, *others])}: batch bucketed data with BucketSampler")
        rows = [self.rows[i] for i in indices]
        if self.mirrors is not None:
            flips = flip_mask(self.seed, int(self._epoch), indices).tolist()
            rows = [r + self.mirrors[b] * f for r, f in zip(rows, flips, strict=True)]
        return self.parts[b].__getitems__(rows)

    def __getitem__(self, i: int):
        x, y, *_ = self.__getitems__([i])
        return x[0], y[0]


def bucket_summary(buckets: Sequence[Size], assigned: Sequence[int], *, batch_size: int) -> str:
    """One line: the images per bucket (h x w), and how many an epoch drops (each bucket's incomplete batch)."""
    counts = Counter(int(b) for b in assigned)
    parts = [f"{buckets[b][0]}x{buckets[b][1]}: {n}" for b, n in sorted(counts.items())]
    dropped = sum(n % batch_size for n in counts.values())
    return (
        f"data: {len(assigned)} training images in {len(counts)} buckets (h x w: images): {', '.join(parts)}; "
        f"{dropped} left out of each epoch (incomplete batches of data.batch_size={batch_size})"
    )


class CenterCrop:
    """The center crop of an image from its (h, w) alone (the cache's crops): into its nearest bucket when there
    are `buckets`, else the square of `Preprocess` (the short side, or `crop_size`, resized to `image_size`)."""

    def __init__(self, *, buckets: Sequence[Size] | None, image_size: int, crop_size: int | None = None) -> None:
        self.buckets, self.image_size, self.crop_size = buckets, image_size, crop_size

    def target(self, size: Size) -> Size:
        """The (h, w) an image of `size` is cut to."""
        if self.buckets is None:
            return (self.image_size, self.image_size)
        return tuple(self.buckets[nearest_bucket(size, self.buckets)])

    def crops(self, sizes: Sequence[Size], **kwargs) -> Crops:
        """`Crops` of images of `sizes` (kwargs: random, flip, seed)."""
        targets = [self.target(s) for s in sizes]
        return Crops(sizes=sizes, targets=targets, square=self.buckets is None, crop_size=self.crop_size, **kwargs)

    def __call__(self, size: Size) -> Crop:
        return self.crops([size]).crop(0, 0)[0]
