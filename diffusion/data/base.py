"""What every DataModule shares: value ranges, the fixed-seed split, loader settings, the uint8 batch collate.

Image datasets here hand out uint8 pixels (C, H, W) and build whole batches at once (`__getitems__`); the
`Uint8Batch` collate converts the batch to float in [-1, 1], so a uint8 cache, an in-memory array and a decoded
file all reach the model through the same few lines. Also holds the built-in `DigitsDataModule` (scikit-learn's
8x8 digits, no files needed).

Captioned data yields `(images, captions)` with captions a list of strings (`Captioned`): an item with several
captions gets one of them per epoch; with crop geometry (`data.geometry=true`) the conditions are instead a dict of
the captions and each image's original size, crop corner and target size (SDXL's micro-conditioning). The
built-in digits can be captioned from their labels (`captions=true`: "a handwritten seven", "the digit 7", ...),
for text-to-image on a CPU.

Training data is resumable: the order is a seeded permutation per epoch (`ResumableSampler`), and each random
flip and caption choice is a function of (seed, epoch, item), so the datamodule's `state_dict` (epoch and
position, saved in every checkpoint by Lightning) is all a resumed run needs to see the same batches as a run
that never stopped.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from diffusion.errors import ConfigError


def to_model_range(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2 - 1


def to_unit_range(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def default_num_workers(*, decoding: bool) -> int:
    """Loader workers when data.num_workers=null: up to 8 to decode files, 2 to slice arrays already in memory."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8 if decoding else 2, cpus)


class Uint8Batch:
    """Collate for datasets whose `__getitems__` returns a whole batch `(uint8 (B, C, H, W), long (B,)[, ...])`.

    Scales the images to float in [-1, 1]; what follows them (labels, captions) passes as it is. Runs in the loader
    workers, so the main process receives ready batches. A class, not a closure, so spawned workers can pickle it.
    """

    def __call__(self, batch: tuple) -> tuple:
        x, *rest = batch  # (B, C, H, W) uint8, then (B,) long labels [, B captions]
        return (x.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0), *rest)  # one float buffer: [0, 255] -> [-1, 1]


