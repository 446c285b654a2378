"""User errors (bad config values, paths, files) and how the command line reports them.

Code that checks what the user gave raises a `UserError` whose message names the config key or the file it is
about (`ConfigError("data.batch_size=0 must be >= 1")`). Each kind also derives from the built-in exception it
replaces (`ConfigError` is a `ValueError`, `MissingPathError` a `FileNotFoundError`), so `except ValueError`
keeps working. The command-line edge (`train.py`, `sample.py`, `export.py`) turns a user error into one line on
stderr and exit code 1; anything else is a bug and keeps its traceback (in the run's log file too) so it can be
reported. `HYDRA_FULL_ERROR=1` shows the traceback of user errors as well.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import traceback
import typing
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class UserError(Exception):
    """Something the user can fix; the message (one line) names the config key or file it is about."""


class ConfigError(UserError, ValueError):
    """A config value is invalid or two values do not go together."""


class BadFileError(UserError, ValueError):
    """A file the user gave (checkpoint, weights, image, cache) exists but its contents cannot be used."""


class MissingPackageError(UserError, ModuleNotFoundError):
    """An optional package a feature needs is not installed (`diffusion.optional.require` names the extra)."""


class PathError(UserError, OSError):
    """A path the user gave cannot be read or written."""


class MissingPathError(PathError, FileNotFoundError):
    """A path the user gave does not exist."""


class PathExistsError(PathError, FileExistsError):
    """A path the user gave already exists and would be overwritten."""


class NotAFolderError(PathError, NotADirectoryError):
    """A path the user gave is a file where a folder is needed."""


class IsAFolderError(PathError, IsADirectoryError):
    """A path the user gave is a folder where a file is needed."""


# OS errors about a named file that come from the user's machine or paths, not from our code.
USER_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ELOOP,
    errno.ENAMETOOLONG,
}
_WORKER = re.compile(r"Caught (\w+) in DataLoader worker process (\d+)\.")


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is about what the user gave (see the module doc) rather than a bug."""
    if isinstance(exc, UserError):
        return True
    if isinstance(exc, FloatingPointError):  # the run diverged (non-finite loss): its learning rate, data, ...
        return True
    if isinstance(exc, OSError) and exc.filename is not None and exc.errno in USER_ERRNOS:
        return True
    return False


def worker_error_line(message: str) -> str | None:
    """The one line of an error re-raised from a DataLoader worker: its kind, its own last line and the source
    file and line that raised it, instead of the whole flattened traceback; None if `message` is not one."""
    found = _WORKER.search(message)
    if found is None:
        return None
    lines = [line for line in message.splitlines() if line.strip()]
    files = [line.strip() for line in lines if line.strip().startswith('File "')]
    where = ""
    if files:
        place = re.match(r'File "([^"]+)", line (\d+)', files[-1])
        if place:
            where = f" (raised at {place.group(1)}:{place.group(2)})"
    last = lines[-1].strip()
    last = last.split(": ", 1)[1] if re.match(r"^[\w.]+: ", last) else last
    return f"in DataLoader worker {found.group(2)}: {last}{where}"


def not_utf8(e: UnicodeDecodeError) -> str:
    """Where a UTF-8 decode failed, in a few words ("byte 0xe9 at offset 6"), for a message naming the file."""
    return f"byte {e.object[e.start]:#04x} at offset {e.start}"


def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return worker_error_line(str(msg)) or " ".join(str(msg).split())


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of the outermost user error in `exc`'s cause chain, or None if there is none.

    The outermost one is the one raised with context (e.g. naming the file), not the low-level error it wraps.
    """
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if is_user_error(e) and str(e):
            return _one_line(e)
    return None


# What to do when Lightning refuses a config group for this machine (its message does not say).
GROUP_HINTS = {
    "trainer": "choose a trainer that fits this machine: trainer=cpu, or trainer=default (a GPU when there is one)",
}
# The keys whose refusal is about the machine (the hint above); any other key Lightning names is a bad value.
MACHINE_KEYS = {"accelerator", "devices", "strategy", "num_nodes", "precision"}
# Words in the optimizer's own messages (torch's "Invalid learning rate: -1") -> the key they are about.
OPTIMIZER_WORDS = {
    "learning rate": "optim.lr",
    "epsilon": "optim.optimizer.eps",
    "beta": "optim.optimizer.betas",
    "weight_decay": "optim.optimizer.weight_decay",
}


def mistyped_value(target: Callable, values: dict) -> str | None:
    """The first `key=value` of `values` that cannot be the int / float that `target`'s signature asks for."""
    try:
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # unresolvable annotations: nothing to check against
        return None
    for key, value in values.items():
        wanted = hints.get(key)
        kinds = typing.get_args(wanted) or (wanted,)
        numeric = [k for k in kinds if k in (int, float)]
        if isinstance(value, str) and numeric and str not in kinds:
            try:
                numeric[0](value)
            except ValueError:
                return f"{key}={value!r} is not {'an int' if numeric[0] is int else 'a number'}"
    return None


def config_error(group: str, cause: BaseException, *, target: Callable | None = None, values: dict | None = None):
    """A one-line ConfigError for `cause`, raised while building config group `group` (e.g. `trainer`,
    `callbacks.ema`) from `values` with `target`; None when `cause` looks like a bug rather than the config's."""
    bad = mistyped_value(target, values or {}) if target is not None else None
    if bad is not None:
        return ConfigError(f"{group}.{bad}")
    foreign = isinstance(cause, ValueError) or type(cause).__name__ == "MisconfigurationException"
    foreign = foreign or (isinstance(cause, TypeError) and "argument" in str(cause))
    if not (is_user_error(cause) or foreign):
        return None
    message = _one_line(cause)
    lightning = type(cause).__name__ == "MisconfigurationException"
    if group not in message:
        # the keys of `values` Lightning's message names ("`max_steps` must be a non-negative integer")
        keys = (values or {}) if lightning else {}
        named = [k for k in keys if re.search(rf"(?<![\w.]){re.escape(str(k))}(?!\w)", message)]
        message = f"{group}.{named[0]}={values[named[0]]}: {message}" if named else f"{group}: {message}"
        if group == "optim.optimizer":
            keys = [k for word, k in OPTIMIZER_WORDS.items() if word in message.lower()]
            message += f" ({keys[0]}={(values or {}).get(keys[0].split('.')[-1])})" if keys else ""
        hint = GROUP_HINTS.get(group.split(".")[0])
        machine = not named or any(k in MACHINE_KEYS for k in named)
        if hint and machine and lightning:  # Lightning refuses this machine (no GPU, devices=4 on one)
            message += f"; {hint}"
    return ConfigError(message)


def log_to_files(message: str, exc: BaseException) -> None:
    """`message` and `exc`'s traceback into the log files of the root logger only (Hydra's `<task>.log`)."""
    text = f"{message}\n{''.join(traceback.format_exception(exc))}"
    record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def exit_on_user_error(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs); a user error becomes one line `error: ...` on stderr and exit code 1.

    The traceback goes to the run's log file either way. Other exceptions, and every exception when
    HYDRA_FULL_ERROR=1, propagate with their traceback.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        message = user_error_message(e)
        log_to_files(f"error: {message}" if message else "unexpected error (a bug: please report it)", e)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
