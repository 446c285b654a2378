"""Self-describing checkpoints: read one safely, upgrade an old one, and find its parts.

A Lightning checkpoint written by `DiffusionModule` holds, besides Lightning's own keys:
- `checkpoint["diffusion"]`: {"format": 2, "net": {"target": "diffusion.unet.UNet", "config": {...}},
  "process": {"family": "discrete" | "edm" | "flow", ...the process's kwargs...}, "conditioning": {"target": ...,
  "config": {...}}, "codec": {"kind": "vae", "path": ...}}, written by `DiffusionModel.describe` (checkpoints without
  "conditioning" are class-conditional or unconditional, as their net says; the codec is named, not copied, and no
  "codec" means pixels);
- `checkpoint["state_dict"]`: the trained weights, the network's keys prefixed with "model.net.", a trainable text
  encoder's with "model.conditioning." (a frozen pretrained one is named by path or id in the description instead);
- `checkpoint["ema_state_dict"]`: the EMA copy of the network's weights (unprefixed), when EMA was on.
Format 1 (before the model object) called the process "schedule" and prefixed the weights "net." and
"conditioning."; the oldest ones hold only NoiseSchedule's kwargs there (a discrete schedule). `upgrade` turns
such a checkpoint into format 2 in place, so everything past `read_checkpoint` (and a Lightning resume, through
`DiffusionModule.on_load_checkpoint`) sees one format.

Files are read with `torch.load(weights_only=True)`, so loading never executes code from the file. The file is
data: the description is validated (plain values only, process keys that its family's class takes) and the only
class it can name is a registered network class (`diffusion.networks`), never an arbitrary callable.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from diffusion.errors import BadFileError, IsAFolderError, MissingPathError
from diffusion.files import regular_file
from diffusion.networks import check_net
from diffusion.process import DEFAULT_FAMILY, check_process_description
from diffusion.state import is_plain

FORMAT = 2
NET_PREFIX = "model.net."
CONDITIONING_PREFIX = "model.conditioning."
EMA_KEY = "ema_state_dict"
POSTHOC_KEY = "posthoc_ema"  # the post-hoc EMA profiles a run tracked: {"format", "sigma_rels", "step", "profiles"}
_OLD_PREFIXES = {"net.": NET_PREFIX, "conditioning.": CONDITIONING_PREFIX}  # format 1 -> 2
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def upgrade(ckpt: dict) -> dict:
    """`ckpt` (a checkpoint dict; or just a description under "diffusion") in format 2, changed in place."""
    description = ckpt.get("diffusion")
    if not isinstance(description, dict) or description.get("format") != 1:
        return ckpt
    description = dict(description, format=FORMAT)
    if "schedule" in description:
        description["process"] = description.pop("schedule")
    ckpt["diffusion"] = description
    state = ckpt.get("state_dict")
    if isinstance(state, dict):
        for key in list(state):
            if key.startswith("net_forward."):  # written when the compiled forward was registered as a module
                del state[key]
            for old, new in _OLD_PREFIXES.items():
                if key.startswith(old):
                    state[new + key[len(old) :]] = state.pop(key)
    return ckpt


def check_description(description, *, source: str) -> dict:
    """`description` (a checkpoint's "diffusion" entry, format 1 or 2) in format 2 if it is valid data, else a
    one-line BadFileError.

    It must name a registered network class, with a config of plain values and str keys, and a process of a known
    family whose keys are that family's arguments, with plain values. `source` names the file in messages.
    """
    if isinstance(description, dict) and description.get("format") == 1:
        description = upgrade({"diffusion": description})["diffusion"]
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise BadFileError(f"{source} has no network description of format {FORMAT} (not written by this train.py)")
    check_net(description.get("net"), source=source)
    process = description.get("process")
    codec = description.get("codec")
    if codec is not None and (not isinstance(codec, dict) or not is_plain(codec)):
        raise BadFileError(f"{source}: the codec description is not a dict of plain values (str keys); refused")
    if not isinstance(process, dict) or not is_plain(process):
        raise BadFileError(f"{source}: the process description is not a dict of plain values (str keys); refused")
    check_process_description(process, source=source)
    return description


def refusal_reason(e: BaseException) -> str:
    """Why torch's weights-only unpickler refused a file, in one line: the global it names, else its message."""
    text = _ANSI.sub("", str(e))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it names {found.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return lines[-1] if lines else type(e).__name__


def load_data(path: Path, *, what: str, mmap: bool = False):
    """torch.load `path` weights-only (tensors and plain values, never code); a one-line BadFileError naming the
    file and `what` it should be otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise BadFileError(
            f"{path} holds Python code or objects ({refusal_reason(e)}), which this project never loads: a "
            f"{what} may hold only tensors and plain values, so that reading one cannot run code"
        ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadFileError(f"{path} is not a readable {what} ({first})") from e


def read_checkpoint(path: str | Path) -> dict:
    """torch.load a checkpoint safely, with one-line errors naming the file for every way it can be wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingPathError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise IsAFolderError(f"checkpoint {path} is a folder, not a .ckpt file")
    ckpt = load_data(regular_file(path, "checkpoint"), what="checkpoint")  # a named pipe would block
    if not isinstance(ckpt, dict) or "diffusion" not in ckpt or not isinstance(ckpt.get("state_dict"), dict):
        raise BadFileError(f"{path} is not a checkpoint written by this project's train.py (no 'diffusion' key)")
    check_description(ckpt["diffusion"], source=f"checkpoint {path}")
    check_contents(ckpt, source=f"checkpoint {path}")
    return upgrade(ckpt)


def _is_state_dict(value, *, extra_state: bool = False) -> bool:
    """Whether `value` is a dict of str -> tensor (or, with `extra_state`, a module's plain extra state)."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or (extra_state and is_plain(v))) for k, v in value.items()
    )


def check_contents(ckpt: dict, *, source: str) -> None:
    """A one-line BadFileError naming `source` unless the weights and counters of `ckpt` have the types this
    project writes: `global_step` an int >= 0, `state_dict` / `ema_state_dict` dicts of tensors (a module's extra
    state, e.g. a trained tokenizer, may be plain data), and post-hoc EMA profiles that match their sigma_rels."""
    step = ckpt.get("global_step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise BadFileError(f"{source}: its global_step {step!r} is not an int >= 0; refused")
    if not _is_state_dict(ckpt["state_dict"], extra_state=True):
        raise BadFileError(f"{source}: its state_dict is not a dict of tensors with str keys; refused")
    if ckpt.get(EMA_KEY) is not None and not _is_state_dict(ckpt[EMA_KEY], extra_state=True):
        raise BadFileError(f"{source}: its {EMA_KEY} is not a dict of tensors with str keys; refused")
    saved = ckpt.get(POSTHOC_KEY)
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise BadFileError(f"{source}: its post-hoc EMA profiles ({POSTHOC_KEY}) are not a dict; refused")
    sigma_rels, profiles, step = saved.get("sigma_rels"), saved.get("profiles"), saved.get("step")
    problem = None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problem = f"step {step!r} is not an int >= 0"
    elif not isinstance(sigma_rels, list) or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in sigma_rels
    ):
        problem = f"sigma_rels {sigma_rels!r} are not a list of positive numbers"
    elif not isinstance(profiles, list) or not all(_is_state_dict(p) for p in profiles):
        problem = "profiles are not a list of dicts of tensors"
    elif len(profiles) != len(sigma_rels):
        problem = f"{len(profiles)} profiles for {len(sigma_rels)} sigma_rels"
    elif any(p.keys() != profiles[0].keys() for p in profiles):
        problem = "profiles hold different weights"
    if problem:
        raise BadFileError(f"{source}: its post-hoc EMA profiles ({POSTHOC_KEY}) do not match: {problem}; refused")


def sub_state_dict(state: dict, prefix: str) -> dict:
    """The entries of `state` under `prefix` (`NET_PREFIX`, `CONDITIONING_PREFIX`), with the prefix taken off."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def net_state_dict(ckpt: dict, *, use_ema: bool = True) -> tuple[dict, str]:
    """The network weights in a checkpoint: the EMA copy when present and asked for, else the raw ones."""
    if use_ema and ckpt.get(EMA_KEY):
        return ckpt[EMA_KEY], "ema"
    return sub_state_dict(ckpt["state_dict"], NET_PREFIX), "raw"


def weights_mismatch(net: nn.Module, state: dict) -> str:
    """How `state`'s tensors differ from `net`'s (shapes, missing, extra keys) in one line; '' when they fit."""
    target = net.state_dict()
    shapes = [
        f"{k}: {list(v.shape)} vs {list(target[k].shape)}"
        for k, v in state.items()
        if k in target and (not isinstance(v, torch.Tensor) or v.shape != target[k].shape)
    ]
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    parts = [
        f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for what, keys in (("shapes differ", shapes), ("missing", missing), ("unexpected", extra))
        if keys
    ]
    return "; ".join(parts)


def flat_description(description: dict) -> dict[str, object]:
    """A description as config keys: {"model._target_": ..., "model.base_channels": 32, "process.kind": ...}."""
    description = upgrade({"diffusion": description})["diffusion"]
    net = description["net"]
    flat = {"model._target_": net["target"], **{f"model.{k}": v for k, v in net["config"].items()}}
    flat.update({f"process.{k}": v for k, v in {"family": DEFAULT_FAMILY, **description["process"]}.items()})
    flat.update({f"codec.{k}": v for k, v in (description.get("codec") or {}).items()})
    return {k: json.loads(json.dumps(v)) for k, v in flat.items()}  # tuples -> lists, as in the other side


def description_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, value in `saved`, value in `current`) for each config key where two descriptions differ."""
    a, b = flat_description(saved), flat_description(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load_weights(net: nn.Module, state: dict, *, source: str) -> None:
    """Load `state` into `net` strictly; a one-line ValueError naming `source` and the differences otherwise."""
    problems = weights_mismatch(net, state)
    if problems:
        raise BadFileError(f"{source}: its weights do not match its own network description: {problems}")
    net.load_state_dict(state)


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: str, key: str = "ckpt_path") -> str | None:
    """ckpt_path as given: a .ckpt file, a run folder (its checkpoints/last.ckpt), or "last" (newest under runs_dir).

    `key` is the config key named in error messages (ckpt_path, init_from, ckpt, ...).
    """
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        found = sorted(Path(runs_dir).rglob("checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise MissingPathError(f"{key}=last: no checkpoints/last.ckpt under {runs_dir}")
        return str(found[-1])
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise MissingPathError(f"{key}={ckpt_path}: {path} does not exist")
    return str(path)
