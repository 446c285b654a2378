"""The denoising U-Net: DDPM's network (Ho et al. 2020, appendix B) with ADM's options (Dhariwal & Nichol 2021).

A stack of residual blocks at decreasing resolutions, self-attention at chosen resolutions, and the mirror
stack back up with skip connections. The timestep enters every residual block through a sinusoidal embedding
and an MLP; an optional class label is embedded and added to it (the extra "null" class is the unconditional
input that classifier-free guidance needs). With `context_dim` set, cross-attention to a context sequence (a
caption's token embeddings, with its padding mask) follows each self-attention, as in latent diffusion (Rombach
et al. 2022, sec. 3.3). With the DDPM CIFAR-10 settings (`unet_base`: 128 channels,
mult 1,2,2,2, 2 blocks, attention at 16x16) it has the paper's 35.7M parameters. Plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion.errors import ConfigError
from diffusion.networks import check_declared, register_network


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, *, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer: (B,) -> (B, dim), cosines
    first. Frequency i is max_period^(-i / (half - freq_shift)); freq_shift=1 spans 1 .. 1/max_period exactly
    (diffusers' `downscale_freq_shift`, which its DiT uses)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift)
    )
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that a residual branch starts as the identity (ADM's zero_module)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the embedding, GroupNorm -> SiLU -> dropout -> conv, plus a skip."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, *, dropout: float, groups: int, scale_shift: bool
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(F.silu(emb))[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.scale_shift:  # ADM: norm(h) * (1 + scale) + shift
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:  # DDPM: add the embedding, then normalize
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, *, head_dim: int, groups: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        if channels % self.heads:
            raise ConfigError(f"{channels} channels do not split into {self.heads} attention heads")
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def heads_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of shape (B, heads, HW, C/heads), each with a contiguous last dimension.

        The flash and memory-efficient kernels of `scaled_dot_product_attention` need stride 1 along the head
        dimension; views straight off the (B, 3C, H, W) convolution output have stride H*W there and fall back to
        the math kernel. Going through (B, HW, 3C) costs one copy for NCHW inputs and none for channels-last ones.
        Channel s*C + h*d + j of the qkv convolution is entry j of head h of q, k or v (s = 0, 1, 2).
        """
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()  # (B, HW, 3C)
        qkv = qkv.reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, HW, d)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        out = F.scaled_dot_product_attention(*self.heads_qkv(x))  # (B, heads, HW, C/heads)
        out = out.transpose(1, 2).reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)  # NHWC-strided view
        return x + self.proj(out)


