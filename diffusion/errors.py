"""One-line reports of user errors (bad paths, bad config values, bad files) at the command line.

Library code raises ordinary exceptions whose messages name the culprit (`ValueError("data.path=... does not
exist")`). The command-line edge (`train.py`, `sample.py`) turns the user-error kinds below into one line on
stderr and a non-zero exit, instead of a traceback; `HYDRA_FULL_ERROR=1` shows the traceback anyway.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)


def user_error_message(exc: BaseException) -> str | None:
    """The message of the outermost user error in `exc`'s cause chain, or None if there is none.

    Hydra wraps errors raised while instantiating a config node (InstantiationException), so the chain is
    searched below it; the outermost user error is the one raised with context (e.g. naming the file), not the
    low-level error it wraps.
    """
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if isinstance(e, USER_ERRORS) and str(e):
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            return " ".join(str(msg).split())
    return None


def exit_on_user_error(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs); a user error becomes one line `error: ...` on stderr and exit code 1.

    Other exceptions, and every exception when HYDRA_FULL_ERROR=1, propagate with their traceback.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        message = user_error_message(e)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
