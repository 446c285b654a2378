"""Train diffusers' `UNet2DModel` inside `DiffusionModule`: a thin adapter to the project's net(x_t, t, y) contract.

The U-Net is built from `UNet2DModel` keyword arguments, or loaded pretrained from a Hugging Face Hub id (e.g.
`google/ddpm-cifar10-32`, downloaded when online) or a local folder written by `save_pretrained` (a model
folder, or a pipeline folder with a `unet/` subfolder). Class conditioning uses UNet2DModel's own label
embedding (`num_class_embeds = num_classes + 1`): label `num_classes` is the null class that classifier-free
guidance needs, as in `diffusion.unet.UNet`. The adapter's `config` holds plain values only (the full diffusers
config, not the pretrained id), so checkpoints rebuild it without a download. diffusers is an optional extra
(`pip install 'diffusion[diffusers]'`) and is imported only here and in `diffusion.export`.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.errors import ConfigError, MissingPathError, PathError

_PRIVATE_PREFIX = "_"


def import_diffusers():
    """The diffusers module, or an ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            "model=diffusers_unet and export format=diffusers need diffusers: pip install 'diffusers>=0.30' safetensors"
        ) from e
    return diffusers


def _plain(value: Any) -> Any:
    """Config values as JSON-like plain Python (tuples to lists), safe for weights_only checkpoints."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def load_pretrained_unet(pretrained: str):
    """UNet2DModel.from_pretrained on a local folder (model or pipeline layout) or a Hub id, with one-line errors."""
    UNet2DModel = import_diffusers().UNet2DModel
    path = Path(pretrained).expanduser()
    if path.is_dir():
        for folder in (path, path / "unet"):
            if (folder / "config.json").is_file():
                return UNet2DModel.from_pretrained(str(folder), low_cpu_mem_usage=False)
        raise MissingPathError(
            f"model.pretrained={pretrained} holds no config.json (nor unet/config.json): "
            "not a folder written by save_pretrained"
        )
    if path.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise MissingPathError(f"model.pretrained={pretrained} is not a folder written by save_pretrained")
    offline = _offline()
    errors = []
    for subfolder in (None, "unet"):  # model repos keep the U-Net at the root, pipeline repos in unet/
        try:
            return UNet2DModel.from_pretrained(
                pretrained, subfolder=subfolder, local_files_only=offline, low_cpu_mem_usage=False
            )
        except Exception as e:  # noqa: BLE001 - report the Hub's reason in one line below
            errors.append(" ".join(str(e).split())[:200] or type(e).__name__)
    where = "offline (HF_HUB_OFFLINE is set) and not in the local Hugging Face cache" if offline else errors[0]
    raise PathError(
        f"model.pretrained={pretrained}: could not load it from the Hugging Face Hub ({where}); download it once "
        "while online, or pass a local folder written by save_pretrained"
    )


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel behind the project's network interface: forward(x_t, t, y=None) -> output.

    Args:
        image_size: the training resolution (the U-Net's `sample_size`).
        in_channels: image channels; the output has as many (eps, v or x0 prediction).
        num_classes: if set, labels in [0, num_classes) condition the U-Net; label `num_classes` (or y=None)
            is the unconditional null class. The U-Net gets num_classes + 1 label embeddings.
        pretrained: a Hub id or a local save_pretrained folder; its config decides the architecture (`unet`
            is then ignored) and its weights are loaded. A new label embedding (pretrained unconditional,
            `num_classes` set) starts at random; `sample_size` follows `image_size`.
        unet: UNet2DModel keyword arguments (block_out_channels, down_block_types, ...), when not pretrained.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int = 3,
        num_classes: int | None = None,
        pretrained: str | None = None,
        unet: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        UNet2DModel = import_diffusers().UNet2DModel
        if num_classes is not None and num_classes < 1:
            raise ConfigError(f"model.num_classes={num_classes} must be >= 1 (or null for unconditional)")
        source = load_pretrained_unet(pretrained) if pretrained else None
        config = {k: v for k, v in (source.config if source is not None else unet or {}).items()}
        config = {k: _plain(v) for k, v in config.items() if not k.startswith(_PRIVATE_PREFIX)}
        where = f"model.pretrained={pretrained}" if pretrained else "model.unet"
        if config.get("class_embed_type") not in (None, "none"):
            raise ConfigError(f"{where}: class_embed_type={config['class_embed_type']!r} is not supported (use null)")
        if pretrained:
            if config.get("in_channels", 3) != in_channels:
                raise ConfigError(
                    f"model.pretrained={pretrained} takes in_channels={config.get('in_channels')} but the data has "
                    f"{in_channels} (data.channels)"
                )
            embeds = config.get("num_class_embeds")
            if embeds is not None and num_classes is None:
                raise ConfigError(
                    f"model.pretrained={pretrained} is class-conditional ({embeds} label embeddings): set "
                    f"model.num_classes (={embeds - 1} if its last embedding is the null class)"
                )
        elif config.get("num_class_embeds") not in (None, num_classes + 1 if num_classes else None):
            raise ConfigError("model.unet.num_class_embeds is set by the adapter: use model.num_classes=K instead")
        out_channels = config.setdefault("out_channels", in_channels)
        if out_channels != in_channels:
            raise ConfigError(
                f"{where}: out_channels={out_channels} differs from in_channels={in_channels}; learned-variance "
                "outputs are not supported (the loss trains one prediction per pixel and channel)"
            )
        config.update(
            sample_size=image_size,
            in_channels=in_channels,
            num_class_embeds=num_classes + 1 if num_classes else None,
            class_embed_type=None,
        )
        default_blocks = inspect.signature(UNet2DModel.__init__).parameters["down_block_types"].default
        levels = len(config.get("down_block_types") or default_blocks)
        if image_size % 2 ** (levels - 1):
            raise ConfigError(f"model.image_size={image_size} must be divisible by 2^{levels - 1} for {levels} levels")
        self.unet = UNet2DModel.from_config(config)
        if source is not None:
            missing, unexpected = self.unet.load_state_dict(source.state_dict(), strict=False)
            fresh = [k for k in missing if not k.startswith("class_embedding.")]
            if fresh or unexpected:  # only a new label embedding may be missing
                raise ConfigError(f"model.pretrained={pretrained} weights do not fit: {fresh[:5]} {unexpected[:5]}")
        # Plain values, enough to rebuild this network (saved into checkpoints); the weights come from there.
        self.config = dict(
            image_size=image_size,
            in_channels=in_channels,
            num_classes=num_classes,
            pretrained=None,
            unet=_plain({k: v for k, v in self.unet.config.items() if not k.startswith(_PRIVATE_PREFIX)}),
        )
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) noisy images; t: (B,) integer timesteps in [0, T); y: (B,) labels or None."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.num_classes:
            if y is None:  # unconditional: the null class
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
        elif y is not None:
            raise ConfigError("class labels were given to an unconditional model (model.num_classes is null)")
        return self.unet(x, t, class_labels=y).sample
