"""Image folders at scale (`data=folder`) and aligned CelebA (`data=celeba`), decoded per step or from a cache.

Setup scans the tree (os.scandir, sorted), then checks every file before training starts: its header by default
(catches non-images, unknown formats and too-small images; cheap, run in the loader workers), or a full decode
with `data.verify=full` (also catches truncated files). Bad files stop the run with an error naming the file, or
with `data.skip_bad=true` are skipped, counted and reported once. A truncated file that slips past the header
check fails at the step it is read, with the same message (or is replaced by another image under skip_bad).

`data.cache=true` decodes and preprocesses everything once into a uint8 (N, C, S, S) .npy in
`<data.path>/.diffusion-cache/` (or `data.cache_dir`), keyed by a hash of the file list (relative paths, sizes,
mtimes) and the preprocessing; training then slices that memmap, with flips done on the batch. A cache whose key
no longer matches is never reused: a new one is built (written to a temp file, then renamed, so an interrupted
build leaves nothing half-written) and the stale one is deleted. Under DDP rank zero builds it in prepare_data.
With a latent codec (`codec=vae`), `data.cache=true` then encodes every cached image once into a second cache of
latent moments, keyed by the pixel cache and the codec's fingerprint (another VAE never reuses it); batches hold
those moments and the codec samples a latent from them each step.

Captions (`data.captions=true`), for text conditioning, follow the Hugging Face imagefolder convention: a
`metadata.jsonl` or `metadata.csv` (in the folder or any subfolder) with a `file_name` column (relative to the
metadata file's folder) and a text column (`data.caption_column`, default "text"; in JSON lines a string or a
list of captions); without metadata, a `.txt` file beside each image (one caption per line). `data.caption="a
photo of sks dog"` gives every image the same caption (DreamBooth). An image with several captions gets one of
them per epoch, from the resumable seeded stream. Bad rows (a missing or non-image file, an empty caption, an
image without a caption) stop the run with an error naming them, or are skipped and counted under skip_bad.

`data.buckets=true` keeps each image's aspect ratio: it is cut to the nearest of a set of (h, w) buckets, each
batch from one bucket, a cache file per bucket (`diffusion.data.buckets`). `data.geometry=true` adds each image's
crop geometry to its captions (SDXL's micro-conditioning).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffusion.callbacks.progress import bar_enabled
from diffusion.data.base import (
    ArrayImages,
    Captioned,
    LatentMoments,
    ResumableSampler,
    _SplitDataModule,
    batch_collate,
    split_indices,
)
from diffusion.data.buckets import (
    BucketBatches,
    Bucketed,
    BucketSampler,
    CenterCrop,
    Crops,
    bucket_sizes,
    bucket_summary,
    check_buckets,
)
from diffusion.data.images import IMAGE_EXTENSIONS, Preprocess, load_image, oriented_size, scan_images
from diffusion.errors import BadFileError, ConfigError, MissingPathError, NotAFolderError, PathError, not_utf8
from diffusion.files import atomic_write, npy_memmap, write_bytes
from diffusion.progress import progress

CACHE_VERSION = 1
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


log = logging.getLogger(__name__)
info = rank_zero_only(log.info)  # once per run, not once per DDP process


class ImageFiles(Dataset):
    """Decodes files per item to uint8 (C, S, S); batches go through the `Uint8Batch` collate.

    With `crops` (buckets, random crops, crop geometry) item i of epoch e is cut where `crops.crop(i, e)` says:
    (C, h, w) of its bucket, at a place that is a function of (seed, epoch, item) (resumable).
    """

    uint8_batches = True

    def __init__(
        self,
        files: list[Path],
        labels: list[int],
        prep: Preprocess,
        *,
        skip_bad: bool = False,
        root: Path | None = None,
        crops: Crops | None = None,
    ) -> None:
        self.files, self.prep, self.skip_bad, self.crops = files, prep, skip_bad, crops
        self.root = root  # data.path, named when no file can be read
        self.labels = torch.tensor(labels, dtype=torch.long)
        self._warned: set[int] = set()  # the files found unreadable (reported once)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # read by the loader workers

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, i: int) -> np.ndarray:
        if self.crops is None:
            return load_image(self.files[i], self.prep)
        return load_image(self.files[i], self.prep, crop=self.crops.crop(i, int(self._epoch))[0])

    def _load(self, i: int) -> np.ndarray:
        first = i
        while True:  # under skip_bad, another image until one reads: never one not yet found unreadable twice
            try:
                return self._read(i)
            except OSError as e:
                if not self.skip_bad:
                    raise PathError(
                        f"{e}; set data.skip_bad=true to skip such files, or data.verify=full to find them all at setup"
                    ) from e
                if i not in self._warned:
                    self._warned.add(i)
                    info(f"data: skipping unreadable {self.files[i]} ({e.__cause__}); using another image")
                left = [j for j in range(len(self.files)) if j not in self._warned and self._fits(j, first)]
                if not left:
                    folder = self.root or os.path.commonpath([str(f.parent) for f in self.files])
                    raise BadFileError(
                        f"data.skip_bad=true but no readable image was found in {folder}: all {len(self.files)} "
                        f"images failed to decode (the last: {self.files[i]}: {e.__cause__ or e})"
                    ) from None
                i = left[int(torch.randint(len(left), ()))]

    def _fits(self, j: int, i: int) -> bool:
        """Whether item j can stand in for item i in a batch: same output size (bucket)."""
        return self.crops is None or self.crops.targets[j] == self.crops.targets[i]

    def __getitems__(self, index: list[int]) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(np.stack([self._load(int(i)) for i in index]))  # (B, C, S, S) uint8
        return x, self.labels[torch.as_tensor(index, dtype=torch.long)]  # ints or 0-d tensors (Subset's)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(self._load(i)), self.labels[i]


class _Inspect(Dataset):
    """For setup: (index, problem or None, (h, w) as shown or None, uint8 image when decoding) per file, computed
    in loader workers. `crop` (a `CenterCrop`), when given, cuts each decoded image as its size says."""

    def __init__(self, files: list[Path], check, prep: Preprocess | None, crop: CenterCrop | None = None) -> None:
        self.files, self.check, self.prep, self.crop = files, check, prep, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        problem, size = self.check(self.files[i])
        if problem is not None or self.prep is None:
            return i, problem, size, None
        try:
            crop = None if self.crop is None else self.crop(size)
            return i, None, size, load_image(self.files[i], self.prep, crop=crop)
        except OSError as e:
            return i, str(e), size, None


def _as_list(batch):
    return batch


def _metadata_rows(meta: Path, column: str) -> list[tuple[int, dict | None]]:
    """(row number, row or None when the line is not a JSON object) of a metadata.jsonl / metadata.csv file."""
    try:
        return _read_metadata_rows(meta, column)
    except UnicodeDecodeError as e:
        raise BadFileError(f"{meta} is not UTF-8 text ({not_utf8(e)}); save it as UTF-8") from None


def _read_metadata_rows(meta: Path, column: str) -> list[tuple[int, dict | None]]:
    rows: list[tuple[int, dict | None]] = []
    with open(meta, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM (Excel, Notepad) is not part of row 1
        if meta.suffix == ".csv":
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "file_name" not in reader.fieldnames or column not in reader.fieldnames:
                raise ConfigError(
                    f"{meta} needs the columns file_name and {column} (data.caption_column); it has "
                    f"{', '.join(reader.fieldnames or []) or 'none'}"
                )
            return [(n, row) for n, row in enumerate(reader, start=2)]
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            rows.append((n, row if isinstance(row, dict) else None))
    if rows and not any(row is not None and column in row for _, row in rows):
        raise ConfigError(f"{meta} has no {column!r} key in any row (data.caption_column={column})")
    return rows


def metadata_files(root: Path) -> list[Path]:
    """The `metadata.jsonl` / `metadata.csv` files under `root`, hidden folders (the cache) skipped."""
    metas: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        metas += [Path(folder) / name for name in METADATA_FILES if name in names]
    return metas


def read_captions(root: Path, files: list[Path], column: str) -> tuple[list[list[str]], list[str | None], list[str]]:
    """Each image's captions, each image's caption problem (or None), and the problems of rows naming no image.

    From `metadata.jsonl` / `metadata.csv` files under `root` when there are any (see the module docstring),
    else from `.txt` files beside the images.
    """
    metas = metadata_files(root)
    captions: list[list[str]] = [[] for _ in files]
    problems: list[str | None] = [None] * len(files)
    if not metas:
        for i, f in enumerate(files):
            sidecar = f.with_suffix(".txt")
            if not sidecar.is_file():
                problems[i] = f"image {f} has no caption file {sidecar.name} (and data.path has no metadata.jsonl)"
                continue
            try:
                lines = [line.strip() for line in sidecar.read_text(encoding="utf-8-sig").splitlines()]
            except UnicodeDecodeError as e:
                raise BadFileError(
                    f"caption file {sidecar} is not UTF-8 text ({not_utf8(e)}); save it as UTF-8"
                ) from None
            captions[i] = [line for line in lines if line]
            if not captions[i]:
                problems[i] = f"caption file {sidecar} is empty"
        if all(p is not None and "has no caption file" in p for p in problems):
            raise ConfigError(
                f"data.captions=true but data.path={root} has no metadata.jsonl / metadata.csv and no .txt captions"
            )
        return captions, problems, []
    index = {f.resolve(): i for i, f in enumerate(files)}
    bad_rows: list[str] = []
    for meta in metas:
        for n, row in _metadata_rows(meta, column):
            where = f"row {n} of {meta}"
            if row is None:
                bad_rows.append(f"{where} is not a JSON object")
                continue
            name, text = row.get("file_name"), row.get(column)
            if not isinstance(name, str) or not name:
                bad_rows.append(f"{where} has no file_name")
                continue
            path = (meta.parent / name).resolve()
            texts = [text] if isinstance(text, str) else text if isinstance(text, list) else []
            texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                bad_rows.append(f"{where} names {name}, which is not an image ({', '.join(IMAGE_EXTENSIONS)})")
            elif path not in index:
                bad_rows.append(f"{where} names {name}, which does not exist")
            elif not texts:
                problems[index[path]] = f"{where} has an empty caption ({column}) for {name}"
            else:
                captions[index[path]].extend(texts)
    for i, f in enumerate(files):
        if not captions[i] and problems[i] is None:
            problems[i] = f"image {f} has no row in {', '.join(str(m) for m in metas)}"
    return captions, problems, bad_rows


def npy_problem(path: Path, dtype, shape: tuple[int | None, ...]) -> str | None:
    """Why the .npy array at `path` is not a `dtype` array of `shape` (None: any size there) with all its bytes
    (a file cut short by a full disk or an interrupted copy, another file, another shape), or None."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            found, fortran, kind = read(f)
            start = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError) as e:
        return f"not a readable .npy array: {' '.join(str(e).split())}"
    if kind != np.dtype(dtype) or fortran or len(found) != len(shape):
        return f"it holds {kind} {found}, not {np.dtype(dtype)} of {len(shape)} dimensions"
    if any(want is not None and have != want for have, want in zip(found, shape, strict=True)):
        return f"it holds {found} where {tuple('*' if w is None else w for w in shape)} is expected"
    expected = start + int(np.prod(found)) * kind.itemsize
    if size != expected:
        return f"{size} bytes where its header says {expected}: cut short or padded"
    return None


