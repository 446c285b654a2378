"""The Diffusion Transformer: DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), with the
cross-attention of PixArt-alpha (Chen et al. 2023) for text.

The image (or latent) is cut into p x p patches, each a token (patchify: a stride-p convolution), plus fixed 2-D
sin-cos position embeddings computed from the current grid, so nothing in the weights depends on the image size
and a checkpoint fine-tunes at another size as it is. A stack of transformer blocks follows; each is conditioned
on c = embed(noise level) + embed(class label) through adaLN-Zero (paper sec. 3.2): c regresses a shift, scale
and gate per sub-layer, the gates start at zero, so every block starts as the identity. With `context_dim` set, a
cross-attention to the caption's tokens (with their padding mask) sits between self-attention and the MLP, as in
PixArt-alpha. A final adaLN layer and a zero-initialised linear map the tokens back to patches (unpatchify), so
the network's output is exactly zero at initialisation.

Speed by construction: one fused QKV projection, attention through `F.scaled_dot_product_attention` on (B, heads,
N, head_dim) views whose last dimension is contiguous (what the flash / memory-efficient kernels require, without a
copy), optional activation checkpointing per block, and a forward without graph breaks under `torch.compile`.
bf16: the residual stream, the LayerNorms and the adaLN modulation stay fp32 (the conditioning path runs outside
autocast); only the matrix products run in the low precision.

Its weights map one to one onto diffusers' `DiTTransformer2DModel` (`diffusers_state_dict`), which `export.py
format=diffusers` writes. Plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion.errors import ConfigError
from diffusion.networks import check_declared, register_network
from diffusion.unet import timestep_embedding

FREQ_DIM = 256  # the sinusoidal noise-level features that the time MLP embeds (DiT's frequency_embedding_size)
NORM_EPS = 1e-6


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, *, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE / DiT): (grid_h * grid_w, dim), tokens in row-major order.

    The first half of the channels encodes the column, the second half the row, each as [sin, cos] of the
    position at frequencies 10000^(-k / (dim / 4)).
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, device=device, dtype=torch.float64),
        torch.arange(grid_w, device=device, dtype=torch.float64),
        indexing="ij",
    )  # (h, w) each

    def embed(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # (N, dim/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (N, dim/2)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()  # (N, dim)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters (adaLN supplies them), in fp32 whatever the activations' dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=NORM_EPS)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift, scale and shift (B, D) per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens with one fused QKV projection."""

    def __init__(self, dim: int, heads: int, *, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        # (B, N, 3D) -> (3, B, heads, N, d/heads): views whose last dimension has stride 1 (flash-eligible, no copy)
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, d/heads)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class CrossAttention(nn.Module):
    """Multi-head attention from the tokens (queries) to a context sequence (keys and values); context positions
    where the mask is False are not attended to."""

    def __init__(self, dim: int, context_dim: int, heads: int, *, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, heads, N, d/heads)
        kv = self.kv(context.to(x.dtype)).reshape(b, context.shape[1], 2, self.heads, d // self.heads)
        kv = kv.permute(2, 0, 3, 1, 4)  # (2, B, heads, L, d/heads)
        # the mask broadcasts over heads and queries: (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask[:, None, None, :])
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class MLP(nn.Module):
    """Linear -> GELU (tanh approximation, as DiT) -> dropout -> Linear."""

    def __init__(self, dim: int, hidden: int, *, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x), approximate="tanh")))


