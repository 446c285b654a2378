"""Self-describing checkpoints: rebuild the network, the process and the (EMA) weights from one file.

A Lightning checkpoint written by `DiffusionModule` holds, besides Lightning's own keys:
- `checkpoint["diffusion"]`: {"format": 1, "net": {"target": "diffusion.unet.UNet", "config": {...}},
  "schedule": {"family": "discrete" | "edm" | "flow", ...the process's kwargs...}, "conditioning": {"target": ...,
  "config": {...}}, "codec": {"kind": "vae", "path": ...}}, written by `describe` (checkpoints from before EDM and
  flow hold only NoiseSchedule's kwargs: a discrete schedule; checkpoints without "conditioning" are
  class-conditional or unconditional, as their net says; the codec is named, not copied, and no "codec" means
  pixels);
- `checkpoint["state_dict"]`: the trained weights, network keys prefixed with "net.", a trainable text
  encoder's with "conditioning." (a frozen pretrained one is named by path or id in the description instead);
- `checkpoint["ema_state_dict"]`: the EMA copy of the network's weights (unprefixed), when EMA was on.
Files are read with `torch.load(weights_only=True)`, so loading never executes code from the file. The file
is data: the description is validated (plain values only, schedule keys that its family's class takes) and the
only class it can name is a registered network class (`NETWORKS`), never an arbitrary callable.
"""

from __future__ import annotations

import importlib
import json
import pickle
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffusion.errors import BadFileError, IsAFolderError, MissingPathError
from diffusion.files import regular_file
from diffusion.process import DEFAULT_FAMILY, Process, build_process, check_process_description

if TYPE_CHECKING:
    from diffusion.conditioning import Conditioning

FORMAT = 1
NET_PREFIX = "net."
CONDITIONING_PREFIX = "conditioning."
EMA_KEY = "ema_state_dict"


def describe_net(net: nn.Module) -> dict:
    """{"target": class path, "config": ...}: what `build_net` needs to rebuild `net`."""
    config = getattr(net, "config", None)
    if config is None:
        raise TypeError(f"{type(net).__name__} has no `config` dict, so its checkpoints cannot rebuild it")
    return {"target": f"{type(net).__module__}.{type(net).__qualname__}", "config": dict(config)}


def describe(
    net: nn.Module,
    schedule: Process,
    conditioning: Conditioning | None = None,
    *,
    codec: nn.Module | None = None,
) -> dict:
    """What `build_net`/`build_process`/`build_conditioning`/`build_codec` need to rebuild `net`, the process,
    `conditioning` and `codec`; plain, picklable-safe values."""
    description = {"format": FORMAT, "net": describe_net(net), "schedule": schedule.description()}
    if conditioning is not None:
        description["conditioning"] = conditioning.describe()
    codec_config = getattr(codec, "config", None)
    if codec_config and codec_config.get("kind") != "identity":
        description["codec"] = dict(codec_config)
    return description


def keep_in_state_dict(module: nn.Module, keep: frozenset[str]) -> None:
    """Make `module`'s state dicts hold only its tensors named in `keep` (names relative to it); loading a state dict
    leaves the others as they are (a LoRA checkpoint holds the adapters, a codec is named rather than copied)."""
    module.register_state_dict_post_hook(partial(_drop_unkept, keep))
    module.register_load_state_dict_pre_hook(partial(_fill_unkept, keep))


def _drop_unkept(keep: frozenset[str], module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state if k.startswith(prefix) and k[len(prefix) :] not in keep]:
        del state[key]


def _fill_unkept(keep: frozenset[str], module: nn.Module, state: dict, prefix: str, *args) -> None:
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name not in keep:
            state.setdefault(prefix + name, tensor.detach())