def item_hashes(seed: int, epoch: int, indices: Sequence[int], *, salt: int = 0) -> list[int]:
    """A 64-bit hash per (salt, seed, epoch, index): the same in any process.

    A hash (splitmix64's finalizer), not a generator's stream: the answer depends on the item only, not on
    what was drawn before, so a run resumed mid-epoch (or one whose loader workers are restarted) draws alike.
    `salt` separates independent choices about the same item (flips: 0, captions: 1).
    """
    mask = (1 << 64) - 1
    out = []
    for i in indices:
        z = ((((salt * 1_000_003 + seed) * 1_000_003 + epoch) * 1_000_003 + int(i)) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def flip_mask(seed: int, epoch: int, indices: Sequence[int]) -> Tensor:
    """Which items of an epoch are flipped: a fair coin per (seed, epoch, index) (`item_hashes`)."""
    return torch.tensor([h & 1 for h in item_hashes(seed, epoch, indices)], dtype=torch.bool)


class _EpochAware(Dataset):
    """A dataset wrapper whose items depend on the epoch, set by `ResumableSampler.set_epoch` through a
    shared-memory tensor that the loader workers (persistent ones too) read; passed on to the wrapped dataset."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _batch(self, indices: list[int]):
        """The wrapped dataset's items: a whole uint8 batch (a tuple) or a list of (image, condition) pairs."""
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(indices)
        return [self.dataset[i] for i in indices]


def caption_lines(text: str) -> list[str]:
    """The captions of a caption text (one per non-empty line; `[""]`, the null caption, when it has none)."""
    return [line.strip() for line in text.splitlines() if line.strip()] or [""]


def pick_captions(seed: int, epoch: int, indices: Sequence[int], captions: Sequence[Sequence[str]]) -> list[str]:
    """One caption of each item for this epoch: item i gets `captions[k][h % len(captions[k])]` (k its position),
    h = `item_hashes(seed, epoch, [i], salt=1)`; folders, HF datasets and shards all draw this way."""
    hashes = item_hashes(seed, epoch, indices, salt=1)
    return [c[h % len(c)] for c, h in zip(captions, hashes, strict=True)]


class Captioned(_EpochAware):
    """(image, caption) items from an (image, label) dataset and each item's captions: item i of epoch e gets one
    of `captions[i]` (`pick_captions`).

    With `crops` (`diffusion.data.buckets.Crops`, data.geometry=true) a batch's conditions are the dict
    {"caption": list[str], "original_size", "crop_top_left", "target_size": LongTensor (B, 2)} (SDXL's
    micro-conditioning) in place of the list of captions.
    """

    def __init__(self, dataset: Dataset, captions: Sequence[Sequence[str]], seed: int = 0, crops=None) -> None:
        super().__init__(dataset, seed)
        if len(captions) != len(dataset):
            raise ValueError(f"{len(captions)} caption lists for {len(dataset)} items")
        self.captions = captions
        self.crops = crops

    def pick(self, indices: Sequence[int]) -> list[str]:
        return pick_captions(self.seed, int(self._epoch), indices, [self.captions[int(i)] for i in indices])

    def conditions(self, indices: Sequence[int]) -> list[str] | dict:
        """The batch's captions, or with `crops` the dict of captions and crop geometry."""
        captions = self.pick(indices)
        if self.crops is None:
            return captions
        return {"caption": captions, **self.crops.geometry(indices, int(self._epoch))}

    def __getitem__(self, i: int):
        return self.dataset[i][0], self.pick([i])[0]

    def __getitems__(self, indices: list[int]):
        batch = self._batch(indices)
        if isinstance(batch, tuple):  # a whole uint8 batch: (B, C, H, W), labels
            return batch[0], self.conditions(indices)
        if self.crops is not None:
            raise ValueError("crop geometry needs a dataset that returns whole batches")
        return [(x, c) for (x, _), c in zip(batch, self.pick(indices), strict=True)]


# Lightning's warning on every mid-epoch resume of a DataLoader without state_dict (ours resume through the sampler)
RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class ResumableSampler(DistributedSampler):
    """The training order: a permutation of the dataset per epoch, seeded by (seed, epoch), that can start
    mid-epoch.

    A `DistributedSampler` (so Lightning uses it as it is under DDP, each rank its shard, instead of wrapping it);
    with one process it is a seeded shuffle. `resume(epoch, position)` makes the next iteration of that epoch
    skip the first `position` indices of this rank (those trained before the checkpoint). `set_epoch` also tells
    the dataset (when it has `set_epoch`, e.g. `_FlipBatch`) so per-epoch flips follow.
    """

    def __init__(self, dataset: Dataset, *, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def resume(self, epoch: int, position: int) -> None:
        self._resume_at = (epoch, position)

    def _indices(self) -> Iterator[int]:
        """This rank's order of the epoch, from its start (`BucketSampler` orders by bucket batches)."""
        return super().__iter__()

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            skip = self._resume_at[1]
            self._resume_at = None
        return itertools.islice(self._indices(), skip, None)


class ArrayImages(Dataset):
    """uint8 images (N, C, H, W) with long labels (N,), in memory (a tensor) or memory-mapped (an .npy path).

    A memmap is opened lazily in each process: pickling an open np.memmap to a worker would copy the array.
    """

    uint8_batches = True  # batches need the Uint8Batch collate

    def __init__(self, images: Tensor | str | Path, labels: Tensor, rows: list[int] | None = None) -> None:
        self.images = images
        self.labels = labels
        self.rows = torch.arange(len(labels)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self._array = None

    def __len__(self) -> int:
        return len(self.rows)

    def _images(self):
        if self._array is None:
            if isinstance(self.images, Tensor):
                self._array = self.images
            else:
                import numpy as np

                self._array = np.load(self.images, mmap_mode="r")
        return self._array

    def __getitems__(self, index: list[int]) -> tuple[Tensor, Tensor]:
        rows = self.rows[torch.as_tensor(index, dtype=torch.long)]  # a list of ints or of 0-d tensors (Subset's)
        array = self._images()
        if isinstance(array, Tensor):
            return array[rows], self.labels[rows]
        order = rows.argsort()  # memmaps read fastest in ascending order
        x = torch.empty((len(rows), *array.shape[1:]), dtype=torch.uint8)
        x[order] = torch.from_numpy(array[rows[order].numpy()])
        return x, self.labels[rows]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


class LatentMoments(Dataset):
    """Cached latent moments (mean and log-variance of q(z | x), float32 (N, 2c, h, w), memory-mapped .npy) with
    long labels: the codec samples a latent from them per step. With `mirrors` = N the file also holds each image's
    mirror image's moments at row N + i, and training item i of epoch e is mirrored when `flip_mask(seed, e, [i])`
    says so, as `_FlipBatch` flips pixels (an encoded mirror image, not mirrored latents)."""

    whole_batches = True  # __getitems__ returns the batch: the loader passes it on as it is

    def __init__(
        self, moments: str | Path, labels: Tensor, rows: list[int], *, mirrors: int | None = None, seed: int = 0
    ) -> None:
        self.moments, self.labels, self.mirrors, self.seed = moments, labels, mirrors, seed
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._array = None

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, index: list[int]) -> tuple[Tensor, Tensor]:
        import numpy as np

        if self._array is None:
            self._array = np.load(self.moments, mmap_mode="r")
        index = torch.as_tensor(index, dtype=torch.long)
        rows = self.rows[index]
        if self.mirrors:
            rows = rows + self.mirrors * flip_mask(self.seed, int(self._epoch), index.tolist()).long()
        order = rows.argsort()  # memmaps read fastest in ascending order
        x = torch.empty((len(rows), *self._array.shape[1:]), dtype=torch.float32)
        x[order] = torch.from_numpy(np.ascontiguousarray(self._array[rows[order].numpy()]))
        return x, self.labels[self.rows[index]]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


def _whole_batch(batch):
    return batch


def batch_collate(dataset: Dataset):
    """The collate of a loader over `dataset` (see `image_loader`): `Uint8Batch` for datasets that yield whole
    uint8 batches, the identity for whole batches of another kind, else None (the default)."""
    inner = dataset
    while isinstance(inner, (Subset, _EpochAware)):  # e.g. FID's random subset of real images
        inner = inner.dataset
    if getattr(inner, "uint8_batches", False):
        return Uint8Batch()
    return _whole_batch if getattr(inner, "whole_batches", False) else None


def image_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    flip: bool = False,
    num_workers: int = 0,
    sampler: ResumableSampler | None = None,
) -> DataLoader:
    """A DataLoader of (float images in [-1, 1], labels) batches over any of our datasets.

    Datasets that yield whole uint8 batches (`uint8_batches`, also behind a `Subset`, which passes `__getitems__`
    on) get the `Uint8Batch` collate; others the default. `flip` flips items at random (`_FlipBatch`); a
    `sampler` (the training order) implies shuffling. Shuffled loaders drop the last partial batch. Use this
    (not a bare DataLoader) wherever images are read.
    """
    if flip and not isinstance(dataset, _FlipBatch):
        dataset = _FlipBatch(dataset, flip=True)
    shuffled = shuffle or sampler is not None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        drop_last=shuffled and len(dataset) >= batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=batch_collate(dataset),
    )


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed-seed shuffle of range(n) split into (train, val); val gets round(n * val_fraction) items."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction)
    if n_val == 0 and val_fraction > 0 and n > 1:
        n_val = 1
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class _SplitDataModule(L.LightningDataModule):
    """Shared loader settings and the train/val split; subclasses build `self.dataset` in `setup`."""

    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        batch_size: int,
        val_fraction: float,
        seed: int,
        num_workers: int | None,
        flip: bool,
        decoding: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels} must be 1 (grayscale) or 3 (RGB)")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0 (or null for automatic)")
        if image_size < 1:
            raise ConfigError(f"data.image_size={image_size} must be >= 1")
        split_indices(0, val_fraction, seed)  # validates val_fraction early
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.flip = flip
        self.num_workers = default_num_workers(decoding=decoding) if num_workers is None else num_workers
        self.num_classes: int | None = None
        self.train_captions: list[list[str]] | None = None  # captioned data: each training item's captions
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._sampler: ResumableSampler | None = None  # the training order, once train_dataloader built it
        self._resume_state: dict | None = None  # from a checkpoint, for the next train_dataloader

    @property
    def captioned(self) -> bool:
        """Whether batches hold captions (a list of strings) in place of labels."""
        return False

    def caption_corpus(self) -> list[str] | None:
        """Every caption of the training items (for a text encoder's tokenizer), None for data without captions."""
        if not self.captioned:
            return None
        self.setup("fit")
        return [c for captions in self.train_captions for c in captions]

    def _split(self, dataset: Dataset) -> None:
        train_idx, val_idx = split_indices(len(dataset), self.val_fraction, self.seed)
        self.train_set = Subset(dataset, train_idx)
        self.val_set = Subset(dataset, val_idx)

    def _loader(self, dataset: Dataset, shuffle: bool, flip: bool = False) -> DataLoader:
        return image_loader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, flip=flip, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        """The training loader: the order from `ResumableSampler` (each DDP rank its shard), flips per item."""
        dataset = self.train_set
        if self.flip and not isinstance(dataset, _FlipBatch):
            dataset = _FlipBatch(dataset, flip=True, seed=self.seed)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._sampler = self._train_sampler(dataset, num_replicas=world, rank=rank)
        if self._resume_state:
            self._sampler.resume(self._resume_state["epoch"], self._resume_state["position"])
            self._resume_state = None
        return image_loader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, sampler=self._sampler)

    def _train_sampler(self, dataset: Dataset, *, num_replicas: int, rank: int) -> ResumableSampler:
        """The training order (bucketed folders batch by bucket: `BucketSampler`)."""
        return ResumableSampler(dataset, seed=self.seed, num_replicas=num_replicas, rank=rank)

    def state_dict(self) -> dict:
        """Where the training data stands (saved in checkpoints): the epoch and how many of its items this rank
        has trained on (the batches whose training step ran; prefetched ones are not counted)."""
        trainer = self.trainer
        if self._sampler is None or trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self._sampler.epoch, "position": done * self.batch_size}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_state = dict(state_dict) if state_dict else None
        if self._resume_state:
            # Lightning warns that a mid-epoch resume is unreliable unless the DataLoader object is stateful; ours
            # resumes through its sampler (the position restored here), so that warning is wrong for these runs.
            from lightning.pytorch.utilities.warnings import PossibleUserWarning

            warnings.filterwarnings("ignore", message=RESUME_WARNING, category=PossibleUserWarning)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class _FlipBatch(_EpochAware):
    """Random horizontal flips on any of our (image, label) datasets: item i of epoch e is mirrored when
    `flip_mask(seed, e, [i])` says so."""

    def __init__(self, dataset: Dataset, flip: bool, seed: int = 0) -> None:
        super().__init__(dataset, seed)
        self.flip = flip

    def _mask(self, indices: Sequence[int]) -> Tensor:
        if not self.flip:
            return torch.zeros(len(indices), dtype=torch.bool)
        return flip_mask(self.seed, int(self._epoch), indices)

    def __getitem__(self, i: int):
        x, *rest = self.dataset[i]
        return ((x.flip(-1) if self._mask([i])[0] else x), *rest)

    def __getitems__(self, indices: list[int]):
        flips = self._mask(indices)
        batch = self._batch(indices)
        if isinstance(batch, tuple):  # a whole uint8 batch: (B, C, H, W), (B,)[, captions]
            x = batch[0]
            x[flips] = x[flips].flip(-1)  # x is this batch's own copy
            return batch
        return [(x.flip(-1) if f else x, *rest) for (x, *rest), f in zip(batch, flips, strict=True)]


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# How `DigitsDataModule(captions=true)` describes a digit: {word} is "seven", {digit} is "7".
DIGIT_CAPTIONS = (
    "a handwritten {word}",
    "the digit {digit}",
    "a {digit}",
    "the number {word}",
    "a drawing of a {word}",
    "handwritten digit {digit}",
    "{word}",
)