class DiTBlock(nn.Module):
    """adaLN-Zero block (paper fig. 3): self-attention and MLP, each behind a modulated LayerNorm and a gate; with
    a context, an ungated cross-attention between them (PixArt-alpha)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, *, context_dim: int | None, dropout: float) -> None:
        super().__init__()
        self.adaLN = nn.Linear(dim, 6 * dim)  # c -> shift, scale, gate of attention; shift, scale, gate of the MLP
        self.attn = SelfAttention(dim, heads, dropout=dropout)
        self.cross = CrossAttention(dim, context_dim, heads, dropout=dropout) if context_dim else None
        self.mlp = MLP(dim, mlp_hidden, dropout=dropout)

    def forward(self, h: Tensor, mod: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        """h: (B, N, D) fp32 residual stream; mod: (B, 6D) fp32, this block's adaLN output."""
        dtype = self.attn.qkv.weight.dtype  # bf16 under trainer.precision=bf16-true; autocast casts fp32 anyway
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = h + gate_msa[:, None] * self.attn(modulate(layer_norm(h), shift_msa, scale_msa).to(dtype))
        if self.cross is not None:
            h = h + self.cross(layer_norm(h).to(dtype), context, mask)
        return h + gate_mlp[:, None] * self.mlp(modulate(layer_norm(h), shift_mlp, scale_mlp).to(dtype))


