"""Self-describing checkpoints: rebuild the network, the schedule and the (EMA) weights from one file.

A Lightning checkpoint written by `DiffusionModule` holds, besides Lightning's own keys:
- `checkpoint["diffusion"]`: {"format": 1, "net": {"target": "diffusion.unet.UNet", "config": {...}},
  "schedule": {...NoiseSchedule kwargs...}}, written by `describe`;
- `checkpoint["state_dict"]`: the trained weights, network keys prefixed with "net.";
- `checkpoint["ema_state_dict"]`: the EMA copy of the network's weights (unprefixed), when EMA was on.
Files are read with `torch.load(weights_only=True)`, so loading never executes code from the file, and the
network class must live inside this package.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffusion.schedule import NoiseSchedule

FORMAT = 1
NET_PREFIX = "net."
EMA_KEY = "ema_state_dict"


def describe(net: nn.Module, schedule: NoiseSchedule) -> dict:
    """What `build_net`/`NoiseSchedule` need to rebuild `net` and `schedule`; plain, picklable-safe values."""
    config = getattr(net, "config", None)
    if config is None:
        raise TypeError(f"{type(net).__name__} has no `config` dict, so its checkpoints cannot rebuild it")
    return {
        "format": FORMAT,
        "net": {"target": f"{type(net).__module__}.{type(net).__qualname__}", "config": dict(config)},
        "schedule": dict(schedule.config),
    }


def build_net(description: dict) -> nn.Module:
    """Instantiate the network class named in a checkpoint's description (only classes in `diffusion.*`)."""
    target = description["target"]
    module_name, _, cls_name = target.rpartition(".")
    if not (module_name == "diffusion" or module_name.startswith("diffusion.")):
        raise ValueError(f"checkpoint names network class {target!r}, which is outside the diffusion package")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**description["config"])


def read_checkpoint(path: str | Path) -> dict:
    """torch.load a checkpoint safely, with one-line errors naming the file for every way it can be wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a .ckpt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({first})") from e
    if not isinstance(ckpt, dict) or "diffusion" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by this project's train.py (no 'diffusion' key)")
    return ckpt


@dataclass
class LoadedModel:
    """A network and schedule rebuilt from a checkpoint, with where its weights came from."""

    net: nn.Module
    schedule: NoiseSchedule
    weights: str  # "ema" or "raw"
    global_step: int
    description: dict = field(repr=False)


def net_state_dict(ckpt: dict, *, use_ema: bool = True) -> tuple[dict, str]:
    """The network weights in a checkpoint: the EMA copy when present and asked for, else the raw ones."""
    if use_ema and ckpt.get(EMA_KEY):
        return ckpt[EMA_KEY], "ema"
    raw = {k[len(NET_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(NET_PREFIX)}
    return raw, "raw"


def load_model(path: str | Path, *, use_ema: bool = True, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild network + schedule from `path` and load its EMA weights (or raw weights)."""
    ckpt = read_checkpoint(path)
    description = ckpt["diffusion"]
    net = build_net(description["net"])
    state, weights = net_state_dict(ckpt, use_ema=use_ema)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its own network description "
            f"(missing {len(missing)} keys, e.g. {missing[:3]}; unexpected {unexpected[:3]})"
        )
    schedule = NoiseSchedule(**description["schedule"])
    net.eval().to(map_location)
    schedule.to(map_location)
    return LoadedModel(
        net=net,
        schedule=schedule,
        weights=weights,
        global_step=int(ckpt.get("global_step", 0)),
        description=description,
    )
