"""CIFAR-10 (`data=cifar10`) and MNIST (`data=mnist`): small standard sets held in memory as uint8 arrays.

Both use the official train/test split (test = validation) and their class labels (10 classes each). Files are
read from `data.root` in the layout torchvision uses; `data.download=true` fetches them through torchvision
(online only). Offline with the files missing, setup stops with one line saying which files to put where.

CIFAR-10's python pickles are read here rather than through torchvision.datasets.CIFAR10, whose constructor
md5-checks every batch file; the layout and decoding are the same (3072 bytes per image, R then G then B
planes, row-major), and the download path does use torchvision, which verifies what it fetches.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.data.base import ArrayImages, _SplitDataModule
from diffusion.errors import BadFileError, ConfigError, MissingPathError, PathError
from diffusion.files import atomic_write

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def resize_uint8(x: Tensor, *, image_size: int, channels: int) -> Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, S, S): antialiased bilinear resize, gray<->RGB conversion."""
    if x.shape[1] == 3 and channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x.float() * w).sum(1, keepdim=True).round().to(torch.uint8)
    elif x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        chunks = []
        for part in x.split(4096):  # bounded float memory
            y = F.interpolate(part.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
            chunks.append(y.round().clamp(0, 255).to(torch.uint8))
        x = torch.cat(chunks)
    return x.contiguous()


class _ArrayDataModule(_SplitDataModule):
    """Train and val uint8 arrays loaded once in `setup` (subclasses implement `read(train)`)."""

    name = "dataset"

    def __init__(
        self,
        *,
        root: str,
        image_size: int,
        channels: int,
        batch_size: int,
        seed: int,
        num_workers: int | None,
        flip: bool,
        download: bool,
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            val_fraction=0.0,
            seed=seed,
            num_workers=num_workers,
            flip=flip,
        )
        if root is None or str(root) in ("", "???"):
            raise ConfigError("data.root is not set: pass data.root=/path/to/datasets")
        self.root = Path(root).expanduser()
        self.download = download
        self.num_classes = 10

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def fetch(self) -> None:
        raise NotImplementedError

    def missing(self) -> str | None:
        """One line naming the missing files and where they go, or None when all are present."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        if self.missing() is None or not self.download:
            return
        try:
            self.fetch()
        except Exception as e:
            raise PathError(
                f"data.download=true but fetching {self.name} into {self.root} failed ({e}); {self.missing()}"
            ) from e

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.missing() is not None and self.download:
            self.prepare_data()
        problem = self.missing()
        if problem is not None:
            raise MissingPathError(f"{problem} (or set data.download=true when online)")
        for train in (True, False):
            x, y = self.read(train)
            dataset = ArrayImages(resize_uint8(x, image_size=self.image_size, channels=self.channels), y)
            if train:
                self.train_set = dataset
            else:
                self.val_set = dataset


class CIFAR10DataModule(_ArrayDataModule):
    """CIFAR-10: 50,000 train / 10,000 test 32x32 RGB images, 10 classes, from `<root>/cifar-10-batches-py/`."""

    name = "CIFAR-10"

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int | None = None,
        flip: bool = True,
        download: bool = False,
    ) -> None:
        super().__init__(
            root=root,
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            seed=seed,
            num_workers=num_workers,
            flip=flip,
            download=download,
        )
        self.folder = self.root / "cifar-10-batches-py"
        self.classes: list[str] | None = None

    def _files(self, train: bool) -> list[str]:
        return [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]

    def missing(self) -> str | None:
        names = [*self._files(True), *self._files(False), "batches.meta"]
        absent = [n for n in names if not (self.folder / n).is_file()]
        if not absent:
            return None
        return (
            f"CIFAR-10 not found: {self.folder} lacks {', '.join(absent)}; unpack {CIFAR10_URL} "
            f"into data.root={self.root}"
        )

    def fetch(self) -> None:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(self.root), train=True, download=True)

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for name in self._files(train):
            with open(self.folder / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            if not isinstance(batch, dict) or "data" not in batch or not {"labels", "fine_labels"} & set(batch):
                keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
                raise BadFileError(
                    f"{self.folder / name} is not a CIFAR batch file (it has {keys}, not 'data' and 'labels'); "
                    "delete it and set data.download=true, or fetch the dataset again"
                )
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # (N, 3, 32, 32)
            ys.extend(batch["labels"] if "labels" in batch else batch["fine_labels"])
        with open(self.folder / "batches.meta", "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")["label_names"]
        return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.long)


class MNISTDataModule(_ArrayDataModule):
    """MNIST: 60,000 train / 10,000 test 28x28 digits, 10 classes, from torchvision's `<root>/MNIST/raw/` idx files
    (plain or .gz). Resized to `image_size` (32 by default, so U-Nets can halve it three times)."""

    name = "MNIST"

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int | None = None,
        flip: bool = False,
        download: bool = False,
    ) -> None:
        super().__init__(
            root=root,
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            seed=seed,
            num_workers=num_workers,
            flip=flip,
            download=download,
        )
        self.folder = self.root / "MNIST" / "raw"
        self.classes = [str(i) for i in range(10)]

    def missing(self) -> str | None:
        absent = [n for n in MNIST_FILES if not (self.folder / n).is_file() and not (self.folder / f"{n}.gz").is_file()]
        if not absent:
            return None
        return (
            f"MNIST not found: {self.folder} lacks {', '.join(absent)} (idx files, plain or .gz, "
            f"from https://ossci-datasets.s3.amazonaws.com/mnist/)"
        )

    def fetch(self) -> None:
        from torchvision.datasets import MNIST

        MNIST(str(self.root), train=True, download=True)

    def _idx(self, name: str) -> Tensor:
        from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

        path = self.folder / name
        if not path.is_file():  # only the .gz is there: unpack it next to it (atomically), as torchvision does
            with gzip.open(path.with_name(f"{name}.gz"), "rb") as src:
                atomic_write(path, lambda f: shutil.copyfileobj(src, f))
        return read_sn3_pascalvincent_tensor(str(path), strict=False)

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        prefix = "train" if train else "t10k"
        x = self._idx(f"{prefix}-images-idx3-ubyte").to(torch.uint8).unsqueeze(1)  # (N, 1, 28, 28)
        y = self._idx(f"{prefix}-labels-idx1-ubyte").long()
        return x, y