# The network classes a checkpoint may name, with the config keys that must be null when built from one (a
# checkpoint carries its own weights; it may not make us fetch or read anything else). A new backbone adds
# itself here with `register_network`.
NETWORKS: dict[str, tuple[str, ...]] = {
    "diffusion.unet.UNet": (),
    "diffusion.diffusers_unet.DiffusersUNet": ("pretrained",),
    "diffusion.diffusers_unet.DiffusersCondUNet": ("pretrained",),
    # adapters on a base that the config names by path (a checkpoint, read weights-only, or a pretrained folder)
    "diffusion.finetune.LoRANet": (),
}
PLAIN = (type(None), bool, int, float, str)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def register_network(cls: type[nn.Module], *, null_keys: tuple[str, ...] = ()) -> type[nn.Module]:
    """Allow checkpoints to build `cls` (an nn.Module with a `config` dict); `null_keys` must be null in them."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{cls!r} is not an nn.Module subclass")
    NETWORKS[f"{cls.__module__}.{cls.__qualname__}"] = tuple(null_keys)
    return cls


def is_plain(value) -> bool:
    """None, bool, int, float, str, and lists / tuples / str-keyed dicts of them: data that cannot act."""
    if isinstance(value, PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def check_description(description, *, source: str) -> dict:
    """`description` (a checkpoint's "diffusion" entry) if it is valid data, else a one-line ValueError.

    It must name a registered network class, with a config of plain values and str keys, and a schedule (the
    process) of a known family whose keys are that family's arguments, with plain values. `source` names the
    file in messages.
    """
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise BadFileError(f"{source} has no network description of format {FORMAT} (not written by this train.py)")
    check_net(description.get("net"), source=source)
    schedule = description.get("schedule")
    codec = description.get("codec")
    if codec is not None and (not isinstance(codec, dict) or not is_plain(codec)):
        raise BadFileError(f"{source}: the codec description is not a dict of plain values (str keys); refused")
    if not isinstance(schedule, dict) or not is_plain(schedule):
        raise BadFileError(f"{source}: the schedule description is not a dict of plain values (str keys); refused")
    check_process_description(schedule, source=source)
    return description


def check_net(net, *, source: str) -> tuple[str, dict]:
    """The (target, config) of a description's "net" entry: a registered class and a dict of plain values."""
    target = net.get("target") if isinstance(net, dict) else None
    if not isinstance(target, str) or target not in NETWORKS:
        raise BadFileError(
            f"{source} names network class {target!r}, which is not one of the network classes this project "
            f"builds ({', '.join(sorted(NETWORKS))}); refused"
        )
    config = net.get("config")
    if not isinstance(config, dict) or not is_plain(config):
        raise BadFileError(f"{source}: the config of {target} is not a dict of plain values (str keys); refused")
    fetched = [k for k in NETWORKS[target] if config.get(k) is not None]
    if fetched:
        raise BadFileError(f"{source}: {target} config sets {', '.join(fetched)}; a checkpoint must carry its weights")
    return target, config


def build_net(description: dict, *, source: str = "checkpoint") -> nn.Module:
    """Instantiate the network a description's "net" entry names; only registered classes (`NETWORKS`)."""
    target, config = check_net(description, source=source)
    module_name, _, cls_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):  # a registry entry gone stale
        raise BadFileError(f"{source} names {target}, which is not an nn.Module class")
    try:
        return cls(**config)
    except TypeError as e:
        raise BadFileError(f"{source}: {target} cannot be built from the checkpoint's config ({e})") from e


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
    if not isinstance(ckpt, dict) or "diffusion" not in ckpt or "state_dict" not in ckpt:
        raise BadFileError(f"{path} is not a checkpoint written by this project's train.py (no 'diffusion' key)")
    check_description(ckpt["diffusion"], source=f"checkpoint {path}")
    return ckpt


@dataclass
class LoadedModel:
    """A network and process rebuilt from a checkpoint, with where its weights came from."""

    net: nn.Module
    schedule: Process
    conditioning: Conditioning
    weights: str  # "ema" or "raw"
    global_step: int
    description: dict = field(repr=False)
    codec: nn.Module | None = field(default=None, repr=False)  # diffusion.codec.Codec: decode samples through it


def sub_state_dict(state: dict, prefix: str) -> dict:
    """The entries of `state` under `prefix` ("net.", "conditioning."), with the prefix taken off."""
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
    """A description as config keys: {"model._target_": ..., "model.base_channels": 32, "schedule.kind": ...}."""
    net = description["net"]
    flat = {"model._target_": net["target"], **{f"model.{k}": v for k, v in net["config"].items()}}
    flat.update({f"schedule.{k}": v for k, v in {"family": DEFAULT_FAMILY, **description["schedule"]}.items()})
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


def build_codec(config: dict | None, *, source: str):
    from diffusion.codec import build_codec as build

    return build(config, source=source)


def load_model(
    path: str | Path,
    *,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
    text_encoder: str | None = None,
) -> LoadedModel:
    """Rebuild network + schedule + conditioning + codec from `path` and load its EMA weights (or raw weights).

    `text_encoder` replaces the path / Hub id of a frozen pretrained text encoder the checkpoint names.
    """
    from diffusion.conditioning import build_conditioning

    ckpt = read_checkpoint(path)
    description = ckpt["diffusion"]
    source = f"checkpoint {path}"
    net = build_net(description["net"], source=source)
    state, weights = net_state_dict(ckpt, use_ema=use_ema)
    load_weights(net, state, source=source)
    schedule = build_process(description["schedule"])
    conditioning = build_conditioning(description.get("conditioning"), net=net, source=source, pretrained=text_encoder)
    try:
        conditioning.load_state_dict(sub_state_dict(ckpt["state_dict"], CONDITIONING_PREFIX))
    except RuntimeError as e:
        raise BadFileError(f"{source}: its text encoder weights do not fit its description ({e})") from None
    conditioning.check_network(net)
    codec = build_codec(description.get("codec"), source=source)
    net.eval().to(map_location)
    conditioning.eval().to(map_location)
    schedule.to(map_location)
    codec.to(map_location)
    return LoadedModel(
        net=net,
        schedule=schedule,
        conditioning=conditioning,
        weights=weights,
        global_step=int(ckpt.get("global_step", 0)),
        description=description,
        codec=codec,
    )


def image_shape(net: nn.Module) -> tuple[int, int, int]:
    """(C, S, S): the shape of one sample of `net` (in the codec's latent space when there is one)."""
    config = getattr(net, "config", {})
    channels = getattr(net, "in_channels", config.get("in_channels"))
    size = getattr(net, "image_size", config.get("image_size"))
    return (channels, size, size)
