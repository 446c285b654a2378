"""Train diffusers' U-Nets inside `DiffusionModule`: thin adapters to the project's net(x_t, t, y) contract.

`DiffusersUNet` wraps `UNet2DModel` (pixel DDPMs, class labels); `DiffusersCondUNet` wraps Stable Diffusion's
`UNet2DConditionModel`, which takes the text context as `context=` (passed on as `encoder_hidden_states`), and
SDXL's (addition_embed_type="text_time"), which also takes the pooled text embedding `pooled=` and the
micro-conditioning `time_ids=` (passed on as `added_cond_kwargs`).

The U-Net is built from `UNet2DModel` keyword arguments, or loaded pretrained from a Hugging Face Hub id (e.g.
`google/ddpm-cifar10-32`, downloaded when online) or a local folder written by `save_pretrained` (a model
folder, or a pipeline folder with a `unet/` subfolder). Class conditioning uses UNet2DModel's own label
embedding (`num_class_embeds = num_classes + 1`): label `num_classes` is the null class that classifier-free
guidance needs, as in `diffusion.unet.UNet`. The adapter's `config` holds plain values only (the full diffusers
config, not the pretrained id), so checkpoints rebuild it without a download. diffusers is an optional extra
(`pip install 'diffusion[diffusers]'`) and is imported only here, in `diffusion.pipeline`, `diffusion.codec`
and in `diffusion.export`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.errors import ConfigError
from diffusion.networks import check_declared, register_network
from diffusion.optional import import_diffusers
from diffusion.pipeline import load_component

_PRIVATE_PREFIX = "_"


def _plain(value: Any) -> Any:
    """Config values as JSON-like plain Python (tuples to lists), safe for weights_only checkpoints."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def load_pretrained_unet(pretrained: str, cls_name: str = "UNet2DModel"):
    """`cls_name`.from_pretrained on a local folder (model or pipeline layout) or a Hub id, with one-line errors."""
    return load_component(cls_name, pretrained, subfolder="unet", key="model.pretrained")


def copy_pretrained(unet: nn.Module, source: nn.Module, pretrained: str) -> None:
    """Load a pretrained U-Net's weights into ours; only a new label embedding may be missing."""
    missing, unexpected = unet.load_state_dict(source.state_dict(), strict=False)
    fresh = [k for k in missing if not k.startswith("class_embedding.")]
    if fresh or unexpected:
        raise ConfigError(f"model.pretrained={pretrained} weights do not fit: {fresh[:5]} {unexpected[:5]}")


def plain_config(unet: nn.Module) -> dict[str, Any]:
    """A diffusers model's config as plain values, without diffusers' private entries."""
    return _plain({k: v for k, v in unet.config.items() if not k.startswith(_PRIVATE_PREFIX)})


@register_network(null_keys=("pretrained",))
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
        gradient_checkpointing: recompute the U-Net's activations in the backward pass (less memory, ~30% slower).
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int = 3,
        num_classes: int | None = None,
        pretrained: str | None = None,
        unet: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        UNet2DModel = import_diffusers("model=diffusers_unet").UNet2DModel
        check_declared(num_classes=num_classes)
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
            copy_pretrained(self.unet, source, pretrained)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # Plain values, enough to rebuild this network (saved into checkpoints); the weights come from there.
        self.config = dict(
            image_size=image_size,
            in_channels=in_channels,
            num_classes=num_classes,
            pretrained=None,
            unet=plain_config(self.unet),
            gradient_checkpointing=gradient_checkpointing,
        )
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes

    def load_pretrained(self, pretrained: str) -> None:
        """Load the weights of `pretrained` (a Hub id or save_pretrained folder) into this network."""
        copy_pretrained(self.unet, load_pretrained_unet(pretrained), pretrained)

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