@register_network
class DiT(nn.Module):
    """Predicts the process's target (eps, v, x0, EDM's F, a velocity) for x at noise level t, optionally given a
    class label and / or a context sequence (see the module docstring).

    Args:
        in_channels: channels of x (the codec's latent channels with codec=vae); the output has the same.
        image_size: the side of the square x the network is trained at (declared for sampling; the position
            embeddings follow whatever size comes in).
        patch_size: p; image_size must be a multiple of it. DiT-*/2: p = 2.
        hidden_size, depth, num_heads: the transformer's width D, number of blocks and attention heads
            (DiT-S: 384 / 12 / 6, DiT-B: 768 / 12 / 12, DiT-L: 1024 / 24 / 16, DiT-XL: 1152 / 28 / 16).
        mlp_ratio: the MLP's hidden width is mlp_ratio * D.
        num_classes: if set, labels in [0, num_classes); label `num_classes` (or `y=None`) is the null class that
            classifier-free guidance uses.
        context_dim: if set, cross-attention to a context (B, L, context_dim) with its mask (B, L) in every block.
        dropout: dropout on the attention and MLP outputs (DiT: 0).
        gradient_checkpointing: recompute each block's activations in the backward pass (less memory, ~30% slower).
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        image_size: int = 32,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        context_dim: int | None = None,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        for key, value in dict(
            in_channels=in_channels, image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads,
        ).items():  # fmt: skip
            if value < 1:
                raise ConfigError(f"model.{key}={value} must be >= 1")
        if image_size % patch_size:
            raise ConfigError(f"model.image_size={image_size} must be a multiple of model.patch_size={patch_size}")
        if hidden_size % num_heads:
            raise ConfigError(f"model.hidden_size={hidden_size} does not split into model.num_heads={num_heads}")
        if hidden_size % 4:
            raise ConfigError(f"model.hidden_size={hidden_size} must be a multiple of 4 (2-D sin-cos positions)")
        if mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio={mlp_ratio} must be > 0")
        check_declared(num_classes=num_classes, context_dim=context_dim, dropout=dropout)
        # Plain values, enough to rebuild this network (saved into checkpoints).
        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=float(mlp_ratio),
            num_classes=num_classes,
            context_dim=context_dim,
            dropout=dropout,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.gradient_checkpointing = gradient_checkpointing

        d = hidden_size
        self.patch_embed = nn.Conv2d(in_channels, d, kernel_size=patch_size, stride=patch_size)  # patchify + linear
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embed = nn.Embedding(num_classes + 1, d) if num_classes else None  # row num_classes: the null class
        mlp_hidden = int(d * mlp_ratio)
        self.blocks = nn.ModuleList(
            DiTBlock(d, num_heads, mlp_hidden, context_dim=context_dim, dropout=dropout) for _ in range(depth)
        )
        self.final_adaLN = nn.Linear(d, 2 * d)  # c -> shift, scale of the last LayerNorm
        self.final = nn.Linear(d, patch_size * patch_size * in_channels)  # token -> its patch, (p, p, C) order
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, N(0, 0.02) embeddings, zero adaLN and output layers (every
        block starts as the identity and the output as 0); the cross-attention's output too (PixArt-alpha)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear map of the flattened patch
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        zeroed = [self.final_adaLN, self.final]
        for block in self.blocks:
            zeroed += [block.adaLN] + ([block.cross.proj] if block.cross is not None else [])
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def conditioning_vector(self, t: Tensor, y: Tensor | None) -> Tensor:
        """c = MLP(sinusoidal(t)) + embed(y): (B, D), in the weights' dtype."""
        freqs = timestep_embedding(t, FREQ_DIM, freq_shift=1.0)  # the frequencies diffusers' DiT uses
        c = self.t_embed(freqs.to(self.t_embed[0].weight.dtype))
        return c + self.y_embed(y) if self.y_embed is not None else c

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, C, H, W) with H, W multiples of patch_size; t: (B,) the process's time input; y: (B,) labels or
        None; context: (B, L, context_dim) and context_mask: (B, L) bool, True where attended."""
        b, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ConfigError(f"a {height}x{width} input is not a whole number of {p}x{p} patches (model.patch_size)")
        if t.ndim == 0:
            t = t.expand(b)
        if self.y_embed is not None:
            if y is None:  # unconditional: the null class
                y = torch.full((b,), self.num_classes, device=x.device, dtype=torch.long)
        elif y is not None:
            raise ConfigError("class labels were given to an unconditional model (model.num_classes is null)")
        if self.context_dim:
            if context is None:
                raise ConfigError("this network has cross-attention (model.context_dim) and needs a context")
            if context_mask is None:
                context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        elif context is not None:
            raise ConfigError("a context was given to a network without cross-attention (model.context_dim is null)")

        # The conditioning path (B x D values, negligible work) in the weights' precision, outside autocast: the
        # adaLN shifts, scales and gates touch every token of every block, so bf16 rounding there would too.
        with torch.autocast(x.device.type, enabled=False):
            c = F.silu(self.conditioning_vector(t, y))
            mods = [block.adaLN(c).float() for block in self.blocks]  # each (B, 6D)
            shift, scale = self.final_adaLN(c).float().chunk(2, dim=1)

        dtype = self.patch_embed.weight.dtype
        h, w = height // p, width // p
        tokens = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2)  # (B, N = h * w, D)
        stream = tokens.float() + sincos_pos_embed_2d(self.hidden_size, h, w, device=x.device)  # fp32 residuals
        for block, mod in zip(self.blocks, mods, strict=True):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                stream = checkpoint(block, stream, mod, context, context_mask, use_reentrant=False)
            else:
                stream = block(stream, mod, context, context_mask)
        out = self.final(modulate(layer_norm(stream), shift, scale).to(dtype))  # (B, N, p * p * C)
        # unpatchify: (B, h, w, p, p, C) -> (B, C, h, p, w, p) -> (B, C, H, W)
        out = out.reshape(b, h, w, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.in_channels, height, width)

    def forward_flops(self, *, image_size: int | None = None, context_len: int = 0) -> int:
        """Multiply-add FLOPs (2 per MAC) of one forward pass of one sample, counted from the architecture: every
        matrix product (patch embedding, QKV, attention scores and values, projections, MLP, cross-attention,
        output); norms, activations, embeddings and the per-sample conditioning path are left out (< 1%).
        A training step costs about 3x this (forward + backward)."""
        side = image_size or self.image_size
        n = (side // self.patch_size) ** 2
        d = self.hidden_size
        p2c = self.patch_size**2 * self.in_channels
        mlp = self.blocks[0].mlp.fc1.out_features
        per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp
        if self.context_dim:
            per_block += 2 * n * d * d + 2 * context_len * self.context_dim * 2 * d + 2 * 2 * n * context_len * d
            per_block += 2 * n * d * d
        return 2 * n * p2c * d + len(self.blocks) * per_block + 2 * n * d * p2c


# --- diffusers' DiTTransformer2DModel ---------------------------------------------------------------------------
def diffusers_config(net: DiT) -> dict:
    """The `DiTTransformer2DModel` config with this network's architecture (a ConfigError where none exists).

    diffusers' DiT always has a label table; an unconditional DiT becomes a one-class one whose embeddings are
    zero (pass class_labels=0). Its MLP is 4x wide and its output has in_channels (no learned sigma, which
    `DiTPipeline` then does not split off)."""
    if net.context_dim:
        raise ConfigError(
            "format=diffusers: a DiT with cross-attention (conditioning=text) has no diffusers class with its "
            "architecture (PixArtTransformer2DModel uses adaLN-single); use format=safetensors"
        )
    if net.config["mlp_ratio"] != 4.0:
        ratio = net.config["mlp_ratio"]
        raise ConfigError(f"format=diffusers: DiTTransformer2DModel's MLP is 4x wide, not model.mlp_ratio={ratio}")
    heads = net.config["num_heads"]
    return dict(
        num_attention_heads=heads,
        attention_head_dim=net.hidden_size // heads,
        in_channels=net.in_channels,
        out_channels=net.in_channels,
        num_layers=len(net.blocks),
        dropout=0.0,
        attention_bias=True,
        sample_size=net.image_size,
        patch_size=net.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=net.num_classes or 1,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=NORM_EPS,
    )


def diffusers_state_dict(net: DiT) -> dict[str, Tensor]:
    """This network's weights under `DiTTransformer2DModel`'s keys (see `diffusers_config`).

    diffusers gives every block its own copy of the noise-level and label embeddings (`norm1.emb`, as DiT's
    released weights were converted) and the output layer reads block 0's; ours are shared, so they are copied."""
    s = {k: v.detach() for k, v in net.state_dict().items()}
    d = net.hidden_size
    labels = s["y_embed.weight"] if net.y_embed is not None else torch.zeros(2, d, dtype=s["t_embed.0.weight"].dtype)
    emb = {
        "timestep_embedder.linear_1.weight": s["t_embed.0.weight"],
        "timestep_embedder.linear_1.bias": s["t_embed.0.bias"],
        "timestep_embedder.linear_2.weight": s["t_embed.2.weight"],
        "timestep_embedder.linear_2.bias": s["t_embed.2.bias"],
        "class_embedder.embedding_table.weight": labels,
    }
    out = {"pos_embed.proj.weight": s["patch_embed.weight"], "pos_embed.proj.bias": s["patch_embed.bias"]}
    for i in range(len(net.blocks)):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        out.update({f"{theirs}norm1.emb.{k}": v for k, v in emb.items()})
        out[f"{theirs}norm1.linear.weight"] = s[ours + "adaLN.weight"]
        out[f"{theirs}norm1.linear.bias"] = s[ours + "adaLN.bias"]
        for part in ("weight", "bias"):
            q, k, v = s[f"{ours}attn.qkv.{part}"].chunk(3, dim=0)  # fused rows: q, then k, then v
            out.update({f"{theirs}attn1.to_{n}.{part}": w for n, w in zip("qkv", (q, k, v), strict=True)})
            out[f"{theirs}attn1.to_out.0.{part}"] = s[f"{ours}attn.proj.{part}"]
            out[f"{theirs}ff.net.0.proj.{part}"] = s[f"{ours}mlp.fc1.{part}"]
            out[f"{theirs}ff.net.2.{part}"] = s[f"{ours}mlp.fc2.{part}"]
    out.update({
        "proj_out_1.weight": s["final_adaLN.weight"], "proj_out_1.bias": s["final_adaLN.bias"],
        "proj_out_2.weight": s["final.weight"], "proj_out_2.bias": s["final.bias"],
    })  # fmt: skip
    return {k: v.contiguous().clone() for k, v in out.items()}


def to_diffusers(net: DiT):
    """A `DiTTransformer2DModel` holding this network's weights (needs diffusers)."""
    from diffusion.optional import import_diffusers

    model = import_diffusers().DiTTransformer2DModel(**diffusers_config(net))
    model.load_state_dict(diffusers_state_dict(net), strict=True)
    return model.eval()
