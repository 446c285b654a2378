"""LightningDataModules that yield (images, labels) batches with images scaled to [-1, 1].

- `DigitsDataModule`: the built-in dataset, scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
  classes) upscaled to 16x16. Needs no network and fits in memory, so it trains in minutes on a CPU.
- `ImageFolderDataModule`: any folder of images (recursive, stable order), resized and center-cropped to a
  square, optionally flipped, with optional class labels from the first-level subfolder names.

Every module exposes `image_size`, `channels` and `num_classes` (None when unlabeled; labels are then -1),
which the configs interpolate into the model. The validation split is a fixed-seed fraction of the data.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_model_range(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2 - 1


def to_unit_range(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed-seed shuffle of range(n) split into (train, val); val gets round(n * val_fraction) items."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
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
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels} must be 1 (grayscale) or 3 (RGB)")
        if image_size < 1:
            raise ValueError(f"data.image_size={image_size} must be >= 1")
        split_indices(0, val_fraction, seed)  # validates val_fraction early
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.flip = flip
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.num_classes: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _split(self, dataset: Dataset) -> None:
        train_idx, val_idx = split_indices(len(dataset), self.val_fraction, self.seed)
        self.train_set = Subset(dataset, train_idx)
        self.val_set = Subset(dataset, val_idx)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class _FlipBatch(Dataset):
    """Random horizontal flips on an in-memory (image, label) dataset."""

    def __init__(self, dataset: Dataset, flip: bool) -> None:
        self.dataset, self.flip = dataset, flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, y


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's bundled 8x8 digits (values 0..16), upscaled to `image_size` with bilinear filtering.

    `channels=3` repeats the gray channel, for models that expect RGB.
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
        self.num_classes = 10

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
        self.train_set = _FlipBatch(self.train_set, self.flip)


class ImageFileDataset(Dataset):
    """Decodes one image file per item: resize the short side, center crop, optional flip, to [-1, 1]."""

    def __init__(self, files: list[Path], labels: list[int], *, image_size: int, channels: int, flip: bool) -> None:
        from torchvision.transforms import v2

        self.files, self.labels, self.channels = files, labels, channels
        steps = [
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
        ]
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        steps.append(v2.ToDtype(torch.float32, scale=True))
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
        except Exception as e:  # PIL raises many types for bad files; name the file in one line
            raise ValueError(f"cannot decode image {path}: {e}") from e
        return to_model_range(self.transform(img)), self.labels[i]


def scan_images(root: Path) -> list[Path]:
    """All image files below `root`, recursively, in a stable (sorted) order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolderDataModule(_SplitDataModule):
    """A folder of images, e.g. `data=folder data.path=~/photos`.

    Args:
        path: the folder; scanned recursively for .png/.jpg/.jpeg/.webp/.bmp files.
        image_size: output side length; the short side is resized to it, then center cropped.
        channels: 3 for RGB, 1 for grayscale.
        labels: class labels from the first-level subfolder names (sorted); else labels are -1.
        allow_upscale: accept images smaller than `image_size` (they are upscaled); else that is an error.
        skip_bad: skip files that cannot be read (and report how many) instead of stopping with an error.
    """

    def __init__(
        self,
        *,
        path: str,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int | None = None,
        flip: bool = True,
        labels: bool = False,
        allow_upscale: bool = False,
        skip_bad: bool = False,
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
        if path is None or str(path) in ("", "???"):
            raise ValueError("data.path is not set: pass data.path=/path/to/images")
        self.path = Path(path).expanduser()
        self.labels = labels
        self.allow_upscale = allow_upscale
        self.skip_bad = skip_bad
        self.num_skipped = 0
        if labels:
            self.classes = self._classes()
            self.num_classes = len(self.classes)

    def _classes(self) -> list[str]:
        self._check_root()
        classes = sorted(p.name for p in self.path.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"data.labels=true but data.path={self.path} has no subfolders to use as classes")
        return classes

    def _check_root(self) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"data.path={self.path} does not exist")
        if not self.path.is_dir():
            raise NotADirectoryError(f"data.path={self.path} is not a folder")

    def _check_file(self, path: Path) -> str | None:
        """Why `path` cannot be used, or None. Reads only the header."""
        from PIL import Image

        try:
            with Image.open(path) as img:
                w, h = img.size
        except Exception as e:
            return f"cannot read image {path}: {e}"
        if min(w, h) < self.image_size and not self.allow_upscale:
            return (
                f"image {path} is {w}x{h}, smaller than data.image_size={self.image_size} "
                "(set data.allow_upscale=true to upscale it)"
            )
        return None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._check_root()
        files = scan_images(self.path)
        if not files:
            raise ValueError(f"data.path={self.path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        good = []
        for f in files:
            problem = self._check_file(f)
            if problem is None:
                good.append(f)
            elif not self.skip_bad:
                raise ValueError(f"{problem}; set data.skip_bad=true to skip such files")
        self.num_skipped = len(files) - len(good)
        if self.num_skipped:
            print(f"data: skipped {self.num_skipped} unreadable or too-small files in {self.path}")
        if not good:
            raise ValueError(f"data.path={self.path} holds no usable images")
        if self.labels:
            index = {c: i for i, c in enumerate(self.classes)}
            labels = [index.get(f.relative_to(self.path).parts[0], -1) for f in good]
            stray = [f for f, y in zip(good, labels) if y < 0]
            if stray:
                raise ValueError(f"data.labels=true but {stray[0]} is not inside a class subfolder")
        else:
            labels = [-1] * len(good)
        train_idx, val_idx = split_indices(len(good), self.val_fraction, self.seed)
        common = dict(image_size=self.image_size, channels=self.channels)
        self.train_set = ImageFileDataset(
            [good[i] for i in train_idx], [labels[i] for i in train_idx], flip=self.flip, **common
        )
        self.val_set = ImageFileDataset([good[i] for i in val_idx], [labels[i] for i in val_idx], flip=False, **common)