def usable_cache(path: Path, dtype, shape: tuple[int | None, ...]) -> bool:
    """Whether the cache array at `path` can be used (`npy_problem`); when not, one line names it and why."""
    problem = npy_problem(path, dtype, shape)
    if problem is not None:
        info(f"data: the cache {path} is damaged ({problem}); rebuilding the cache")
    return problem is None


class ImageFolderDataModule(_SplitDataModule):
    """A folder of images, e.g. `data=folder data.path=~/photos`.

    Args:
        path: the folder; scanned recursively for .png/.jpg/.jpeg/.webp/.bmp/.gif files (hidden ones skipped).
        image_size: output side length.
        channels: 3 for RGB, 1 for grayscale.
        crop: "center", or "random" (a random square along the long side each time; not with cache=true).
        crop_size: crop a square of this side (before resizing) instead of the short side; e.g. CelebA's 140.
        labels: class labels from the first-level subfolder names (sorted); else labels are -1.
        allow_upscale: accept images smaller than the crop (they are upscaled); else that is an error.
        skip_bad: skip files that cannot be read (count and report them once) instead of stopping with an error.
        verify: "header" reads each file's header at setup; "full" decodes every file (finds truncated files).
        cache: decode once into a uint8 memmap and train from it (see the module docstring).
        cache_dir: where the cache goes; default `<path>/.diffusion-cache`.
        codec: with `cache`, a latent codec (`diffusion.codec.VAECodec`, passed by train.py for codec=vae): the
            cache also holds each image's latent moments, and batches hold those (see `_latent_cached`).
        captions: batches hold captions (from metadata.jsonl / metadata.csv, or .txt files) in place of labels.
        caption_column: the metadata column holding the captions.
        caption: one caption for every image (a folder without captions, e.g. "a photo of sks dog").
        buckets: aspect-ratio buckets (`diffusion.data.buckets`): each image keeps its shape, cut to the nearest
            bucket of about image_size^2 pixels; each batch from one bucket.
        bucket_step: the buckets' sides are multiples of this (the codec's factor times the network's).
        bucket_min_ratio, bucket_max_ratio: the buckets' range of aspect ratios (width / height).
        geometry: captioned batches' conditions are a dict of the captions and each image's crop geometry
            (original_size, crop_top_left, target_size; SDXL's micro-conditioning).
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
        crop: Literal["center", "random"] = "center",
        crop_size: int | None = None,
        labels: bool = False,
        allow_upscale: bool = False,
        skip_bad: bool = False,
        verify: Literal["header", "full"] = "header",
        cache: bool = False,
        cache_dir: str | None = None,
        captions: bool = False,
        caption_column: str = "text",
        caption: str | None = None,
        codec=None,
        buckets: bool = False,
        bucket_step: int = 64,
        bucket_min_ratio: float = 0.25,
        bucket_max_ratio: float = 4.0,
        geometry: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            flip=flip,
            decoding=not cache,
        )
        if caption is not None and not str(caption).strip():
            raise ConfigError("data.caption is empty: give the caption every image gets, or null")
        if caption is not None and captions:
            # experiment=sd_lora sets captions=true and its documented override is data.caption="...": the one
            # caption asked for on the command line wins over reading caption files.
            log.info("data.caption is set: every image gets %r (the folder's caption files are not read)", caption)
        if labels and (captions or caption is not None):
            raise ConfigError("data.labels=true and captions (data.captions / data.caption) exclude each other")
        self.captions = captions
        self.caption_column = caption_column
        self.caption = caption
        if path is None or str(path) in ("", "???"):
            raise ConfigError("data.path is not set: pass data.path=/path/to/images")
        if crop not in ("center", "random"):
            raise ConfigError(f"data.crop={crop!r} is not one of 'center', 'random'")
        if verify not in ("header", "full"):
            raise ConfigError(f"data.verify={verify!r} is not one of 'header', 'full'")
        if crop_size is not None and crop_size < 1:
            raise ConfigError(f"data.crop_size={crop_size} must be >= 1 (or null for the short side)")
        if cache and crop == "random":
            raise ConfigError(
                "data.crop=random cannot be used with data.cache=true (the cache holds one crop per image)"
            )
        if buckets:
            check_buckets(
                image_size=image_size, step=bucket_step, min_ratio=bucket_min_ratio, max_ratio=bucket_max_ratio
            )
            if crop_size is not None:
                raise ConfigError("data.crop_size cuts squares: it cannot be used with data.buckets=true")
        if geometry and not (captions or caption is not None):
            raise ConfigError(
                "data.geometry=true adds crop geometry to captions: it needs data.captions or data.caption"
            )
        self.buckets = (
            bucket_sizes(area=image_size**2, step=bucket_step, min_ratio=bucket_min_ratio, max_ratio=bucket_max_ratio)
            if buckets
            else None
        )  # (h, w) of every bucket
        self.geometry = geometry
        self.path = Path(path).expanduser()
        self.prep = Preprocess(image_size=image_size, channels=channels, crop=crop, crop_size=crop_size)
        self.labels = labels
        self.allow_upscale = allow_upscale
        self.skip_bad = skip_bad
        self.verify = verify
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.path / ".diffusion-cache"
        self.num_skipped = 0
        self.cache_file: Path | None = None
        # data.cache=true with a latent codec (train.py passes it): the cache holds each image's latent moments
        self.codec = codec
        self.latent_file: Path | None = None
        self.train_pixels: Dataset | None = None  # the pixel images of the splits, for FID's reference statistics
        self.val_pixels: Dataset | None = None
        self.cache_files: list[Path] = []  # with buckets: one pixel cache per bucket (and one latent cache each)
        self.latent_files: list[Path] = []
        self.train_buckets: list[int] | None = None  # with buckets: each training / validation item's bucket
        self.val_buckets: list[int] | None = None
        if labels:
            self.classes = self._classes()
            self.num_classes = len(self.classes)

    # --- scanning and checking -------------------------------------------------------------------------
    def _classes(self) -> list[str]:
        self._check_root()
        classes = sorted(e.name for e in os.scandir(self.path) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ConfigError(f"data.labels=true but data.path={self.path} has no subfolders to use as classes")
        return classes

    def _check_root(self) -> None:
        if not self.path.exists():
            raise MissingPathError(f"data.path={self.path} does not exist")
        if not self.path.is_dir():
            raise NotAFolderError(f"data.path={self.path} is not a folder")

    def _scan(self) -> tuple[list[Path], list[int]]:
        """All image files (stable order) and their labels."""
        self._check_root()
        files = scan_images(self.path)
        if not files:
            raise ConfigError(f"data.path={self.path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if not self.labels:
            return files, [-1] * len(files)
        index = {c: i for i, c in enumerate(self.classes)}
        labels = [index.get(f.relative_to(self.path).parts[0], -1) for f in files]
        stray = [f for f, y in zip(files, labels) if y < 0]
        if stray:
            raise ConfigError(f"data.labels=true but {stray[0]} is not inside a class subfolder")
        return files, labels

    @property
    def captioned(self) -> bool:
        return self.captions or self.caption is not None

    def _read_captions(self, files: list[Path]) -> tuple[list[list[str]], list[str | None]]:
        """Each file's captions and caption problem; bad rows stop the run, or are skipped under skip_bad."""
        if self.caption is not None:
            return [[str(self.caption)]] * len(files), [None] * len(files)
        captions, problems, bad_rows = read_captions(self.path, files, self.caption_column)
        first = next((p for p in [*bad_rows, *problems] if p is not None), None)
        if first is not None and not self.skip_bad:
            raise BadFileError(f"{first}; set data.skip_bad=true to skip such rows and images")
        if bad_rows:
            info(f"data: skipped {len(bad_rows)} metadata rows that name no usable image (first: {bad_rows[0]})")
        return captions, problems

    def _check(self, path: Path) -> tuple[str | None, tuple[int, int] | None]:
        """(Why `path` cannot be used or None, its (h, w) as shown or None). Reads only the header."""
        try:
            w, h = oriented_size(path)
        except Exception as e:
            return f"cannot read image {path}: {e}", None
        if self.buckets is not None:  # it must cover its bucket without upscaling
            bh, bw = self._center_crop().target((h, w))
            if (h < bh or w < bw) and not self.allow_upscale:
                why = f"smaller than its bucket {bw}x{bh} (w x h)"
                return f"image {path} is {w}x{h}, {why} (set data.allow_upscale=true to upscale it)", (h, w)
            return None, (h, w)
        need, key = (self.image_size, "data.image_size")
        if self.prep.crop_size:
            need, key = (self.prep.crop_size, "data.crop_size")
        if min(w, h) < need and not self.allow_upscale:
            why = f"smaller than {key}={need}"
            return f"image {path} is {w}x{h}, {why} (set data.allow_upscale=true to upscale it)", (h, w)
        return None, (h, w)

    def _center_crop(self) -> CenterCrop:
        """The crop of an image by its size alone: into its bucket, or the square of `Preprocess`."""
        return CenterCrop(buckets=self.buckets, image_size=self.image_size, crop_size=self.prep.crop_size)

    def _inspect(
        self, files: list[Path], decode: bool, on_image=None, bar: str | None = None, crop: CenterCrop | None = None
    ) -> tuple[list[str | None], list[tuple[int, int] | None]]:
        """Check (and with `decode`, decode, cut by `crop` when given) every file in the loader workers; returns
        each file's problem and (h, w)."""
        loader = DataLoader(
            _Inspect(files, self._check, self.prep if decode else None, crop),
            batch_size=64,
            # worker start-up costs more than it saves on small folders
            num_workers=self.num_workers if len(files) > (200 if decode else 2000) else 0,
            collate_fn=_as_list,
        )
        problems: list[str | None] = [None] * len(files)
        sizes: list[tuple[int, int] | None] = [None] * len(files)
        for batch in progress(loader, desc=bar or "", enabled=bar is not None and self._bar()):
            for i, problem, size, image in batch:
                problems[i], sizes[i] = problem, size
                if problem is not None and not self.skip_bad:
                    raise BadFileError(f"{problem}; set data.skip_bad=true to skip such files")
                if image is not None and on_image is not None:
                    on_image(i, image)
        return problems, sizes

    def _report(self, files: list[Path], problems: list[str | None]) -> list[int]:
        """Indices of usable files; prints one line about the skipped ones."""
        good = [i for i, p in enumerate(problems) if p is None]
        self.num_skipped = len(files) - len(good)
        if self.num_skipped:
            first = next(p for p in problems if p is not None)
            info(f"data: skipped {self.num_skipped} of {len(files)} files in {self.path} (first: {first})")
        if not good:
            raise BadFileError(f"data.path={self.path} holds no usable images")
        return good

    # --- the cache -------------------------------------------------------------------------------------
    def _cache_key(self, files: list[Path]) -> tuple[str, str]:
        """(tag naming the dataset and preprocessing, hash of the file list and preprocessing)."""
        prep = {**self.prep.key(), "allow_upscale": self.allow_upscale, "version": CACHE_VERSION}
        if self.buckets is not None or self.geometry:  # cut by `CenterCrop` from each file's size (in the meta)
            prep["crops"] = {"buckets": self.buckets}
        root = str(self.path.resolve())
        h = hashlib.sha256(json.dumps([root, prep], sort_keys=True).encode())
        tag_hash = h.hexdigest()[:8]
        for f in files:
            st = f.stat() if f.exists() else f.lstat()  # a link loop (skipped under skip_bad) has no target
            h.update(f"{f.relative_to(self.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        crop = self.prep.crop_size or "short"
        tag = f"{self.path.name or 'data'}-{tag_hash}-{self.image_size}px-{self.channels}ch-crop{crop}"
        return tag, h.hexdigest()[:20]

    def _cached(self, files: list[Path]) -> tuple[list[Path], list[int], list[tuple[int, int] | None]]:
        """The cache for `files` (built now if missing or stale): its .npy files (one, or one per bucket that holds
        images, in bucket order), the indices of the files it holds, and each file's (h, w) (None when unknown)."""
        tag, digest = self._cache_key(files)
        stem = f"{tag}-{digest}"
        meta_path = self.cache_dir / f"{stem}.json"
        index = self._cache_index(meta_path) if meta_path.exists() else None
        if index is not None:
            skipped, sizes = index
            npys, shapes = self._cache_layout(stem, files, sizes)
            if all(f.exists() and usable_cache(f, np.uint8, shape) for f, shape in zip(npys, shapes, strict=True)):
                problems = [None] * len(files)
                for i, problem in skipped:
                    problems[i] = problem
                    if not self.skip_bad:
                        raise BadFileError(f"{problem}; set data.skip_bad=true to skip such files")
                return npys, self._report(files, problems), sizes
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PathError(f"cannot create the cache folder {self.cache_dir}: {e}; set data.cache_dir=...") from e
        info(f"data: building the cache {self.cache_dir / stem}.npy from {len(files)} files (once)")
        crop = self._center_crop() if self.buckets is not None or self.geometry else None
        if self.buckets is None:
            problems: list[str | None] = []
            sizes: list[tuple[int, int] | None] = []

            def fill(f) -> None:
                array = npy_memmap(f, np.uint8, (len(files), *self._shape()))
                found = self._inspect(files, decode=True, on_image=array.__setitem__, bar="image cache", crop=crop)
                problems.extend(found[0])
                sizes.extend(found[1])
                array.flush()

            npys = [self.cache_dir / f"{stem}.npy"]
            atomic_write(npys[0], fill)
        else:  # headers first (each file's bucket), then each bucket's images into its own file
            problems, sizes = self._inspect(files, decode=False)
            npys, shapes = self._cache_layout(stem, files, sizes)
            members = self._bucket_members(sizes)
            for npy, shape, items in zip(npys, shapes, members, strict=True):

                def fill(f, shape=shape, items=items) -> None:
                    array = npy_memmap(f, np.uint8, shape)
                    found, _ = self._inspect(
                        [files[i] for i in items], decode=True, on_image=array.__setitem__, bar="image cache", crop=crop
                    )
                    for i, problem in zip(items, found, strict=True):
                        problems[i] = problem
                    array.flush()

                atomic_write(npy, fill)
        meta = {
            "version": CACHE_VERSION,
            "root": str(self.path.resolve()),
            "preprocess": self.prep.key(),
            "files": [str(f.relative_to(self.path)) for f in files],
            "skipped": [[i, p] for i, p in enumerate(problems) if p is not None],
            "sizes": sizes,  # (h, w) as shown, for the buckets and the crop geometry
        }
        write_bytes(meta_path, json.dumps(meta).encode())
        keep = {stem, *(f.stem for f in npys)}  # the new cache; its latent caches are rebuilt after it
        for stale in self.cache_dir.glob(f"{glob.escape(tag)}-*"):  # the folder's name may hold [ ] * ?
            if stale.stem not in keep:
                stale.unlink(missing_ok=True)
        return npys, self._report(files, problems), sizes

    def _bucket_members(self, sizes: list[tuple[int, int] | None]) -> list[list[int]]:
        """The files (indices) of each bucket that holds any, in bucket order; a file without a size in none."""
        crop = self._center_crop()
        members: dict[int, list[int]] = {}
        for i, size in enumerate(sizes):
            if size is not None:
                members.setdefault(self.buckets.index(crop.target(size)), []).append(i)
        return [members[b] for b in sorted(members)]

    def _cache_layout(
        self, stem: str, files: list[Path], sizes: list[tuple[int, int] | None]
    ) -> tuple[list[Path], list[tuple[int, ...]]]:
        """The cache's .npy files and their shapes: one (N, C, S, S), or with buckets one per bucket that holds
        images, `<stem>-b<h>x<w>.npy` of (its images, C, h, w)."""
        if self.buckets is None:
            return [self.cache_dir / f"{stem}.npy"], [(len(files), *self._shape())]
        npys, shapes = [], []
        crop = self._center_crop()
        for items in self._bucket_members(sizes):
            h, w = crop.target(sizes[items[0]])
            npys.append(self.cache_dir / f"{stem}-b{h}x{w}.npy")
            shapes.append((len(items), self.channels, h, w))
        return npys, shapes

    @staticmethod
    def _cache_index(meta_path: Path) -> tuple[list, list] | None:
        """The cache index's [index, problem] list of skipped files and each file's (h, w) (None: unknown, e.g. a
        cache from before sizes were kept); None when there is none or it is corrupt (then the cache is rebuilt,
        and a line names the file)."""
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            skipped, sizes = meta["skipped"], meta.get("sizes")
            if sizes is None:
                sizes = [None] * len(meta["files"])
            sizes = [None if s is None else (int(s[0]), int(s[1])) for s in sizes]
            if all(isinstance(i, int) and isinstance(p, str) for i, p in skipped):
                return skipped, sizes
            raise ValueError("unexpected entries in 'skipped'")
        except (OSError, ValueError, KeyError, TypeError) as e:
            info(f"data: the cache index {meta_path} is corrupt ({e}); rebuilding the cache")
            return None

    def _bar(self) -> bool:
        """Whether the caches draw a progress bar: as the trainer's (trainer.enable_progress_bar)."""
        return bar_enabled(self.trainer)

    def _shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _latent_cached(self, pixels: Path) -> Path:
        """The latent cache of the pixel cache `pixels`: each image's moments through the codec (and its mirror
        image's when data.flip=true), float32 (N or 2N, 2c, h, w), built once. Keyed by the pixel cache (files and
        preprocessing) and the codec's fingerprint (its config and weights): another VAE never reuses it."""
        key = f"{pixels.stem}-latents-{self.codec.fingerprint()}-{'flip' if self.flip else 'noflip'}"
        npy = pixels.with_name(f"{key}.npy")
        images = np.load(pixels, mmap_mode="r")
        n, step = len(images), self.codec.encode_batch_size
        if npy.exists() and usable_cache(npy, np.float32, ((2 if self.flip else 1) * n, None, None, None)):
            return npy
        info(f"data: encoding {n} images through the codec into the latent cache {npy} (once)")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # encode on the GPU when there is one
        home = next(self.codec.parameters()).device
        self.codec.to(device)

        def fill(f) -> None:
            array = None
            for lo in progress(range(0, n, step), desc="latent cache", enabled=self._bar()):
                x = torch.from_numpy(np.array(images[lo : lo + step])).to(device, torch.float32) * (2 / 255) - 1
                for mirror, batch in enumerate((x, x.flip(-1)) if self.flip else (x,)):
                    moments = self.codec.moments(batch).cpu().numpy()  # (B, 2c, h, w)
                    if array is None:
                        array = npy_memmap(f, np.float32, ((2 if self.flip else 1) * n, *moments.shape[1:]))
                    array[mirror * n + lo : mirror * n + lo + len(batch)] = moments
            array.flush()

        try:
            atomic_write(npy, fill)
        finally:
            self.codec.to(home)
        for stale in self.cache_dir.glob(f"{glob.escape(pixels.stem)}-latents-*.npy"):  # another codec's
            if stale != npy:
                stale.unlink(missing_ok=True)
        return npy

    # --- Lightning hooks -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Rank zero (per node) builds the cache, so the other ranks find it in setup."""
        if self.cache:
            npys, _, _ = self._cached(self._scan()[0])
            if self.codec is not None:
                for npy in npys:
                    self._latent_cached(npy)

    def _split_rows(self, files: list[Path], good: list[int]) -> tuple[list[int], list[int]]:
        """(train, val) positions into `good`: a fixed-seed fraction."""
        return split_indices(len(good), self.val_fraction, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        flip = self.flip
        files, labels = self._scan()
        captions, caption_problems = self._read_captions(files) if self.captioned else (None, None)
        if self.cache:
            npys, good, sizes = self._cached(files)
            latents = [self._latent_cached(npy) for npy in npys] if self.codec is not None else []
            if self.buckets is None:  # one file each (the attributes FID's key leaves out)
                self.cache_file, self.latent_file = npys[0], latents[0] if latents else None
            else:
                self.cache_files, self.latent_files = npys, latents
        else:
            problems, sizes = self._inspect(files, decode=self.verify == "full")
            good = self._report(files, problems)
        if caption_problems is not None:
            uncaptioned = [i for i in good if caption_problems[i] is not None]
            if uncaptioned:
                first = caption_problems[uncaptioned[0]]
                info(f"data: skipped {len(uncaptioned)} images without a caption (first: {first})")
                good = [i for i in good if caption_problems[i] is None]
            if not good:
                raise BadFileError(f"data.path={self.path} holds no usable captioned images")
        train_rows, val_rows = self._split_rows(files, good)
        labels_t = torch.tensor(labels, dtype=torch.long)
        center = self._center_crop()
        # each item's crop from its size: buckets, crop geometry and random crops (placed per epoch, resumable)
        planned = self.buckets is not None or self.geometry or self.prep.crop == "random"
        caches = self._bucket_caches(files, sizes, labels_t, flip) if self.cache and self.buckets is not None else None

        def subset(rows: list[int], train: bool) -> Dataset:
            idx = [good[r] for r in rows]
            random = train and self.prep.crop == "random"
            crops = center.crops([sizes[i] for i in idx], random=random, flip=train and flip, seed=self.seed)
            if self.buckets is not None:
                setattr(self, f"{'train' if train else 'val'}_buckets", [self.buckets.index(t) for t in crops.targets])
            if caches is not None:  # one cache file per bucket
                bucket_of, row_of, pixel_parts, latent_parts = caches
                where = ([bucket_of[i] for i in idx], [row_of[i] for i in idx])
                pixels = Bucketed(pixel_parts, *where)
                images = pixels
                if latent_parts is not None:
                    setattr(self, "train_pixels" if train else "val_pixels", pixels)
                    mirrors = {b: n for b, n in Counter(bucket_of.values()).items()} if flip and train else None
                    images = Bucketed(latent_parts, *where, mirrors=mirrors, seed=self.seed)
            elif self.latent_file is not None:
                pixels = ArrayImages(str(self.cache_file), labels_t, rows=idx)
                setattr(self, "train_pixels" if train else "val_pixels", pixels)
                mirrors = len(files) if self.flip else None
                images = LatentMoments(
                    str(self.latent_file), labels_t, rows=idx, mirrors=mirrors if train else None, seed=self.seed
                )
            elif self.cache:
                images = ArrayImages(str(self.cache_file), labels_t, rows=idx)
            else:
                prep = self.prep if train else Preprocess(**{**self.prep.key(), "crop": "center"})
                images = ImageFiles(
                    [files[i] for i in idx],
                    [labels[i] for i in idx],
                    prep,
                    skip_bad=self.skip_bad,
                    root=self.path,
                    crops=crops if planned else None,
                )
            if captions is None:
                return images
            if train:
                self.train_captions = [captions[i] for i in idx]
            return Captioned(images, [captions[i] for i in idx], seed=self.seed, crops=crops if self.geometry else None)

        self.train_set = subset(train_rows, train=True)
        self.val_set = subset(val_rows, train=False)
        if self.latent_file is not None or self.latent_files:
            self.flip = False  # the latent cache flips by taking the mirror image's moments (LatentMoments)
        if self.buckets is not None:
            info(bucket_summary(self.buckets, self.train_buckets, batch_size=self.batch_size))
            if not any(n >= self.batch_size for n in Counter(self.train_buckets).values()):
                raise ConfigError(
                    f"data.buckets=true but no bucket holds data.batch_size={self.batch_size} training images; "
                    "lower data.batch_size"
                )

    def _bucket_caches(self, files: list[Path], sizes: list, labels: Tensor, flip: bool):
        """A bucketed cache's pieces: each file's bucket and row in its bucket's file, and each bucket's pixel
        dataset and (with a codec) latent dataset, keyed by bucket."""
        bucket_of, row_of, pixel_parts, latent_parts = {}, {}, {}, {} if self.latent_files else None
        crop = self._center_crop()
        for k, items in enumerate(self._bucket_members(sizes)):
            b = self.buckets.index(crop.target(sizes[items[0]]))
            bucket_of.update(dict.fromkeys(items, b))
            row_of.update({i: r for r, i in enumerate(items)})
            part_labels = labels[torch.as_tensor(items, dtype=torch.long)]
            pixel_parts[b] = ArrayImages(str(self.cache_files[k]), part_labels)
            if latent_parts is not None:
                mirrored = part_labels.repeat(2) if flip else part_labels  # the mirror images' rows follow
                latent_parts[b] = LatentMoments(str(self.latent_files[k]), mirrored, rows=list(range(len(mirrored))))
        return bucket_of, row_of, pixel_parts, latent_parts

    def _train_sampler(self, dataset: Dataset, *, num_replicas: int, rank: int) -> ResumableSampler:
        if self.buckets is None:
            return super()._train_sampler(dataset, num_replicas=num_replicas, rank=rank)
        sampler = BucketSampler(
            dataset,
            buckets=self.train_buckets,
            batch_size=self.batch_size,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
        )
        if sampler.steps == 0:
            raise ConfigError(
                f"data.buckets=true: the buckets' full batches of data.batch_size={self.batch_size} are fewer than "
                f"the {num_replicas} processes; lower data.batch_size"
            )
        return sampler

    def val_dataloader(self) -> DataLoader:
        if self.buckets is None:
            return super().val_dataloader()
        # one bucket per batch: the batches are the loader's items (batch_size=None)
        return DataLoader(
            BucketBatches(self.val_set, self.val_buckets, self.batch_size),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=batch_collate(self.val_set),
        )


class CelebADataModule(ImageFolderDataModule):
    """Aligned CelebA (178x218 faces): center crop `crop_size` (140, or 148), resize to `image_size` (64).

    `path` is the `img_align_celeba` folder, a folder holding it, or torchvision's CelebA root (`<path>/celeba/
    img_align_celeba`). When torchvision's `list_eval_partition.txt` sits next to the images, its official split
    is used (train = partition 0, val = partition 1); otherwise a fixed-seed `val_fraction`. Unlabeled.
    """

    def __init__(
        self,
        *,
        path: str,
        image_size: int = 64,
        crop_size: int = 140,
        channels: int = 3,
        batch_size: int = 128,
        val_fraction: float = 0.01,
        seed: int = 0,
        num_workers: int | None = None,
        flip: bool = True,
        skip_bad: bool = False,
        verify: Literal["header", "full"] = "header",
        cache: bool = True,
        cache_dir: str | None = None,
        codec=None,
    ) -> None:
        root = Path(str(path)).expanduser() if path not in (None, "", "???") else None
        if root is not None and root.name != "img_align_celeba":
            for candidate in (root / "img_align_celeba", root / "celeba" / "img_align_celeba"):
                if candidate.is_dir():
                    root = candidate
                    break
            else:
                raise MissingPathError(
                    f"data.path={path}: no img_align_celeba folder there; put CelebA's aligned images "
                    f"(img_align_celeba.zip, unzipped) at {Path(str(path)).expanduser() / 'img_align_celeba'}"
                )
        super().__init__(
            path=str(root) if root is not None else path,
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            flip=flip,
            crop="center",
            crop_size=crop_size,
            skip_bad=skip_bad,
            verify=verify,
            cache=cache,
            cache_dir=cache_dir,
            codec=codec,
        )

    def _split_rows(self, files: list[Path], good: list[int]) -> tuple[list[int], list[int]]:
        partition_file = self.path.parent / "list_eval_partition.txt"
        if not partition_file.is_file():
            return super()._split_rows(files, good)
        partition = {}
        for line in partition_file.read_text().split("\n"):
            parts = line.split()
            if len(parts) == 2:
                partition[parts[0]] = parts[1]
        names = [files[i].name for i in good]
        return (
            [r for r, n in enumerate(names) if partition.get(n) == "0"],
            [r for r, n in enumerate(names) if partition.get(n) == "1"],
        )