@register_network(null_keys=("pretrained",))
class DiffusersCondUNet(nn.Module):
    """diffusers' UNet2DConditionModel (Stable Diffusion's network) behind the project's network interface:
    forward(x_t, t, y=None, *, context) -> output, with the text context passed as `encoder_hidden_states`.

    Args:
        image_size: the latent side the network sees (the image side over the VAE's factor).
        in_channels: latent channels; the output has as many.
        pretrained: a pipeline folder (its unet/), a UNet2DConditionModel folder or a Hub id; its config decides
            the architecture (`unet` is then ignored) and its weights are loaded.
        unet: UNet2DConditionModel keyword arguments, when not pretrained.
        context_dim: the text encoder's width, when given (`conditioning=clip` sets it): must equal the U-Net's
            cross_attention_dim.
        gradient_checkpointing: recompute the U-Net's activations in the backward pass (less memory, ~30% slower).
    """

    def __init__(
        self,
        *,
        image_size: int = 64,
        in_channels: int = 4,
        pretrained: str | None = None,
        unet: dict[str, Any] | None = None,
        context_dim: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        UNet2DConditionModel = import_diffusers("model=sd_unet").UNet2DConditionModel
        source = load_pretrained_unet(pretrained, "UNet2DConditionModel") if pretrained else None
        config = dict(source.config) if source is not None else dict(unet or {})
        config = {k: _plain(v) for k, v in config.items() if not k.startswith(_PRIVATE_PREFIX)}
        where = f"model.pretrained={pretrained}" if pretrained else "model.unet"
        if config.get("in_channels", 4) != in_channels:
            raise ConfigError(
                f"{where} takes in_channels={config.get('in_channels', 4)} but the codec gives {in_channels}"
            )
        if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
            raise ConfigError(f"{where}: class-embedding U-Nets are not supported")
        if context_dim is not None and context_dim != config.get("cross_attention_dim", 1280):
            raise ConfigError(
                f"model.context_dim={context_dim} but {where} has cross_attention_dim="
                f"{config.get('cross_attention_dim', 1280)} (leave model.context_dim=null)"
            )
        config.update(sample_size=image_size, in_channels=in_channels)
        self.unet = UNet2DConditionModel.from_config(config)
        if source is not None:
            copy_pretrained(self.unet, source, pretrained)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.config = dict(
            image_size=image_size,
            in_channels=in_channels,
            pretrained=None,
            unet=plain_config(self.unet),
            context_dim=None,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = None
        self.context_dim = int(self.unet.config.cross_attention_dim)
        added = self.unet.config.addition_embed_type
        if added not in (None, "text_time"):
            raise ConfigError(f"{where}: addition_embed_type={added!r} is not supported (null or 'text_time')")
        # SDXL: the added embedding takes the pooled text embedding and 6 time ids, each embedded in
        # addition_time_embed_dim sinusoids (diffusers checks the same sum)
        self.takes_time_ids = added == "text_time"
        config = self.unet.config
        self.pooled_dim = (
            int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)
            if self.takes_time_ids
            else None
        )

    def load_pretrained(self, pretrained: str) -> None:
        """Load the weights of `pretrained` (a pipeline folder, U-Net folder or Hub id) into this network."""
        copy_pretrained(self.unet, load_pretrained_unet(pretrained, "UNet2DConditionModel"), pretrained)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
        time_ids: Tensor | None = None,
    ) -> Tensor:
        """x: (B, C, h, w) noisy latents; t: (B,) timesteps; context: (B, L, D) text embeddings (the empty prompt's
        for unconditional samples). `context_mask` is not used: SD's U-Net attends to every one of the tokenizer's
        max_length positions, padding included, as it was trained. SDXL's U-Net also takes pooled (B, P), the
        pooled text embedding, and time_ids (B, 6)."""
        if y is not None:
            raise ConfigError("class labels were given to a text-conditioned U-Net (it takes context=)")
        if context is None:
            raise ConfigError("model=sd_unet needs a text context: conditioning=clip and captioned data")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        # the U-Net's own dtype, as diffusers' pipelines do: under trainer.precision=bf16-true the weights are bf16
        # while the VAE's latents come in fp32
        dtype = self.unet.dtype
        added = None
        if self.takes_time_ids:
            if pooled is None or time_ids is None:
                raise ConfigError(
                    "SDXL's U-Net needs pooled= and time_ids= from its conditioning (experiment=sdxl_lora / sdxl_full)"
                )
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        elif pooled is not None or time_ids is not None:
            raise ConfigError("pooled= / time_ids= were given to a U-Net without SDXL's added embedding")
        return self.unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added).sample
