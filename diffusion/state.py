"""Plain data and partial state dicts: the two checks every self-describing file relies on.

`is_plain` tells data that cannot act (None, numbers, strings and containers of them) from anything else, so a
description read from a checkpoint or an export can be trusted to name, never to run. `keep_in_state_dict` makes
a module's state dicts hold only some of its tensors (a LoRA net's adapters; nothing of a frozen codec, which is
named by path instead).
"""

from __future__ import annotations

import threading
from functools import partial

from torch import Tensor, nn

PLAIN = (type(None), bool, int, float, str)


def is_plain(value) -> bool:
    """None, bool, int, float, str, and lists / tuples / str-keyed dicts of them: data that cannot act."""
    if isinstance(value, PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


_whole = threading.local()  # while set, `keep_in_state_dict`'s modules give whole state dicts (`_fill_unkept`)


def keep_in_state_dict(module: nn.Module, keep: frozenset[str]) -> None:
    """Make `module`'s state dicts hold only its tensors named in `keep` (names relative to it); loading a state dict
    leaves the others as they are (a LoRA checkpoint holds the adapters, a codec is named rather than copied)."""
    module.register_state_dict_post_hook(partial(_drop_unkept, keep))
    module.register_load_state_dict_pre_hook(partial(_fill_unkept, keep))


def _drop_unkept(keep: frozenset[str], module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    if getattr(_whole, "depth", 0):
        return
    for key in [k for k in state if k.startswith(prefix) and k[len(prefix) :] not in keep]:
        del state[key]


def _fill_unkept(keep: frozenset[str], module: nn.Module, state: dict, prefix: str, *args) -> None:
    # the module's own whole state dict says what a load expects: its non-persistent buffers (CLIP's position_ids)
    # are not in it, and filling them in would make a strict load fail on an unexpected key
    _whole.depth = getattr(_whole, "depth", 0) + 1
    try:
        whole = module.state_dict(keep_vars=True)
    finally:
        _whole.depth -= 1
    for name, value in whole.items():
        if name not in keep:
            state.setdefault(prefix + name, value.detach() if isinstance(value, Tensor) else value)
