"""Train SD3's and Flux's diffusers transformers inside `DiffusionModule`: thin adapters to the project's network
contract, `forward(x, t, *, context, context_mask, pooled) -> output` shaped like x.

`SD3Transformer` wraps `SD3Transformer2DModel` (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis": the MM-DiT), `FluxTransformer` wraps `FluxTransformer2DModel` (Black Forest
Labs' FLUX.1). Both are loaded from a pipeline folder (its transformer/), a transformer folder or a Hub id
(`model.pretrained`), or built from the model's keyword arguments (`transformer`). Both take the latents (B, C, h, w)
of the pipeline's 16-channel VAE, the text context (B, L, D) on `context`, the pooled text embedding (B, P) on
`pooled`, and t_in = 1000 t (`process=pretrained_flow`: the flow time scale of their schedulers); they predict the
velocity noise - x0, which is the Flow process's target. Neither attends with a text mask (their pipelines do not
pass one), so `context_mask` is not used.

- SD3 is given t_in as its `timestep` (StableDiffusion3Pipeline passes the scheduler's timesteps, sigma * 1000).
- Flux works on 2x2 patches of the latents: they are packed into a (B, h/2 * w/2, 4C) sequence with position ids
  (0, row, column) for each patch and (0, 0, 0) for each text token, as FluxPipeline does, and its output is
  unpacked again. Its `timestep` is t_in / 1000 (the transformer multiplies by 1000 itself). A guidance-distilled
  Flux (FLUX.1-dev: `guidance_embeds`) takes an embedded guidance scale, `guidance` (3.5, the value diffusers'
  DreamBooth script trains with and FluxPipeline samples with by default); it is the same at training and sampling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffusion.diffusers_unet import copy_pretrained, plain_config
from diffusion.errors import ConfigError
from diffusion.networks import register_network
from diffusion.optional import import_diffusers
from diffusion.pipeline import load_component


class _PipelineTransformer(nn.Module):
    """What both adapters share: load (or build) the diffusers transformer, declare the latent shape and the text
    widths, keep a plain config that rebuilds it without the pretrained folder."""

    diffusers_class: str
    key: str  # the model config's name, for messages

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        pretrained: str | None,
        transformer: dict[str, Any] | None,
        gradient_checkpointing: bool,
    ) -> None:
        super().__init__()
        cls = getattr(import_diffusers(f"model={self.key}"), self.diffusers_class)
        source = self._load(pretrained) if pretrained else None
        config = dict(source.config) if source is not None else dict(transformer or {})
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        self.transformer = cls.from_config(config)
        if source is not None:
            copy_pretrained(self.transformer, source, pretrained)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.where = f"model.pretrained={pretrained}" if pretrained else "model.transformer"
        self.config = dict(
            image_size=image_size,
            in_channels=in_channels,
            pretrained=None,
            transformer=plain_config(self.transformer),
            gradient_checkpointing=gradient_checkpointing,
        )
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = None
        self.context_dim = int(self.transformer.config.joint_attention_dim)
        self.pooled_dim = int(self.transformer.config.pooled_projection_dim)

    def _load(self, pretrained: str):
        return load_component(self.diffusers_class, pretrained, subfolder="transformer", key="model.pretrained")

    def load_pretrained(self, pretrained: str) -> None:
        """Load the weights of `pretrained` (a pipeline folder, transformer folder or Hub id) into this network."""
        copy_pretrained(self.transformer, self._load(pretrained), pretrained)

    def _check(self, x: Tensor, t: Tensor, y, context, pooled) -> Tensor:
        if y is not None:
            raise ConfigError(f"class labels were given to model={self.key}, a text-conditioned transformer")
        if context is None or pooled is None:
            raise ConfigError(
                f"model={self.key} needs a text context and a pooled text embedding: the pipeline's text encoders "
                f"(experiment={self.key}_lora) and captioned data"
            )
        return t.expand(x.shape[0]) if t.ndim == 0 else t


@register_network(null_keys=("pretrained",))
class SD3Transformer(_PipelineTransformer):
    """diffusers' SD3Transformer2DModel behind the network interface (see the module docstring).

    Args:
        image_size: the latent side the network sees (the image side over the VAE's factor).
        in_channels: latent channels (16); the output has as many.
        pretrained: a pipeline folder (its transformer/), a transformer folder or a Hub id; its config decides the
            architecture (`transformer` is then ignored) and its weights are loaded.
        transformer: SD3Transformer2DModel keyword arguments, when not pretrained.
        gradient_checkpointing: recompute the blocks' activations in the backward pass (less memory, slower).
    """

    diffusers_class = "SD3Transformer2DModel"
    key = "sd3"

    def __init__(
        self,
        *,
        image_size: int = 128,
        in_channels: int = 16,
        pretrained: str | None = None,
        transformer: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size,
            in_channels=in_channels,
            pretrained=pretrained,
            transformer=transformer,
            gradient_checkpointing=gradient_checkpointing,
        )
        config = self.transformer.config
        if config.in_channels != in_channels or config.out_channels != in_channels:
            raise ConfigError(
                f"{self.where} takes in_channels={config.in_channels} (out_channels={config.out_channels}) but the "
                f"codec gives {in_channels}"
            )
        if image_size % config.patch_size or image_size > config.pos_embed_max_size * config.patch_size:
            raise ConfigError(
                f"the latent side {image_size} must be a multiple of the patch size {config.patch_size} and at most "
                f"{config.pos_embed_max_size * config.patch_size} (pos_embed_max_size); change data.image_size"
            )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """x: (B, 16, h, w) noisy latents; t: (B,) 1000 t; context: (B, L, D); pooled: (B, P) -> velocity."""
        t = self._check(x, t, y, context, pooled)
        dtype = x.dtype
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=context.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=t,
            return_dict=False,
        )[0]


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch as one token, channels-major within it (FluxPipeline's)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """`pack_latents`' inverse: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, *, device=None, dtype=torch.float32) -> Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, column), row-major like `pack_latents`."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


@register_network(null_keys=("pretrained",))
class FluxTransformer(_PipelineTransformer):
    """diffusers' FluxTransformer2DModel behind the network interface (see the module docstring).

    Args:
        image_size: the latent side the network sees (even: the transformer works on 2x2 patches).
        in_channels: latent channels (16); the transformer's in_channels is 4x that (packed patches).
        pretrained: a pipeline folder (its transformer/), a transformer folder or a Hub id.
        transformer: FluxTransformer2DModel keyword arguments, when not pretrained.
        guidance: the embedded guidance scale a guidance-distilled transformer (`guidance_embeds`) is given at
            training and sampling (FLUX.1-dev: 3.5); ignored by one without.
        gradient_checkpointing: recompute the blocks' activations in the backward pass (less memory, slower).
    """

    diffusers_class = "FluxTransformer2DModel"
    key = "flux"

    def __init__(
        self,
        *,
        image_size: int = 128,
        in_channels: int = 16,
        pretrained: str | None = None,
        transformer: dict[str, Any] | None = None,
        guidance: float = 3.5,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size,
            in_channels=in_channels,
            pretrained=pretrained,
            transformer=transformer,
            gradient_checkpointing=gradient_checkpointing,
        )
        config = self.transformer.config
        out = config.out_channels or config.in_channels
        if config.patch_size != 1 or config.in_channels != 4 * in_channels or out != 4 * in_channels:
            raise ConfigError(
                f"{self.where} takes in_channels={config.in_channels} (out_channels={out}, patch_size="
                f"{config.patch_size}); packed 2x2 patches of the codec's {in_channels} channels need "
                f"{4 * in_channels} and patch_size 1"
            )
        if image_size % 2:
            raise ConfigError(f"the latent side {image_size} must be even (Flux's 2x2 patches); change data.image_size")
        self.guidance = float(guidance)
        self.config["guidance"] = self.guidance

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """x: (B, 16, h, w) noisy latents; t: (B,) 1000 t; context: (B, L, D); pooled: (B, P) -> velocity."""
        t = self._check(x, t, y, context, pooled)
        b, _, h, w = x.shape
        dtype = x.dtype
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=dtype)
        out = self.transformer(
            hidden_states=pack_latents(x),
            encoder_hidden_states=context.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=(t / 1000).to(dtype),  # the transformer scales it by 1000 again
            img_ids=image_ids(h, w, device=x.device, dtype=dtype),
            txt_ids=torch.zeros(context.shape[1], 3, device=x.device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)
