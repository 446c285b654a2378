"""Start a new run from the weights of an earlier checkpoint (`init_from=PATH`), strictly or partially.

Unlike resuming (`ckpt_path=`), which restores the optimizer, the step count and the callbacks' state, this
copies only network weights into a freshly built network: training then starts at step 0 with a fresh
optimizer, possibly on another dataset. The checkpoint's EMA weights are used when present (they are the
better ones) unless asked otherwise. Keys can be left out on purpose (`ignore_keys`, e.g. a label embedding
whose class count changed); keys the two networks do not share, or share with different shapes, are either
an error that lists them all (strict) or reported and left at their fresh initialisation (partial). Plain
torch: no Lightning, no Hydra.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion.checkpoint import CONDITIONING_PREFIX, net_state_dict, read_checkpoint, sub_state_dict
from diffusion.errors import ConfigError

_SHOWN = 8  # keys listed per category in messages; the counts are always complete


@dataclass
class InitReport:
    """What `init_from_checkpoint` did: which checkpoint tensors went where, and which did not."""

    path: str
    weights: str  # "ema" or "raw": which copy of the checkpoint's weights was used
    global_step: int  # the step the source checkpoint was saved at
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # matched init.ignore_keys (in the net or the checkpoint)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (key, ckpt, net)
    missing: list[str] = field(default_factory=list)  # in the net, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the net

    def problems(self) -> str:
        """The mismatches, missing and unexpected keys, in one line ('' when there are none)."""
        parts = []
        if self.mismatched:
            shown = ", ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:_SHOWN])
            parts.append(f"{len(self.mismatched)} shape mismatches ({shown}{_more(self.mismatched)})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing from the checkpoint ({_keys(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} not in the model ({_keys(self.unexpected)})")
        return "; ".join(parts)

    def summary(self) -> str:
        """One line for the console."""
        line = (
            f"init_from={self.path}: loaded {len(self.loaded)} tensors ({self.weights} weights, "
            f"saved at step {self.global_step})"
        )
        if self.ignored:
            line += f"; ignored {len(self.ignored)} ({_keys(self.ignored)})"
        problems = self.problems()
        return line + (f"; left at their fresh initialisation: {problems}" if problems else "")


def _more(items: Sequence) -> str:
    return f", ... {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""


def _keys(keys: Sequence[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + _more(keys)


def matches(key: str, patterns: Sequence[str]) -> bool:
    """Whether a state-dict key is named by one of `patterns`: the key itself, a module prefix, or a glob."""
    return any(key == p or key.startswith(p.rstrip(".") + ".") or fnmatch.fnmatchcase(key, p) for p in patterns)


def init_from_state_dict(
    net: nn.Module,
    state: dict[str, Tensor],
    *,
    ignore_keys: Sequence[str] = (),
    strict: bool = True,
    report: InitReport,
) -> InitReport:
    """Copy the tensors of `state` into `net` by name; fills and returns `report`.

    Steps: 1. drop the keys named by `ignore_keys` on both sides; 2. sort the rest into loaded / shape
    mismatched / missing / unexpected; 3. strict: any of the last three is a ValueError listing them all;
    partial: load what matches, but a checkpoint that shares no tensor with the net is still an error.
    """
    target = net.state_dict()
    # 1. keys asked to be left out
    report.ignored = sorted({k for k in (*target, *state) if matches(k, ignore_keys)})
    ignored = set(report.ignored)
    # 2. sort the others
    loadable: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in ignored:
            continue
        if key not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
        else:
            loadable[key] = value
    report.missing = [k for k in target if k not in state and k not in ignored]
    report.loaded = list(loadable)
    # 3. strict or partial
    problems = report.problems()
    if problems and strict:
        raise ConfigError(
            f"init_from={report.path} does not fit the model: {problems}. Set init.strict=false to load the "
            "matching tensors and keep the rest freshly initialised, or name keys to skip in init.ignore_keys"
        )
    if not loadable:
        raise ConfigError(f"init_from={report.path} shares no tensor with the model ({problems or 'all ignored'})")
    with torch.no_grad():
        for key, value in loadable.items():
            target[key].copy_(value)  # state_dict() tensors share storage with the parameters and buffers
    return report


def init_from_checkpoint(
    net: nn.Module,
    path: str | Path,
    *,
    ignore_keys: Sequence[str] = (),
    strict: bool = True,
    use_ema: bool = True,
    conditioning: nn.Module | None = None,
) -> InitReport:
    """Load the network weights of the checkpoint at `path` into `net` (see `init_from_state_dict`).

    `use_ema`: take the checkpoint's EMA weights when it has them (else its raw weights). `conditioning`: also
    load the checkpoint's conditioning state into it (a trained text encoder and its tokenizer), when it has one.
    """
    ckpt = read_checkpoint(path)
    cond_state = sub_state_dict(ckpt["state_dict"], CONDITIONING_PREFIX)
    if conditioning is not None and cond_state:
        try:
            conditioning.load_state_dict(cond_state)
        except RuntimeError as e:
            raise ConfigError(f"init_from={path}: its text encoder does not fit conditioning.encoder ({e})") from None
    state, weights = net_state_dict(ckpt, use_ema=use_ema)
    report = InitReport(path=str(path), weights=weights, global_step=int(ckpt.get("global_step", 0)))
    return init_from_state_dict(net, state, ignore_keys=list(ignore_keys), strict=strict, report=report)
