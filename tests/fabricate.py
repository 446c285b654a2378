"""Standard datasets fabricated in their real on-disk formats, a few random images each, for tests without downloads.

- CIFAR-10: `cifar-10-batches-py/` as in cifar-10-python.tar.gz. The originals are Python 2 pickles (protocol 2):
  their keys and filenames are Python 2 `str` (SHORT_BINSTRING / BINSTRING opcodes, which Python 3 loads as
  `b'data'` with encoding="bytes" and as 'data' with encoding="latin1"), `data` is a uint8 (N, 3072) array
  rebuilt through `numpy.core.multiarray._reconstruct` with its raw bytes as a Python 2 str, `labels` a list of
  ints. `py2_pickle` writes exactly those opcodes, so a reader that only copes with Python 3 pickles fails here.
- MNIST: torchvision's `MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte` idx files (big-endian magic
  2051 for images, 2049 for labels, then the sizes, then uint8 data), optionally gzipped as downloaded.
- CelebA: torchvision's `celeba/` root: `img_align_celeba/000001.jpg ...` (178x218 RGB JPEGs) beside
  `list_eval_partition.txt` (`000001.jpg 0`: 0 train, 1 valid, 2 test).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of the uint8 idx files (0x0803 images, 0x0801 labels)


# --- Python 2 pickles ------------------------------------------------------------------------------------------
def _py2(obj, out: bytearray) -> None:
    if isinstance(obj, bytes):  # a Python 2 str
        out += b"U" + bytes([len(obj)]) + obj if len(obj) < 256 else b"T" + struct.pack("<I", len(obj)) + obj
    elif obj is None:
        out += b"N"
    elif isinstance(obj, bool):
        out += b"\x88" if obj else b"\x89"  # NEWTRUE / NEWFALSE
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out += b"K" + bytes([obj])  # BININT1
        elif 0 <= obj < 65536:
            out += b"M" + struct.pack("<H", obj)  # BININT2
        else:
            out += b"J" + struct.pack("<i", obj)  # BININT
    elif isinstance(obj, tuple):
        out += b"("
        for item in obj:
            _py2(item, out)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]("  # EMPTY_LIST, MARK ... APPENDS
        for item in obj:
            _py2(item, out)
        out += b"e"
    elif isinstance(obj, dict):
        out += b"}("  # EMPTY_DICT, MARK ... SETITEMS
        for key, value in obj.items():
            _py2(key, out)
            _py2(value, out)
        out += b"u"
    elif isinstance(obj, np.ndarray) and obj.dtype == np.uint8:
        # numpy.core.multiarray._reconstruct(ndarray, (0,), 'b'), then __setstate__((1, shape, dtype, False, raw))
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        _py2((0,), out)
        _py2(b"b", out)
        out += b"\x87R("  # TUPLE3, REDUCE, MARK
        _py2(1, out)
        _py2(tuple(obj.shape), out)
        out += b"cnumpy\ndtype\n"  # dtype('u1', 0, 1), __setstate__((3, '|', None, None, None, -1, -1, 0))
        _py2((b"u1", 0, 1), out)
        out += b"R"
        _py2((3, b"|", None, None, None, -1, -1, 0), out)
        out += b"b\x89"  # BUILD; not Fortran-ordered
        _py2(np.ascontiguousarray(obj).tobytes(), out)
        out += b"tb"
    else:
        raise TypeError(f"py2_pickle: {type(obj).__name__} is not written by this small pickler")


def py2_pickle(obj) -> bytes:
    """A protocol-2 pickle as Python 2 wrote it; `bytes` values become Python 2 `str`."""
    out = bytearray(b"\x80\x02")
    _py2(obj, out)
    return bytes(out + b".")


def cifar10(root: Path, *, per_batch: int = 8, seed: int = 0) -> Path:
    """`root/cifar-10-batches-py/` with 5 training batches and a test batch of `per_batch` images each."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [(f"data_batch_{i}", f"training batch {i} of 5") for i in range(1, 6)] + [
        ("test_batch", "testing batch 1 of 1")
    ]
    for name, label in names:
        labels = rng.integers(0, 10, per_batch)
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),  # R, G, B planes of 32x32, row-major
            b"labels": [int(y) for y in labels],
            b"batch_label": label.encode(),
            b"filenames": [f"{CIFAR10_CLASSES[y]}_s_{i:06d}.png".encode() for i, y in enumerate(labels)],
        }
        (folder / name).write_bytes(py2_pickle(batch))
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return folder


# --- MNIST idx files -------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """A uint8 idx file: big-endian magic (0x08 type, ndim), the sizes, the bytes; `path.gz` when gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def mnist(root: Path, *, train: int = 16, test: int = 8, gz: bool = False, seed: int = 0) -> Path:
    """`root/MNIST/raw/` with `train` and `test` 28x28 digits and their labels."""
    raw = Path(root) / "MNIST" / "raw"
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz=gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8), gz=gz)
    return raw


# --- CelebA ----------------------------------------------------------------------------------------------------
def celeba(root: Path, *, train: int = 12, valid: int = 4, test: int = 2, seed: int = 0) -> Path:
    """torchvision's `root/celeba/`: aligned 178x218 JPEG faces (random pixels) and the official partition file."""
    from PIL import Image

    folder = Path(root) / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, part in enumerate([0] * train + [1] * valid + [2] * test):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8), "RGB").save(images / name, quality=95)
        lines.append(f"{name} {part}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return folder
