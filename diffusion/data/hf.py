"""Hugging Face `datasets` (`data=hf`): a dataset saved with `save_to_disk`, an imagefolder on disk, or a Hub name.

`data.path` is tried in that order: a folder `load_from_disk` reads (a `Dataset` or a `DatasetDict`, whose
`data.split` is taken), any other folder as an imagefolder (`load_dataset("imagefolder", data_dir=...)`: class
labels from subfolders, captions from `metadata.jsonl` / `metadata.csv`), else a Hub name (online). Columns are
named by `data.image_column`, `data.label_column` (ClassLabel or integers; strings are encoded as sorted classes)
and `data.caption_column`; a column that is not there is a one-line error listing those that are.

Images are read as the stored bytes (the Image feature with `decode=False`) and go through the folders' own
`load_image` (EXIF, modes, crop, antialiased resize), so a folder, its shards and its HF dataset give the same
pixels. Training order, flips and exact resume are the shared ones (`ResumableSampler`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from diffusion.data.base import Captioned, _SplitDataModule, caption_lines, split_indices
from diffusion.data.images import Preprocess, load_image
from diffusion.errors import BadFileError, ConfigError, MissingPathError, PathError
from diffusion.optional import require


class HFImages(Dataset):
    """Rows of a `datasets.Dataset` as whole uint8 batches `(x (B, C, S, S), y (B,))` (captions: see `Captioned`)."""

    uint8_batches = True

    def __init__(
        self,
        table,
        rows: list[int],
        *,
        prep: Preprocess,
        image_column: str,
        label_column: str | None,
    ) -> None:
        self.table, self.rows, self.prep = table, rows, prep
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, cell, row: int) -> np.ndarray:
        source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell.get("path")
        if source is None:
            raise BadFileError(f"row {row} of data.image_column={self.image_column!r} holds no image")
        try:
            return load_image(source, self.prep)
        except OSError as e:
            raise BadFileError(f"row {row} of data.image_column={self.image_column!r}: {e.__cause__ or e}") from e

    def __getitems__(self, index: list[int]) -> tuple:
        rows = [self.rows[int(i)] for i in index]  # ints or 0-d tensors (Subset's)
        batch = self.table[rows]  # {column: [values]}
        x = torch.from_numpy(np.stack([self._image(c, r) for c, r in zip(batch[self.image_column], rows)]))
        labels = batch[self.label_column] if self.label_column else [-1] * len(rows)
        return x, torch.tensor(labels, dtype=torch.long)

    def __getitem__(self, i: int) -> tuple:
        x, y, *rest = self.__getitems__([i])
        return (x[0], y[0], *(r[0] for r in rest))


def _captions(cell) -> list[str]:
    """A caption cell's captions: a string (one per line) or a list of strings; `[""]` when empty."""
    if isinstance(cell, (list, tuple)):
        return [c for c in (str(v).strip() for v in cell) if c] or [""]
    return caption_lines("" if cell is None else str(cell))


def _column(table, key: str, name: str | None, where: str) -> str | None:
    if name is not None and name not in table.column_names:
        raise ConfigError(f"{key}={name!r} is not a column of {where} (columns: {', '.join(table.column_names)})")
    return name