class CrossAttentionBlock(nn.Module):
    """Multi-head cross-attention from the H*W positions of a feature map (queries) to a context sequence (keys
    and values), with a residual connection; context positions where the mask is False are not attended to."""

    def __init__(self, channels: int, context_dim: int, *, head_dim: int, groups: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        if channels % self.heads:
            raise ConfigError(f"{channels} channels do not split into {self.heads} attention heads")
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        q = self.q(self.norm(x)).flatten(2).transpose(1, 2).reshape(b, h * w, self.heads, d).transpose(1, 2)
        kv = self.kv(context.to(x.dtype)).reshape(b, context.shape[1], 2, self.heads, d).permute(2, 0, 3, 1, 4)
        # q: (B, heads, HW, d); k, v: (B, heads, L, d); the mask broadcasts over heads and queries: (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask[:, None, None, :])
        out = out.transpose(1, 2).reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@register_network
class UNet(nn.Module):
    """Predicts the noise (or v, or x0) for a noisy image x_t at timestep t, optionally given a class label.

    Args:
        in_channels: image channels (1 for grayscale, 3 for RGB); `out_channels` defaults to the same.
        image_size: the training resolution; used only to place attention at `attention_resolutions`.
        base_channels: channels at full resolution; level i has base_channels * channel_mult[i].
        channel_mult: one multiplier per resolution level; each level after the first halves H and W.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sizes (e.g. 16 for 16x16) that get self-attention.
        attention_head_dim: channels per attention head.
        dropout: dropout inside residual blocks (DDPM CIFAR-10: 0.1).
        num_classes: if set, the network takes class labels in [0, num_classes); label `num_classes` (or
            `y=None`) is the unconditional "null" class used for classifier-free guidance.
        context_dim: if set, the network takes a context sequence (B, L, context_dim) and its mask (B, L), e.g. a
            caption's embedding, through cross-attention after each self-attention (attention resolutions and
            the middle block).
        norm_groups: GroupNorm groups; must divide every level's channel count.
        scale_shift_norm: ADM's FiLM-style timestep conditioning instead of DDPM's additive one.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int = 32,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        attention_head_dim: int = 64,
        dropout: float = 0.1,
        num_classes: int | None = None,
        context_dim: int | None = None,
        norm_groups: int = 32,
        scale_shift_norm: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        out_channels = out_channels or in_channels
        sizes = dict(in_channels=in_channels, out_channels=out_channels, image_size=image_size)
        sizes.update(base_channels=base_channels, norm_groups=norm_groups, channel_mult=min(channel_mult, default=0))
        for key, value in sizes.items():
            if value < 1:
                raise ConfigError(f"model.{key}={value} must be >= 1")
        if num_res_blocks < 0:
            raise ConfigError(f"model.num_res_blocks={num_res_blocks} must be >= 0")
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ConfigError(
                f"model.image_size={image_size} must be divisible by 2^{len(channel_mult) - 1} "
                f"for {len(channel_mult)} levels (model.channel_mult={list(channel_mult)})"
            )
        for ch in {base_channels * m for m in channel_mult}:
            if ch % norm_groups:
                raise ConfigError(f"model.norm_groups={norm_groups} does not divide {ch} channels")
        check_declared(num_classes=num_classes, context_dim=context_dim, dropout=dropout)
        # Plain values, enough to rebuild this network (saved into checkpoints).
        self.config = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            image_size=image_size,
            base_channels=base_channels,
            channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions),
            attention_head_dim=attention_head_dim,
            dropout=dropout,
            num_classes=num_classes,
            context_dim=context_dim,
            norm_groups=norm_groups,
            scale_shift_norm=scale_shift_norm,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        block = dict(emb_dim=emb_dim, dropout=dropout, groups=norm_groups, scale_shift=scale_shift_norm)
        attn = dict(head_dim=attention_head_dim, groups=norm_groups)

        def attention(ch: int) -> list[nn.Module]:
            """Self-attention, then cross-attention to the context when the net has one (new keys only then)."""
            cross = [CrossAttentionBlock(ch, context_dim, **attn)] if context_dim else []
            return [AttentionBlock(ch, **attn), *cross]

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, base_channels * mult, **block)]
                ch = base_channels * mult
                if res in attention_resolutions:
                    layers.extend(attention(ch))
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, **block), *attention(ch), ResBlock(ch, ch, **block)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), base_channels * mult, **block)]
                ch = base_channels * mult
                if res in attention_resolutions:
                    layers.extend(attention(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.up.append(nn.ModuleList(layers))
        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    def _run(
        self, layers: nn.ModuleList, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttentionBlock):
                h = layer(h, context, mask)
            else:
                h = layer(h)
        return h

    def _block(
        self, layers: nn.ModuleList, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._run, layers, h, emb, context, mask, use_reentrant=False)
        return self._run(layers, h, emb, context, mask)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, C, H, W) noisy images; t: (B,) timesteps; y: (B,) class labels or None; context: (B, L, D)
        sequence for cross-attention (nets with `context_dim`), context_mask: (B, L) bool, True where attended."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        dtype = self.conv_in.weight.dtype  # bf16 / fp16 under trainer.precision=*-true: inputs follow the weights
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(dtype))  # (B, 4 * base)
        if self.label_emb is not None:
            if y is None:  # unconditional: the null class
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ConfigError("class labels were given to an unconditional model (model.num_classes is null)")
        if self.context_dim:
            if context is None:
                raise ConfigError("this network has cross-attention (model.context_dim) and needs a context")
            if context_mask is None:
                context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        elif context is not None:
            raise ConfigError("a context was given to a network without cross-attention (model.context_dim is null)")
        c = (context, context_mask)
        h = self.conv_in(x.to(dtype))
        skips = [h]
        for layers in self.down:
            h = self._block(layers, h, emb, *c)
            skips.append(h)
        h = self._block(self.mid, h, emb, *c)
        for layers in self.up:
            h = self._block(layers, torch.cat([h, skips.pop()], dim=1), emb, *c)
        return self.conv_out(F.silu(self.norm_out(h)))