def digit_captions(label: int) -> list[str]:
    """The captions of a digit: every phrasing of `DIGIT_CAPTIONS`."""
    return [t.format(word=DIGIT_WORDS[label], digit=label) for t in DIGIT_CAPTIONS]


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's bundled 8x8 digits (values 0..16), upscaled to `image_size` with bilinear filtering.

    `channels=3` repeats the gray channel, for models that expect RGB. `captions=true` yields captions made from
    the labels ("a handwritten seven", "the digit 7", "a 7", ...; one of them per item and epoch) in place of
    the labels, for text conditioning.
    """

    def __init__(
        self,
        *,
        image_size: int = 16,
        channels: int = 1,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int | None = 0,
        flip: bool = False,
        captions: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            flip=flip,
        )
        self.captions = captions
        self.num_classes = None if captions else 10

    @property
    def captioned(self) -> bool:
        return self.captions

    def load(self) -> tuple[Tensor, Tensor]:
        """All 1797 digits as ((N, 1, S, S) in [-1, 1], (N,) labels)."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = to_model_range(x.clamp(0, 1)).expand(-1, self.channels, -1, -1).contiguous()
        return x, torch.from_numpy(digits.target).long()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self.load()
        self._split(TensorDataset(x, y))
        if self.captions:
            per_label = [digit_captions(k) for k in range(10)]
            self.train_captions = [per_label[int(y[i])] for i in self.train_set.indices]
            val_captions = [per_label[int(y[i])] for i in self.val_set.indices]
            self.train_set = Captioned(self.train_set, self.train_captions, seed=self.seed)
            self.val_set = Captioned(self.val_set, val_captions, seed=self.seed)
        self.train_set = _FlipBatch(self.train_set, self.flip, seed=self.seed)