class HFDataModule(_SplitDataModule):
    """`data=hf`: a Hugging Face dataset (see the module docstring).

    Args (beyond the shared ones):
        path: a `save_to_disk` folder, an imagefolder, or a Hub name (online).
        split: the split to train on; `val_split` the one to validate on (else `val_fraction` of `split`).
        image_column / label_column / caption_column: the columns; no labels (-1) or captions when null.
        cache_dir: where `load_dataset` keeps its Arrow files (imagefolders and Hub sets); default HF's own.
    """

    def __init__(
        self,
        *,
        path: str,
        split: str = "train",
        val_split: str | None = None,
        image_column: str = "image",
        label_column: str | None = None,
        caption_column: str | None = None,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int | None = None,
        flip: bool = True,
        crop: Literal["center", "random"] = "center",
        crop_size: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            flip=flip,
            decoding=True,
        )
        if path is None or str(path) in ("", "???"):
            raise ConfigError("data.path is not set: pass data.path=/path/to/saved_dataset (or a Hub name)")
        if crop not in ("center", "random"):
            raise ConfigError(f"data.crop={crop!r} is not one of 'center', 'random'")
        self.path, self.split, self.val_split = str(path), split, val_split
        self.image_column, self.label_column, self.caption_column = image_column, label_column, caption_column
        self.prep = Preprocess(image_size=image_size, channels=channels, crop=crop, crop_size=crop_size)
        self.cache_dir = cache_dir
        self.train_table = self._prepare(self._load(split), split)
        self.val_table = self._prepare(self._load(val_split), val_split) if val_split else None
        self.classes: list[str] | None = None
        if label_column:
            feature = self.train_table.features[label_column]
            names = getattr(feature, "names", None)
            self.classes = list(names) if names else [str(i) for i in range(max(self.train_table[label_column]) + 1)]
            self.num_classes = len(self.classes)

    def _load(self, split: str):
        """The split `split` of data.path (see the module docstring)."""
        datasets = require("datasets", feature="data=hf")

        local = Path(self.path).expanduser()
        if self.path.startswith(("/", ".", "~")) and not local.exists():  # a path, not a Hub name
            raise MissingPathError(f"data.path={self.path} does not exist")
        try:
            if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
                data = datasets.load_from_disk(str(local))
            elif local.is_dir():
                data = datasets.load_dataset("imagefolder", data_dir=str(local), cache_dir=self.cache_dir)
            else:
                data = datasets.load_dataset(self.path, cache_dir=self.cache_dir)
        except (ConfigError, ValueError, FileNotFoundError, ConnectionError, OSError) as e:
            where = "a local folder" if local.is_dir() else "a local folder, and the Hugging Face Hub could not load it"
            raise PathError(f"data.path={self.path}: not {where} ({' '.join(str(e).split())[:300]})") from e
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                key = "data.val_split" if split == self.val_split else "data.split"
                raise ConfigError(f"{key}={split!r} is not a split of {self.path} (splits: {', '.join(data)})")
            return data[split]
        return data

    def _prepare(self, table, split: str):
        """Columns checked; images as bytes; string labels encoded as sorted classes."""
        datasets = require("datasets", feature="data=hf")

        where = f"{self.path} [{split}]"
        _column(table, "data.image_column", self.image_column, where)
        _column(table, "data.label_column", self.label_column, where)
        _column(table, "data.caption_column", self.caption_column, where)
        if not isinstance(table.features[self.image_column], datasets.Image):
            kind = type(table.features[self.image_column]).__name__
            raise ConfigError(f"data.image_column={self.image_column!r} of {where} holds {kind}, not images")
        if self.label_column:
            feature = table.features[self.label_column]
            if getattr(feature, "dtype", None) == "string":
                table = table.class_encode_column(self.label_column)
            elif not isinstance(feature, datasets.ClassLabel) and not str(getattr(feature, "dtype", "")).startswith(
                ("int", "uint")
            ):
                raise ConfigError(f"data.label_column={self.label_column!r} of {where} holds {feature}, not classes")
        return table.cast_column(self.image_column, datasets.Image(decode=False))

    @property
    def captioned(self) -> bool:
        return self.caption_column is not None

    def _images(self, table, rows: list[int], train: bool) -> HFImages | Captioned:
        prep = self.prep if train else Preprocess(**{**self.prep.key(), "crop": "center"})
        images = HFImages(table, rows, prep=prep, image_column=self.image_column, label_column=self.label_column)
        if not self.caption_column:
            return images
        # captions in the labels' place; a cell holding a list gives several, one drawn per epoch (as for folders)
        column = table[self.caption_column]
        captions = [_captions(column[r]) for r in rows]
        if train:
            self.train_captions = captions
        return Captioned(images, captions, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.val_table is not None:
            self.train_set = self._images(self.train_table, list(range(len(self.train_table))), train=True)
            self.val_set = self._images(self.val_table, list(range(len(self.val_table))), train=False)
            return
        train_rows, val_rows = split_indices(len(self.train_table), self.val_fraction, self.seed)
        self.train_set = self._images(self.train_table, train_rows, train=True)
        self.val_set = self._images(self.train_table, val_rows, train=False)
