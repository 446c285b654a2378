"""How the Trainer writes checkpoints: atomically on the run folder's own filesystem, with one-line errors.

Lightning's default writer stages the file in TMPDIR and moves it into place, which is a copy (not a rename)
when TMPDIR is on another filesystem: a kill during it leaves a truncated `last.ckpt`. `AtomicCheckpointIO`
writes a temporary file beside the checkpoint, fsyncs it and renames it over the old one (see
`diffusion.files.atomic_write`), so a kill -9 at any moment leaves the previous checkpoint readable. A failed
write (a full disk) removes the temporary file and stops the run with one line saying the previous checkpoint
is intact. It is passed to the Trainer as a plugin (conf/trainer/default.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic renames in the checkpoint's own folder (local paths only)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f), what="checkpoint")  # a full disk: one line
