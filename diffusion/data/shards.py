"""Sharded, streamable image datasets (`data=shards`): WebDataset tar shards plus an `index.json`, written from an
image folder by `python -m diffusion.data.shards write SRC DST`, read from a local folder or an object store
(s3://, gs://, az://, http(s)://; credentials from the environment), exactly once per epoch across DDP ranks and
loader workers, and resumable mid-epoch at the sample.

Format. Each sample is a group of tar members sharing a key (the WebDataset convention, so `webdataset`, `tar` and
other tools read the shards): `<key>.<ext>` the source file's bytes as they were (jpg, png, ...; decoded and
preprocessed at training time exactly as `data=folder` does), `<key>.cls` the class index as text (labeled sets),
`<key>.txt` the captions, one per line (captioned sets; one is drawn per epoch, as for folders). `index.json`,
written last, lists every shard of the `train` and `val` splits with its sample count and bytes, the class names
and the smallest image side. A shard set without its index, or whose shard ends early (an interrupted copy to a
bucket), is refused with a line naming it.

The epoch plan (all from the index, before any shard is read; see `worker_plan`):
1. the shards are put in a seeded order per (seed, epoch), and their samples concatenated into one stream;
2. each rank takes a contiguous 1/world of it, rounded down to whole batches, the same count on every rank
   (the remainder, fewer than world x batch_size + world samples at the stream's end, is dropped this epoch:
   another set of samples each epoch, since the shard order changes);
3. each rank's batches are split into contiguous runs, one per loader worker (the lower workers one more when
   they do not divide), so a worker reads few shards, front to back;
4. a worker's samples pass through a shuffle buffer (`shuffle_buffer` samples, seeded per seed, epoch, rank and
   worker) simulated on sample ids, so the order is known before a byte is read.
The DataLoader takes batch k of a rank from worker k mod W, so after P trained batches each worker's consumed
prefix is known exactly: a resumed run (`state_dict`: epoch and position, as every datamodule here) skips exactly
those samples without decoding them and yields the rest of the epoch in the same order as a run that never
stopped (worker roles rotate by P so the round-robin lines up). This holds when the world size, `num_workers` and
`batch_size` are those of the checkpoint; with other values the interrupted epoch starts over (logged).
Flips and random crops are functions of (seed, epoch, sample id), like the folders' `flip_mask`.
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import logging
import re
import secrets
import shutil
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from diffusion.data.base import (
    ArrayImages,
    Captioned,
    Uint8Batch,
    _SplitDataModule,
    caption_lines,
    flip_mask,
    pick_captions,
    split_indices,
)
from diffusion.data.images import IMAGE_EXTENSIONS, Preprocess, load_image, read_size
from diffusion.errors import BadFileError, ConfigError, MissingPathError, PathError, PathExistsError
from diffusion.files import atomic_write, check_replaceable, regular_file, replace_folder, write_bytes
from diffusion.optional import require
from diffusion.progress import progress

FORMAT = "diffusion-webdataset"
VERSION = 1
INDEX = "index.json"
WRITTEN = "a shard set written by python -m diffusion.data.shards write (its index.json and the shards it lists)"
URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
# Config keys (data.storage.*) and URL query fields that carry credentials: those belong in the environment.
SECRET_WORDS = ("secret", "password", "token", "access_key", "key_id", "credential", "signature", "sas", "private")
NOT_SECRET = ("skip_signature",)  # data.storage options named like a secret that are none (public buckets)
URL_IN_TEXT = re.compile(r"[a-z][a-z0-9+.-]*://[^\s,'\"\[\]()]+", re.I)  # a URL inside an override or a sweep list

log = logging.getLogger(__name__)
info = rank_zero_only(log.info)


# --- where shards live ----------------------------------------------------------------------------------------
def check_no_secrets(path: str, storage: dict, *, key: str = "data.path") -> None:
    """A one-line ConfigError when the config carries credentials (in the URL at `key` or in data.storage); the
    message never repeats them."""
    if URL.match(path):
        rest = path.split("://", 1)[1]
        if "@" in rest.split("/", 1)[0]:
            raise ConfigError(
                f"{key} carries credentials (user:password@); put them in the environment, not the config: {path.split('://')[0]}://..."
            )
        query = rest.split("?", 1)[1].lower() if "?" in rest else ""
        if any(w in query for w in SECRET_WORDS):
            raise ConfigError(f"{key} carries a signed or secret query string; credentials go in the environment")
    for name in storage:
        lowered = str(name).lower()
        if any(w in lowered for w in SECRET_WORDS) and not lowered.endswith(NOT_SECRET):
            raise ConfigError(
                f"data.storage.{name} looks like a credential: set it in the environment (e.g. AWS_SECRET_ACCESS_KEY, "
                "GOOGLE_APPLICATION_CREDENTIALS), never in the config"
            )


def check_config_secrets(config: dict, *, key: str = "") -> None:
    """`check_no_secrets` over a whole composed config (plain values, Hydra's node included), before anything
    is written: every URL in every string, named by its key, and data.storage's keys. The command line's
    overrides (`hydra.overrides.task`: `data.path=a,b` sweeps, `+data.storage.K=V`) are named by their own key."""
    for name, value in config.items():
        at = f"{key}.{name}" if key else str(name)
        if isinstance(value, dict):
            check_config_secrets(value, key=at)
            if at == "data.storage":
                check_no_secrets("", value)
        elif isinstance(value, list):
            check_config_secrets({f"{name}[{i}]": v for i, v in enumerate(value)}, key=key)
        elif isinstance(value, str):
            if at.startswith("hydra.overrides.") and "=" in value:  # "data.path=a,b" is about data.path
                at, value = value.split("=", 1)
                at = at.lstrip("+~")
                if at.startswith("data.storage."):
                    check_no_secrets("", {at.removeprefix("data.storage."): None})
            for url in URL_IN_TEXT.findall(value):
                check_no_secrets(url, {}, key=at)


class _Chunks(io.RawIOBase):
    """A readable file over an iterator of byte chunks (an object store's streamed GET)."""

    def __init__(self, chunks) -> None:
        self.chunks, self.buf, self.pos = iter(chunks), memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.pos >= len(self.buf):
            try:
                self.buf, self.pos = memoryview(bytes(next(self.chunks))), 0
            except StopIteration:
                return 0
        n = min(len(b), len(self.buf) - self.pos)
        b[:n] = self.buf[self.pos : self.pos + n]
        self.pos += n
        return n


class Location:
    """A shard set's folder: a local path, or a URL prefix read through `obstore` (s3://, gs://, az://, http(s)://).

    Credentials come from the environment, where obstore looks for them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
    AWS_SESSION_TOKEN / AWS_REGION / AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*); `storage`
    holds other options (region, endpoint, skip_signature, ...). The store is opened lazily in each process.
    """

    def __init__(self, path: str, storage: dict | None = None) -> None:
        self.path, self.storage = str(path), dict(storage or {})
        check_no_secrets(self.path, self.storage)
        self.remote = bool(URL.match(self.path)) and not self.path.startswith("file://")
        self.local = None if self.remote else Path(self.path.removeprefix("file://")).expanduser()
        self._store = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}  # each worker opens its own connection

    def store(self):
        if self._store is None:
            from_url = require("obstore.store", feature=f"data.path={self.path} (a URL)").from_url
            options = {"allow_http": True} if self.path.startswith("http://") else None
            try:
                self._store = from_url(self.path.rstrip("/") + "/", client_options=options, **self.storage)
            except Exception as e:  # obstore names the bad option or scheme
                raise ConfigError(f"data.path={self.path}: cannot open the store ({e})") from e
        return self._store

    def outside(self, name: str) -> str | None:
        """Why `name`, a shard the index lists, is not a file inside this set (None when it is): a name is a
        relative path without `..`; a local one must also resolve inside the folder (not through a link out)."""
        parts = name.replace("\\", "/").split("/")
        if not name or "\0" in name or URL.match(name) or re.match(r"^([a-zA-Z]:)?[/\\]", name):
            return "is not a relative name"
        if ".." in parts:
            return "leaves the set through '..'"
        if self.local is not None and not (self.local / name).resolve().is_relative_to(self.local.resolve()):
            return "resolves outside the set (a link?)"
        return None

    def where(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}" if self.remote else str(self.local / name)

    def read(self, name: str) -> bytes:
        """The whole object `name` (the index); one-line errors when it is missing or unreadable."""
        if not self.remote:
            try:
                return regular_file(self.local / name, "shard index").read_bytes()
            except FileNotFoundError as e:
                raise MissingPathError(f"{self.where(name)} does not exist") from e
            except OSError as e:
                raise PathError(f"cannot read {self.where(name)}: {e}") from e
        obstore = require("obstore", feature=f"data.path={self.path} (a URL)")

        try:
            return bytes(obstore.get(self.store(), name).bytes())
        except FileNotFoundError as e:
            raise MissingPathError(f"{self.where(name)} does not exist") from e
        except ConfigError:
            raise
        except Exception as e:
            raise PathError(f"cannot read {self.where(name)}: {' '.join(str(e).split())[:300]}") from e

    def open(self, name: str):
        """A binary stream of object `name`, read front to back (one GET for a remote object)."""
        if not self.remote:
            try:
                return open(regular_file(self.local / name, "shard"), "rb")  # noqa: SIM115
            except FileNotFoundError as e:
                raise MissingPathError(f"shard {self.where(name)} does not exist (listed in {INDEX})") from e
        obstore = require("obstore", feature=f"data.path={self.path} (a URL)")

        try:
            result = obstore.get(self.store(), name)
        except FileNotFoundError as e:
            raise MissingPathError(f"shard {self.where(name)} does not exist (listed in {INDEX})") from e
        return io.BufferedReader(_Chunks(result.stream(min_chunk_size=1 << 20)), 1 << 20)


# --- captions (the HF imagefolder metadata files, or .txt sidecars) -------------------------------------------
def sample_captions(parts: dict[str, bytes]) -> list[str]:
    """A shard sample's captions: its `.txt` member, one per line (`[""]` without one)."""
    return caption_lines(parts.get("txt", b"").decode("utf-8"))


def shard_captions(root: Path, files: Sequence[Path], column: str, *, skip_bad: bool) -> list[str | None] | None:
    """Each file's `.txt` member (its captions, one per line), None for a file without a usable caption (skipped
    under `skip_bad`); None for a folder without captions (no metadata file and no `.txt` beside any image).

    The folders' own reader (`data=folder data.captions=true`, `diffusion.data.folder.read_captions`), so a shard
    set holds exactly the captions the folder trains with: metadata files when there are any, else sidecars;
    a bad row or an image without a caption is a one-line error naming it, or skipped and counted under skip_bad.
    """
    from diffusion.data.folder import metadata_files, read_captions

    if not metadata_files(root) and not any(f.with_suffix(".txt").is_file() for f in files):
        return None
    captions, problems, bad_rows = read_captions(root, list(files), column)
    first = next((p for p in [*bad_rows, *problems] if p is not None), None)
    if first is not None and not skip_bad:
        raise BadFileError(f"{first}; pass --skip-bad to skip such rows and images")
    if bad_rows:
        log.info(f"skipped {len(bad_rows)} metadata rows that name no usable image (first: {bad_rows[0]})")
    return [None if p is not None else "\n".join(c) for c, p in zip(captions, problems, strict=True)]


# --- writing ----------------------------------------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A tar member with fixed metadata, so the same input gives the same bytes."""
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = len(data), 0, 0o644
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    tar.addfile(member, io.BytesIO(data))


def _write_tar(f, samples: list[tuple[str, int]], files: list[Path], ys, captions: list[str | None] | None) -> None:
    """One shard into `f`: for each (key, file number) the image's bytes as they are, its class and captions."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, i in samples:
            _add(tar, f"{key}{files[i].suffix.lower()}", files[i].read_bytes())
            if ys is not None:
                _add(tar, f"{key}.cls", str(ys[i]).encode())
            if captions is not None:
                _add(tar, f"{key}.txt", captions[i].encode("utf-8"))


def write_shards(
    src: str | Path,
    dst: str | Path,
    *,
    labels: bool = False,
    caption_column: str = "text",
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_mb: float = 256.0,
    shard_samples: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Write the images under `src` as tar shards in `dst`; returns the index.

    Deterministic (sorted files, the folders' fixed-seed validation split, fixed tar metadata: the same folder
    gives the same bytes) and atomic: everything goes into a hidden folder beside `dst`, which is renamed to
    `dst` once `index.json` is in it, so an interrupted write leaves no shard set behind. An existing `dst` is
    refused unless `overwrite`. A shard closes when it passes `shard_mb` megabytes or `shard_samples` samples.
    """
    from diffusion.data.folder import ImageFolderDataModule

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if shard_mb <= 0 or (shard_samples is not None and shard_samples < 1):
        raise ConfigError("--shard-mb must be > 0 and --shard-samples >= 1")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise PathExistsError(f"{dst} already exists; pass --overwrite to replace it")
        check_replaceable(dst, written_files(dst), what=WRITTEN)  # before any work; again at the swap
    folder = ImageFolderDataModule(path=str(src), labels=labels, image_size=1, allow_upscale=True, skip_bad=skip_bad)
    files, ys = folder._scan()
    captions = shard_captions(src, files, caption_column, skip_bad=skip_bad)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        good, skipped, min_side = [], [], None
        checked = progress(enumerate(files), desc="checking images", total=len(files), enabled=show_progress)
        for i, f in checked:  # header check (as data=folder's) and the smallest side
            if captions is not None and captions[i] is None:  # no usable caption (skip_bad)
                skipped.append(str(f))
                continue
            try:
                side = min(read_size(f))
            except Exception as e:
                if not skip_bad:
                    raise BadFileError(f"cannot read image {f}: {e}; pass --skip-bad to skip such files") from e
                skipped.append(str(f))
                continue
            good.append(i)
            min_side = side if min_side is None else min(min_side, side)
        if not good:
            raise BadFileError(f"{src} holds no usable images")
        train_rows, val_rows = split_indices(len(good), val_fraction, seed)
        sizes = {i: files[i].stat().st_size for i in good}
        classes = ys if labels else None
        splits = {}
        for split, rows in (("train", train_rows), ("val", val_rows)):
            groups, size = [], 0  # a shard closes once it passes shard_mb or shard_samples
            for n, row in enumerate(rows):
                if not groups or size >= shard_mb * 1e6 or (shard_samples and len(groups[-1]) >= shard_samples):
                    groups.append([])
                    size = 0
                groups[-1].append((f"{n:09d}", good[row]))
                size += sizes[good[row]]
            splits[split] = []
            for group in progress(groups, desc=f"writing {split} shards", enabled=show_progress):
                name = f"{split}-{len(splits[split]):06d}.tar"
                atomic_write(tmp / name, lambda f, group=group: _write_tar(f, group, files, classes, captions))
                splits[split].append({"name": name, "count": len(group), "bytes": (tmp / name).stat().st_size})
        index = {
            "format": FORMAT,
            "version": VERSION,
            "splits": splits,
            "classes": folder.classes if labels else None,
            "captions": captions is not None,
            "min_side": min_side,
            "skipped": len(skipped),
        }
        write_bytes(tmp / INDEX, json.dumps(index, indent=1, sort_keys=True).encode())  # last: marks it complete
        replace_folder(tmp, dst, written_files(dst), what=WRITTEN)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return index


def written_files(folder: Path) -> set[str]:
    """The files of the shard set in `folder` that the writer wrote: its index and the shards the index lists;
    none when `folder` holds no index of ours (a plain file, not a link, in this project's format)."""
    path = folder / INDEX
    if path.is_symlink() or not path.is_file():
        return set()
    try:
        index = json.loads(path.read_bytes())
        names = {s["name"] for split in index["splits"].values() for s in split}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {INDEX, *(n for n in names if isinstance(n, str))} if index.get("format") == FORMAT else set()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m diffusion.data.shards write SRC DST [options]`."""
    parser = argparse.ArgumentParser(prog="python -m diffusion.data.shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write an image folder as tar shards (labels, captions) for data=shards")
    w.add_argument("src", help="the image folder (class subfolders with --labels; metadata.jsonl/csv or .txt captions)")
    w.add_argument("dst", help="the new shard folder (upload it to a bucket as it is)")
    w.add_argument("--labels", action="store_true", help="class labels from the first-level subfolder names")
    w.add_argument("--caption-column", default="text", help="the caption column of metadata.jsonl / metadata.csv")
    w.add_argument("--val-fraction", type=float, default=0.01, help="held out into the val split (fixed seed)")
    w.add_argument("--seed", type=int, default=0, help="the validation split's seed")
    w.add_argument("--shard-mb", type=float, default=256.0, help="close a shard past this many megabytes")
    w.add_argument("--shard-samples", type=int, default=None, help="close a shard past this many samples")
    w.add_argument("--skip-bad", action="store_true", help="skip unreadable images and images without a caption")
    w.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    w.add_argument("--no-progress", action="store_true", help="draw no progress bar (logs, CI)")
    args = parser.parse_args(argv)
    from diffusion.errors import user_error_message

    try:
        index = write_shards(
            args.src,
            args.dst,
            labels=args.labels,
            caption_column=args.caption_column,
            val_fraction=args.val_fraction,
            seed=args.seed,
            shard_mb=args.shard_mb,
            shard_samples=args.shard_samples,
            skip_bad=args.skip_bad,
            show_progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    counts = {s: sum(x["count"] for x in shards) for s, shards in index["splits"].items()}
    print(
        f"wrote {args.dst}: {counts['train']} train / {counts['val']} val samples in "
        f"{sum(len(s) for s in index['splits'].values())} shards"
        + (f", {len(index['classes'])} classes" if index["classes"] else "")
        + (", captions" if index["captions"] else "")
        + (f"; skipped {index['skipped']} bad files or images without a caption" if index["skipped"] else "")
    )
    return 0


# --- the epoch plan ---------------------------------------------------------------------------------------------
def _generator(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of `size` emits a stream of n items 0..n-1: fill it, then for each new
    item emit a random one of those held (the new one among them); drain at random at the end."""
    if size <= 1 or n <= 1:
        return np.arange(n)
    draws = rng.random(n + min(size, n))
    buf: list[int] = []
    out = np.empty(n, dtype=np.int64)
    k = 0
    for i in range(n):
        buf.append(i)
        if len(buf) >= size:
            j = int(draws[i] * len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out[k] = buf.pop()
            k += 1
    rest = np.array(buf, dtype=np.int64)
    out[k:] = rest[rng.permutation(len(rest))]
    return out


@dataclass(frozen=True)
class Plan:
    """One worker's part of an epoch: `ids` (sample ids: the n-th sample of the split as written) in the order it
    yields them, a whole number of batches; `shards`, the shards that hold them, in the order they are read."""

    ids: np.ndarray
    shards: list[int]  # shard numbers, in the order read
    rank_batches: int


def worker_plan(
    counts: Sequence[int],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    buffer: int,
    world: int,
    rank: int,
    workers: int,
    worker: int,
    batch_size: int,
) -> Plan:
    """The samples logical `worker` of `rank` yields this epoch, in order (the module docstring's steps 1-4)."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # each shard's first sample id
    order = _generator(seed, epoch, 1).permutation(len(counts)) if shuffle else np.arange(len(counts))  # 1.
    ends = np.cumsum(counts[order])  # stream position where each ordered shard ends
    rank_batches = int(counts.sum()) // world // batch_size  # 2.
    per, extra = divmod(rank_batches, workers)  # 3.
    first = sum(per + (w < extra) for w in range(worker))
    n = (per + (worker < extra)) * batch_size
    a = (rank * rank_batches + first) * batch_size  # this worker's stream range [a, a + n)
    ids = np.empty(n, dtype=np.int64)
    shards, k = [], 0
    s = int(np.searchsorted(ends, a, side="right"))
    while k < n:
        shard = int(order[s])
        begin = a + k - (int(ends[s]) - int(counts[shard]))  # offset in this shard
        take = min(n - k, int(counts[shard]) - begin)
        ids[k : k + take] = starts[shard] + begin + np.arange(take)
        shards.append(shard)
        k, s = k + take, s + 1
    emit = buffer_order(n, buffer if shuffle else 1, _generator(seed, epoch, rank, worker, 2))  # 4.
    return Plan(ids=ids[emit], shards=shards, rank_batches=rank_batches)


# --- reading ----------------------------------------------------------------------------------------------------
def iter_samples(location: Location, name: str, expected: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of shard `name`, in order; a BadFileError when the shard is not a
    tar or holds another number of samples than the index says (an interrupted copy, a foreign file)."""
    count, key, parts = 0, None, {}
    try:
        with location.open(name) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                k, _, ext = base.partition(".")
                if k != key and key is not None:
                    yield key, parts
                    count, parts = count + 1, {}
                key = k
                parts[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as e:
        raise BadFileError(f"shard {location.where(name)} is not a readable tar ({e}); write or copy it again") from e
    if key is not None:
        yield key, parts
        count += 1
    if count != expected:
        raise BadFileError(
            f"shard {location.where(name)} holds {count} samples where {INDEX} says {expected}: an interrupted "
            "copy? copy the shard set again"
        )


class ShardStream(IterableDataset):
    """The training stream of one rank: yields whole uint8 batches `(x (B, C, S, S), y (B,) or captions)`.

    `epoch` and `skip` (batches of this rank already trained in that epoch) are set by `ShardLoader` before each
    iteration; workers are started afresh per epoch, so each receives them with the dataset.
    """

    def __init__(
        self,
        location: Location,
        shards: list[dict],
        *,
        prep: Preprocess,
        batch_size: int,
        seed: int,
        shuffle: bool,
        buffer: int,
        flip: bool,
        labels: bool,
        captions: bool,
        world: int = 1,
        rank: int = 0,
        workers: int = 1,
    ) -> None:
        self.location, self.shards, self.prep = location, shards, prep
        self.batch_size, self.seed, self.shuffle, self.buffer = batch_size, seed, shuffle, buffer
        self.flip, self.labels, self.captions = flip, labels, captions
        self.world, self.rank, self.workers = world, rank, max(1, workers)
        self.counts = [int(s["count"]) for s in shards]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).tolist()
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return sum(self.counts) // self.world // self.batch_size

    def plan(self, worker: int) -> Plan:
        return worker_plan(
            self.counts,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            buffer=self.buffer,
            world=self.world,
            rank=self.rank,
            workers=self.workers,
            worker=worker,
            batch_size=self.batch_size,
        )

    def __iter__(self) -> Iterator[tuple]:
        info_ = get_worker_info()
        physical = info_.id if info_ is not None else 0
        W, B = self.workers, self.batch_size
        logical = (physical + self.skip) % W  # after P batches the next one is logical worker P mod W's
        done = len(range(logical, self.skip, W))  # batches of this logical worker already trained
        plan = self.plan(logical)
        ids = plan.ids[done * B :]
        if len(ids) == 0:
            return
        needed = set(ids.tolist())
        held: dict[int, dict[str, bytes]] = {}
        reader = self._read(plan.shards, needed)
        for b in range(0, len(ids), B):
            batch = ids[b : b + B].tolist()
            for i in batch:
                while i not in held:
                    sid, parts = next(reader)
                    held[sid] = parts
            yield self._decode([(i, held.pop(i)) for i in batch])

    def _read(self, shards: list[int], needed: set[int]) -> Iterator[tuple[int, dict[str, bytes]]]:
        """(sample id, parts) of the needed samples, reading the plan's shards in order; shards holding none of
        them are not opened."""
        wanted = sorted(needed)
        for shard in shards:
            start, count = self.starts[shard], self.counts[shard]
            j = bisect.bisect_left(wanted, start)
            if j == len(wanted) or wanted[j] >= start + count:
                continue
            for offset, (_, parts) in enumerate(iter_samples(self.location, self.shards[shard]["name"], count)):
                if start + offset in needed:
                    yield start + offset, parts

    def _decode(self, samples: list[tuple[int, dict[str, bytes]]]) -> tuple:
        images, ys, texts = [], [], []
        for i, parts in samples:
            ext = next((e for e in parts if f".{e}" in IMAGE_EXTENSIONS), None)
            if ext is None:
                raise BadFileError(f"sample {i} of {self.location.path} has no image ({', '.join(parts)})")
            g = None
            if self.prep.crop == "random":
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i)
            try:
                images.append(load_image(io.BytesIO(parts[ext]), self.prep, generator=g))
            except OSError as e:
                raise BadFileError(f"sample {i} of {self.location.path}: {e.__cause__ or e}") from e
            ys.append(int(parts["cls"]) if self.labels and "cls" in parts else -1)
            texts.append(sample_captions(parts))
        x = torch.from_numpy(np.stack(images))  # (B, C, S, S) uint8
        if self.flip:
            flips = flip_mask(self.seed, self.epoch, [i for i, _ in samples])
            x[flips] = x[flips].flip(-1)
        y = torch.tensor(ys, dtype=torch.long)
        texts = pick_captions(self.seed, self.epoch, [i for i, _ in samples], texts)  # as folders draw
        # captions take the labels' place: a batch's conditions are labels or captions (diffusion.conditioning)
        return (x, texts) if self.captions else (x, y)


class ShardLoader(DataLoader):
    """The training DataLoader over a `ShardStream`: before each pass asks `begin` for (epoch, skip) and hands
    them to the stream (the workers, started per pass, receive them with it)."""

    def __init__(self, dataset: ShardStream, *, begin, num_workers: int) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=Uint8Batch(),
            pin_memory=torch.cuda.is_available(),
        )
        self.begin = begin

    def __iter__(self):
        self.dataset.epoch, self.dataset.skip = self.begin()
        return super().__iter__()


# --- the datamodule ---------------------------------------------------------------------------------------------
class ShardDataModule(_SplitDataModule):
    """`data=shards`: train from a shard set written by `python -m diffusion.data.shards write`, local or remote.

    Args (beyond the shared ones):
        path: the shard folder, or a URL prefix (s3://bucket/x, gs://..., az://..., https://host/x).
        storage: non-secret object store options (region, endpoint, skip_signature, ...); credentials come from
            the environment and a config that carries them is refused.
        crop, crop_size, allow_upscale: as `data=folder`.
        shuffle: shuffle the shard order and the samples (through `shuffle_buffer` samples) each epoch.
        labels: yield the shards' class labels (else -1).
        captions: yield `(images, captions)` batches, the captions (a list of strings) in the labels' place.
        val_samples: at most this many samples of the val split, decoded once into memory for validation.
    """

    def __init__(
        self,
        *,
        path: str,
        storage: dict | None = None,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int | None = None,
        flip: bool = True,
        crop: Literal["center", "random"] = "center",
        crop_size: int | None = None,
        allow_upscale: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        labels: bool = True,
        captions: bool = False,
        val_samples: int | None = 1024,
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            val_fraction=0.0,
            seed=seed,
            num_workers=num_workers,
            flip=flip,
            decoding=True,
        )
        if path is None or str(path) in ("", "???"):
            raise ConfigError("data.path is not set: pass data.path=/path/to/shards (or s3://bucket/prefix)")
        if crop not in ("center", "random"):
            raise ConfigError(f"data.crop={crop!r} is not one of 'center', 'random'")
        if shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer={shuffle_buffer} must be >= 1")
        self.location = Location(str(path), dict(storage or {}))
        self.path = str(path)
        self.prep = Preprocess(image_size=image_size, channels=channels, crop=crop, crop_size=crop_size)
        self.allow_upscale, self.shuffle, self.shuffle_buffer = allow_upscale, shuffle, shuffle_buffer
        self.captions, self.val_samples = captions, val_samples
        self.index = self._read_index()
        classes = self.index.get("classes")
        self.labels = bool(labels and classes)
        self.classes = classes if self.labels else None
        self.num_classes = len(classes) if self.labels else None
        if captions and not self.index.get("captions"):
            raise ConfigError(f"data.captions=true but the shard set {self.path} has no captions")
        need, key = (crop_size, "data.crop_size") if crop_size else (image_size, "data.image_size")
        side = self.index.get("min_side") or 0
        if side < need and not allow_upscale:
            raise ConfigError(
                f"the shard set {self.path} holds images of side {side}, smaller than {key}={need} "
                "(set data.allow_upscale=true to upscale them)"
            )
        self.train_stream: ShardStream | None = None
        self._epoch: int | None = None  # the epoch the training loader is in
        self._passes = 0  # training passes begun (the epoch when there is no trainer)

    @property
    def captioned(self) -> bool:
        return self.captions

    def caption_corpus(self) -> list[str] | None:
        """Every training caption (for a text encoder's tokenizer): the `.txt` members of the train shards, read once
        before training without decoding an image (a remote set is downloaded once for it)."""
        if not self.captions:
            return None
        corpus = []
        for shard in self.index["splits"].get("train", []):
            for _, parts in iter_samples(self.location, shard["name"], int(shard["count"])):
                corpus.extend(sample_captions(parts))
        log.info(f"data: {len(corpus)} training captions read from the shards of {self.path}")
        return corpus

    def _read_index(self) -> dict:
        raw = self.location.read(INDEX)
        try:
            index = json.loads(raw)
            splits = index["splits"]
            ok = index.get("format") == FORMAT and isinstance(splits["train"], list)
            ok = ok and all(isinstance(s["name"], str) and int(s["count"]) >= 0 for v in splits.values() for s in v)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadFileError(f"{self.location.where(INDEX)} is not a shard index ({e})") from e
        if not ok:
            raise BadFileError(
                f"{self.location.where(INDEX)} is not a {FORMAT} index; write the set with "
                "python -m diffusion.data.shards write"
            )
        if index.get("version", 0) > VERSION:
            raise BadFileError(f"{self.location.where(INDEX)} has version {index['version']}; update this project")
        for split, shards in index["splits"].items():
            for shard in shards:
                problem = self.location.outside(shard["name"])
                if problem is not None:
                    raise BadFileError(
                        f"{self.location.where(INDEX)} lists the {split} shard {shard['name']!r}, which {problem}: "
                        "a shard set's index names only files inside it"
                    )
        return index

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        images, ys, texts = [], [], []
        center = Preprocess(**{**self.prep.key(), "crop": "center"})
        for shard in self.index["splits"].get("val", []):
            for _, parts in iter_samples(self.location, shard["name"], int(shard["count"])):
                if self.val_samples is not None and len(images) >= self.val_samples:
                    break
                ext = next(e for e in parts if f".{e}" in IMAGE_EXTENSIONS)
                images.append(torch.from_numpy(load_image(io.BytesIO(parts[ext]), center)))
                ys.append(int(parts["cls"]) if self.labels and "cls" in parts else -1)
                texts.append(sample_captions(parts))
            if self.val_samples is not None and len(images) >= self.val_samples:
                break
        shape = (0, self.channels, self.image_size, self.image_size)
        x = torch.stack(images) if images else torch.empty(shape, dtype=torch.uint8)
        self.val_set = ArrayImages(x, torch.tensor(ys, dtype=torch.long))
        if self.captions:  # captions in the labels' place, as in training batches
            self.val_set = Captioned(self.val_set, texts, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        shards = self.index["splits"]["train"]
        if sum(int(s["count"]) for s in shards) // world < self.batch_size:
            raise ConfigError(
                f"the shard set {self.path} has too few training samples for data.batch_size={self.batch_size} "
                f"on {world} processes"
            )
        self.train_stream = ShardStream(
            self.location,
            shards,
            prep=self.prep,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=self.shuffle,
            buffer=self.shuffle_buffer,
            flip=self.flip,
            labels=self.labels,
            captions=self.captions,
            world=world,
            rank=rank,
            workers=self.num_workers,
        )
        return ShardLoader(self.train_stream, begin=self._begin_pass, num_workers=self.num_workers)

    def _layout(self) -> dict:
        stream = self.train_stream
        return {"world_size": stream.world, "num_workers": stream.workers, "batch_size": stream.batch_size}

    def _begin_pass(self) -> tuple[int, int]:
        """(epoch, batches of it to skip) for the pass about to start: Lightning's epoch when training, else a
        count of passes; the skip from a checkpoint's state for the epoch it was saved in."""
        trainer, resume = self.trainer, self._resume_state
        if trainer is not None:
            epoch = trainer.current_epoch
        else:
            epoch = resume["epoch"] if resume else self._passes
        self._passes, self._epoch, self._resume_state = epoch + 1, epoch, None
        if not resume or resume.get("epoch") != epoch:
            return epoch, 0
        if resume.get("layout") != self._layout():
            info(
                f"data: the checkpoint stopped in epoch {epoch} with {resume.get('layout')}, this run has "
                f"{self._layout()}: epoch {epoch} starts over"
            )
            return epoch, 0
        return epoch, int(resume["position"]) // self.batch_size

    def state_dict(self) -> dict:
        """The epoch, the samples of it this rank trained on, and the layout they were counted in."""
        trainer = self.trainer
        if self._epoch is None or trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self._epoch, "position": done * self.batch_size, "layout": self._layout()}

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


if __name__ == "__main__":
    sys.exit(main())
