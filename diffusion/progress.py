"""One progress bar for the long steps outside the training loop: FID's reference statistics and samples, the
image and latent caches, the shard writer, post-hoc EMA reconstruction.

It is tqdm, as Lightning's TQDMProgressBar draws training's bar, on stderr and gone when done (`leave=False`).
Callers pass `enabled`: inside a run `diffusion.callbacks.progress.bar_enabled(trainer)`, which follows
`trainer.enable_progress_bar`; on the command line its own switch. Like pip's, the bar is drawn only when stderr
is a terminal: a log file or a captured stderr gets no carriage-return frames in front of an error line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """`iterable`, drawing a bar labelled `desc` while it is consumed (`total` items, when it has no len)."""
    if not enabled or not getattr(sys.stderr, "isatty", lambda: False)():
        return iter(iterable)
    from tqdm.auto import tqdm  # installed with lightning

    return iter(tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True))
