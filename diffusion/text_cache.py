"""Text embeddings of a frozen text encoder cached on disk (`conditioning.cache_dir`), so the encoder need not stay in
memory while the network trains.

A frozen encoder (CLIP, T5) gives the same embedding for a caption every time, so a fine-tune needs it only once per
distinct caption. `EmbeddingTable.build` encodes every caption a run will see (the training captions, the null
caption "" and the sample grids' prompts) in batches and writes them to one safetensors file in the cache folder,
named by the encoder's fingerprint (its class and config) and the captions' checksum: a second run with the same
encoder and captions reads the file without running the encoder. The table then answers those captions from host
memory; `TextConditioning` frees the encoder's weights (a caption outside the table loads them again). Each row is
stored as the encoder gave it (its dtype, its length), so a cached run's loss is bit for bit the in-memory one's.
Plain torch and safetensors; the write goes through `diffusion.files`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from diffusion.files import write_bytes

log = logging.getLogger(__name__)
Rows = dict[str, dict[str, Tensor]]  # caption -> {"context": (L, D), "context_mask": (L,), ...}
Encode = Callable[[list[str]], dict[str, Tensor]]  # captions -> batch-first tensors


def fingerprint(encoder_description: dict, captions: Sequence[str]) -> str:
    """A short hash of the encoder (class and config) and of the captions: another of either builds its own file."""
    h = hashlib.sha256(json.dumps(encoder_description, sort_keys=True, default=str).encode())
    for caption in captions:
        h.update(caption.encode() + b"\0")
    return h.hexdigest()[:16]


class EmbeddingTable:
    """Caption -> its encoder outputs, held in host memory, read from or written to `folder`."""

    def __init__(self, rows: Rows, path: Path) -> None:
        self.rows = rows
        self.path = path

    @classmethod
    def build(
        cls, folder: str | Path, *, encoder_description: dict, captions: Sequence[str], encode: Encode, batch_size: int
    ) -> EmbeddingTable:
        """The table of `captions` (deduplicated, in order): read from `folder` when a run with the same encoder and
        captions wrote it, else encoded `batch_size` at a time and written there."""
        captions = list(dict.fromkeys(str(c) for c in captions))
        path = Path(folder).expanduser() / f"text_embeddings-{fingerprint(encoder_description, captions)}.safetensors"
        if path.is_file():
            rows = _read(path)
            if list(rows) == captions:
                log.info(f"text embeddings: {len(rows)} captions read from {path}")
                return cls(rows, path)
        rows: Rows = {}
        with torch.no_grad():
            for start in range(0, len(captions), batch_size):
                chunk = captions[start : start + batch_size]
                out = encode(chunk)
                for i, caption in enumerate(chunk):
                    rows[caption] = {k: v[i].detach().cpu() for k, v in out.items()}
        _write(path, rows)
        log.info(f"text embeddings: {len(rows)} captions encoded into {path}")
        return cls(rows, path)

    def __contains__(self, caption: str) -> bool:
        return caption in self.rows

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for row in self.rows.values() for v in row.values())


def _write(path: Path, rows: Rows) -> None:
    """One safetensors file: tensor "<i>/<key>" is caption i's output `key`; the captions in the metadata."""
    from safetensors.torch import save

    tensors = {f"{i}/{k}": v.contiguous() for i, row in enumerate(rows.values()) for k, v in row.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, save(tensors, metadata={"captions": json.dumps(list(rows))}))


def _read(path: Path) -> Rows:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        captions = json.loads(f.metadata()["captions"])
        rows: Rows = {c: {} for c in captions}
        for name in f.keys():
            i, key = name.split("/", 1)
            rows[captions[int(i)]][key] = f.get_tensor(name)
    return rows
