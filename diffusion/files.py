"""Our writes: atomic, and never through a link we did not create.

Every file the project writes (checkpoints, sample images and grids, exports) goes through `atomic_write`: the
bytes go into a new temporary file in the destination's own folder (created exclusively, O_EXCL | O_NOFOLLOW,
so a planted file or link with that name is never opened), which is flushed, fsynced and renamed over the
destination. The rename replaces a link at the destination instead of writing through it, and it is atomic on
the destination's filesystem whatever TMPDIR is: a reader, or a kill -9 at any moment, sees the old file or
the new one, never half of one. On any error (a full disk) the temporary file is removed and the old file is
left as it was. An overwrite removes only what we wrote there (`replace_folder`), and a path we are given to read
is checked to be a regular file before it is opened (`regular_file`: a named pipe would block). Plain Python: no
torch, no Lightning.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO

from diffusion.errors import BadFileError, IsAFolderError, MissingPathError, PathError, PathExistsError

log = logging.getLogger(__name__)
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def create_exclusive(path: Path) -> int:
    """A new file at `path` opened for writing (and reading, which a memmap of it needs); FileExistsError if
    anything (a file, a link) is there."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW | getattr(os, "O_BINARY", 0), 0o644)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *, fsync: bool = True) -> None:
    """Write `path` atomically: `write(f)` fills a temporary file beside it, which then replaces `path`.

    `fsync=False` skips the two fsyncs (for files a crash may lose, such as thousands of sample PNGs); the
    replace is still atomic for readers and still never follows a link at `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    fd = create_exclusive(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """`atomic_write` of `data`."""
    atomic_write(path, lambda f: f.write(data), fsync=fsync)


def npy_memmap(f: BinaryIO, dtype, shape: tuple[int, ...]):
    """A writable memmap of a new .npy array of `dtype` and `shape` in `f`, the file `atomic_write` hands to its
    `write` (the header is written first): fill it, flush it and drop it before `write` returns."""
    import numpy as np

    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(f, header)
    f.flush()
    return np.memmap(f, dtype=dtype, mode="r+", offset=f.tell(), shape=tuple(shape))


def move(src: Path, dest: Path) -> None:
    """Rename `src` to `dest` (a link moves as a link, never followed); never replaces a file at `dest`."""
    if dest.exists() or dest.is_symlink():
        raise PathExistsError(f"{dest} already exists; {src} is not moved over it")
    os.rename(src, dest)


def check_writable(folder: Path) -> None:
    """An OSError unless a new file can be created in `folder`: probes with a uniquely named exclusive file."""
    probe = folder / f".write_test-{secrets.token_hex(6)}"
    os.close(create_exclusive(probe))
    probe.unlink()


def real_folder(folder: Path) -> Path:
    """Create `folder`; if a link sits there (one we did not create), replace it by a real folder."""
    if folder.is_symlink():
        folder.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def move_tree(src: Path, dest: Path) -> None:
    """Move every file under `src` (a folder we just wrote) to the same place under `dest`, then remove `src`.

    Each file is renamed over its destination, so a link planted there is replaced, not written through; a
    link planted where a subfolder goes is replaced by a real folder.
    """
    for file in sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = file.relative_to(src)
        folder = dest
        for part in rel.parts[:-1]:
            folder = real_folder(folder / part)
        os.replace(file, folder / rel.name)
    for folder in sorted((p for p in src.rglob("*") if p.is_dir()), reverse=True):
        folder.rmdir()
    src.rmdir()


def regular_file(path: str | Path, what: str) -> Path:
    """`path` when it is a regular file (or a link to one), checked before it is opened; else a one-line error
    naming `what` and the path: missing, a folder, or a named pipe, device or socket (opening a named pipe blocks
    until someone writes to it, and a signal cannot always stop that)."""
    path = Path(path).expanduser()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MissingPathError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise PathError(f"cannot read {what} {path} ({e.strerror})") from e
    if stat.S_ISDIR(mode):
        raise IsAFolderError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise BadFileError(f"{what} {path} is {kind}, not a regular file; refused")
    return path


def check_replaceable(dest: Path, ours: Collection[str], *, what: str) -> None:
    """A one-line PathExistsError naming `dest` unless an overwrite may remove it: a real folder (not a link)
    holding nothing but regular files named in `ours` (what we wrote there; an empty folder passes). A link, a
    file, or a folder holding anything else (the user's files, another folder) is never removed."""
    if dest.is_symlink() or not dest.is_dir():
        kind = "a link" if dest.is_symlink() else "a file"
        raise PathExistsError(f"{dest} is {kind}, not {what}; refusing to overwrite it")
    for entry in sorted(os.scandir(dest), key=lambda e: e.name):
        if entry.name not in ours or not entry.is_file(follow_symlinks=False):
            raise PathExistsError(
                f"{dest} holds {entry.name!r}, which is not part of {what}; refusing to overwrite it (remove "
                "it yourself or choose another destination)"
            )


def replace_folder(staged: Path, dest: Path, ours: Collection[str], *, what: str) -> None:
    """Rename the folder `staged` (one we just wrote, beside `dest`) to `dest`. An existing `dest` must pass
    `check_replaceable`: it is swapped out in one rename, then exactly its files named in `ours` are removed (a
    file that appeared there meanwhile is kept, with the folder, and named in a warning)."""
    if not (dest.exists() or dest.is_symlink()):
        os.rename(staged, dest)  # a folder that appears meanwhile is replaced only when empty (rename's rule)
        return
    check_replaceable(dest, ours, what=what)
    old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(4)}")
    os.rename(dest, old)
    os.rename(staged, dest)
    for name in ours:
        (old / name).unlink(missing_ok=True)
    try:
        old.rmdir()
    except OSError:
        log.warning(f"kept {old}: files appeared in {dest} while it was replaced")
