"""The network seam: what every denoising network (U-Net, diffusers U-Nets, LoRA-wrapped nets, DiT next) offers,
and the one registry that the config and the safe checkpoint loader share.

A network is an `nn.Module` that
- is called as `net(x, t, y=None, *, context=None, context_mask=None)`: x (B, C, S, S) is what the process gives
  the network (x_t, or EDM's c_in x), t (B,) the process's time input (an integer timestep, EDM's c_noise, flow's
  1000 t); y (B,) class labels (label `num_classes` is the null class) for class-conditional nets; context
  (B, L, D) and context_mask (B, L, True where attended) for nets with cross-attention; pipeline networks take
  more keywords from their conditioning (`pooled` (B, P), SDXL's `time_ids` (B, 6)). It returns a tensor shaped
  like x: the process's prediction target (eps, v, x0, EDM's F, flow's velocity).
- declares about itself `in_channels`, `image_size` (the side of the square sample it models, in the codec's
  latent space when there is one), `num_classes` (None: no labels) and `context_dim` (None: no cross-attention);
  optionally `pooled_dim` (the pooled text embedding it takes) and `takes_time_ids` (SDXL's micro-conditioning);
- carries `config`, a dict of plain values that rebuilds it as `cls(**config)` (saved in checkpoints);
- is registered with `@register_network` (its class path is then what a config's `_target_` and a checkpoint's
  description name).

A checkpoint can name only a registered class, and only in this package: `build_net` imports the module a
description names when it is a module of `diffusion` (our own code, never a user's) and refuses any class that
did not register itself. A new backbone is therefore one file that decorates its class, plus a config group entry.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from diffusion.errors import BadFileError, ConfigError
from diffusion.state import is_plain

# class path -> config keys that must be null when built from a checkpoint (a checkpoint carries its own weights;
# it may not make us fetch or read anything else, e.g. a pretrained folder)
NETWORKS: dict[str, tuple[str, ...]] = {}
_MODULE = re.compile(r"^diffusion(\.[A-Za-z_][A-Za-z0-9_]*)+$")


@runtime_checkable
class Network(Protocol):
    """The interface a denoising network implements (see the module docstring)."""

    config: dict
    in_channels: int
    image_size: int
    num_classes: int | None
    context_dim: int | None

    def __call__(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, *, context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor: ...  # fmt: skip


@dataclass(frozen=True)
class NetworkSpec:
    """What a network declares about itself."""

    in_channels: int
    image_size: int
    num_classes: int | None
    context_dim: int | None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, S, S): one sample the network models."""
        return (self.in_channels, self.image_size, self.image_size)


def spec(net: nn.Module) -> NetworkSpec:
    """The declarations of `net` (a ConfigError naming the missing one for a network that does not make them)."""
    missing = [a for a in ("in_channels", "image_size") if getattr(net, a, None) is None]
    if missing:
        raise ConfigError(f"{type(net).__name__} does not declare {', '.join(missing)} (see diffusion/networks.py)")
    return NetworkSpec(
        in_channels=int(net.in_channels),
        image_size=int(net.image_size),
        num_classes=getattr(net, "num_classes", None),
        context_dim=getattr(net, "context_dim", None),
    )


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_network(cls: type[nn.Module] | None = None, *, null_keys: tuple[str, ...] = ()):
    """Class decorator: allow configs and checkpoints to build `cls`; `null_keys` must be null in a checkpoint's
    config. Use as `@register_network` or `@register_network(null_keys=("pretrained",))`."""

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"{cls!r} is not an nn.Module subclass")
        NETWORKS[class_path(cls)] = tuple(null_keys)
        return cls

    return register if cls is None else register(cls)


def check_declared(*, num_classes: int | None, context_dim: int | None = None, dropout: float = 0.0) -> None:
    """The config checks every network shares: what it declares about its conditioning, and its dropout."""
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"model.num_classes={num_classes} must be >= 1 (or null for unconditional)")
    if context_dim is not None and context_dim < 1:
        raise ConfigError(f"model.context_dim={context_dim} must be >= 1 (or null without cross-attention)")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout={dropout} must be in [0, 1)")


def check_registered(net: nn.Module, *, key: str = "model._target_") -> None:
    """A ConfigError naming `key` unless `net`'s class is a registered network (what a checkpoint can rebuild)."""
    path = class_path(type(net))
    if path not in NETWORKS:
        raise ConfigError(
            f"{key}={path} is not a registered network: decorate the class with "
            "@diffusion.networks.register_network (docs/extending.md)"
        )


def network_class(net: nn.Module) -> type:
    """`net`'s own class: FSDP's `fully_shard` (trainer=fsdp) swaps a sharded module's class for a subclass of it
    (FSDPUNet for UNet), which names no registered network."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(net)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls


def describe_net(net: nn.Module) -> dict:
    """{"target": class path, "config": ...}: what `build_net` needs to rebuild `net`."""
    config = getattr(net, "config", None)
    if config is None:
        raise TypeError(f"{type(net).__name__} has no `config` dict, so its checkpoints cannot rebuild it")
    return {"target": class_path(network_class(net)), "config": dict(config)}


def _registered(target: object) -> bool:
    """Whether `target` names a registered class; imports its module first when it is one of this package's."""
    if not isinstance(target, str):
        return False
    module = target.rpartition(".")[0]
    if target not in NETWORKS and _MODULE.match(module):
        try:
            importlib.import_module(module)  # our own module: its classes register themselves
        except ImportError:
            return False
    return target in NETWORKS


def check_net(description, *, source: str) -> tuple[str, dict]:
    """The (target, config) of a description's "net" entry: a registered class and a dict of plain values."""
    target = description.get("target") if isinstance(description, dict) else None
    if not _registered(target):
        raise BadFileError(
            f"{source} names network class {target!r}, which is not one of the network classes this project "
            f"builds ({', '.join(sorted(NETWORKS))}); refused"
        )
    config = description.get("config")
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
    try:
        return cls(**config)
    except (TypeError, ValueError, RuntimeError) as e:  # unknown keys, a refused value, a negative size
        raise BadFileError(f"{source}: {target} cannot be built from the checkpoint's config ({e})") from e
