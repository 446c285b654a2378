"""Our writes: atomic, and never through a link we did not create.

Every file the project writes (checkpoints, sample images and grids, exports) goes through `atomic_write`: the
bytes go into a new temporary file in the destination's own folder (created exclusively, O_EXCL | O_NOFOLLOW,
so a planted file or link with that name is never opened), which is flushed, fsynced and renamed over the
destination. The rename replaces a link at the destination instead of writing through it, and it is atomic on
the destination's filesystem whatever TMPDIR is: a reader, or a kill -9 at any moment, sees the old file or
the new one, never half of one. On any error the temporary file is removed and the old file is left as it was;
a write the disk refuses (full, over quota, read-only, not allowed) becomes one `PathError` naming the file, also
when the writer reports it in its own way (torch.save: RuntimeError "unexpected pos", the OSError as its context).
An overwrite removes only what we wrote there (`replace_folder`), and a path we are given to read is checked to be
a regular file before it is opened (`regular_file`: a named pipe would block). Plain Python: no torch, no
Lightning.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import secrets
import stat
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO

from diffusion.errors import BadFileError, IsAFolderError, MissingPathError, PathError, PathExistsError

log = logging.getLogger(__name__)
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
TEMP_NAME = re.compile(r"\..+\.tmp-[0-9a-f]{12}")  # atomic_write's temporary files
LOCK_FILE = ".lock"  # in a folder a process holds (hold_folder): the holder's pid
# Why the disk refuses a write; the user acts on these (frees space, raises a quota, picks another folder).
REFUSED_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
# What torch's zip writer says when a write under it failed and it lost the OSError's errno.
FAILED_WRITE_WORDS = ("unexpected pos", "file write failed")


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


def refused_write(exc: BaseException) -> str | None:
    """Why the disk refused a write ("No space left on device"), if `exc` or an error in its chain says so."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        if isinstance(exc, OSError) and exc.errno in REFUSED_WRITE:
            return exc.strerror or os.strerror(exc.errno)
        exc = exc.__cause__ or exc.__context__
    if isinstance(seen[0], RuntimeError) and any(w in str(seen[0]) for w in FAILED_WRITE_WORDS):
        return "the write failed"
    return None


def atomic_write(
    path: str | Path, write: Callable[[BinaryIO], None], *, fsync: bool = True, what: str | None = None
) -> None:
    """Write `path` atomically: `write(f)` fills a temporary file beside it, which then replaces `path`.

    `fsync=False` skips the two fsyncs (for files a crash may lose, such as thousands of sample PNGs); the
    replace is still atomic for readers and still never follows a link at `path`. A write the disk refuses
    raises a one-line PathError: "could not save <what> P (No space left on device); the previous <what> there
    is intact" (`what`, e.g. "checkpoint", names the kind of file; by default "file").
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")  # TEMP_NAME
    try:
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
    except Exception as e:
        reason = refused_write(e)
        if reason is None:
            raise
        kind = what or "file"
        kept = f"the previous {kind} there is intact" if path.exists() else f"no {kind} was there before"
        raise PathError(f"could not save {f'{what} ' if what else ''}{path} ({reason}); {kept}") from e
    if fsync:
        fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """`atomic_write` of `data`."""
    atomic_write(path, lambda f: f.write(data), fsync=fsync)


class LogFile(logging.FileHandler):
    """The run's log file (`<run folder>/train.log`, conf/hydra/default.yaml). When the disk refuses a write, one
    warning line on stderr, and the console keeps the messages; logging's own handler prints a traceback for
    every message instead (the write that fails next, a checkpoint, then ends the run with its one line)."""

    refused = False

    def handleError(self, record: logging.LogRecord) -> None:
        reason = refused_write(sys.exc_info()[1]) if sys.exc_info()[1] is not None else None
        if reason is None:
            super().handleError(record)
        elif not self.refused:
            self.refused = True
            sys.stderr.write(f"warning: cannot write {self.baseFilename} ({reason}); messages go to the console only\n")


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


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove the temporary files `atomic_write` left in `folder` when the process writing them was killed (a kill -9
    during a checkpoint save leaves `.last.ckpt.tmp-<hex>`); the names removed. Only for a folder this process holds:
    another writer's temporary file would be in use."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    removed = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def write_folder(dest: Path, write: Callable[[str], None]) -> None:
    """`write(folder)` into a fresh folder inside `dest` (a library's save_pretrained, several files of ours), whose
    files are then renamed into `dest` (`move_tree`): all of them or, when `write` fails, none (the fresh folder is
    removed, and whatever `dest` held is as it was)."""
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=".write-", dir=dest))
    try:
        write(str(staging))
        move_tree(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def hold_folder(folder: Path) -> str | None:
    """Hold `folder` for the rest of this process's life; None once held, or the pid of the process holding it.

    An exclusive flock on `folder/.lock`, on a descriptor kept open: the kernel releases it when the process
    ends however it ends, so a crashed or killed holder leaves the folder free (its unlocked .lock file is
    reused). The lock file is written in place, not through `atomic_write`: a rename would put a new, unlocked
    file there. A clean exit removes it. Where there is no flock (Windows), folders are not held.
    """
    try:
        import fcntl
    except ImportError:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            return holder or "unknown"
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it as it ended, after we opened it: lock the file there now
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    atexit.register(_release_folder, fd, path)
    return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def _release_folder(fd: int, path: Path) -> None:
    if _same_file(fd, path):  # removed while still locked, so no one else holds that file meanwhile
        path.unlink()
    os.close(fd)


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
