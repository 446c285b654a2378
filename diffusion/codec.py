"""The codec seam: what the diffusion model sees in place of pixels (DESIGN.md, "The codec").

A codec turns images in [-1, 1] into the tensors the network is trained on and back. `IdentityCodec` (`codec=
identity`) trains on pixels. `VAECodec` (`codec=vae codec.path=...`) is a frozen `diffusers.AutoencoderKL`, as in
latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"): the encoder
gives a diagonal Gaussian q(z | x) per image (its moments: mean and log-variance), a training latent is a sample
z = mean + std * noise (or the mean), scaled as z' = (z - shift_factor) * scaling_factor so it has about unit
variance (both factors read from the VAE's config), and the decoder maps z' / scaling_factor + shift_factor back
to pixels. The noise comes from torch's generator, so inside the module's training stream a run stays
reproducible.

The codec's weights are never saved in our checkpoints: its `config` names where it came from (a folder or a Hub
id), which is how `sample.py` rebuilds it. A cached latent (`data.cache=true`, see `diffusion.data.folder`) is
the moments tensor (B, 2C, h, w); `encode` takes pixels or cached moments, so training makes one call either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffusion.errors import BadFileError, ConfigError, MissingPathError
from diffusion.state import keep_in_state_dict

log = logging.getLogger(__name__)
CodecDtype = Literal["fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Codec(nn.Module):
    """Images (B, C, H, W) in [-1, 1] <-> what the network models. Subclasses set `config` (plain values).

    The codec's own tensors stay out of every state dict that holds it (a checkpoint names the codec; it does
    not copy it), and loading a state dict keeps the codec as it is.
    """

    config: dict[str, Any]
    bounded = True  # its space is [-1, 1] (pixels): samplers may clip x0 there; latents are not clipped

    def __init__(self) -> None:
        super().__init__()
        keep_in_state_dict(self, frozenset())

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int]:
        """(channels, side) of what the network sees for `channels`-channel images of side `image_size`."""
        return channels, image_size

    def image_shape(self, channels: int, side: int) -> tuple[int, int]:
        """(channels, side) of the images whose latents are `channels` x `side` x `side` (`latent_shape`'s inverse)."""
        return channels, side

    def encode(self, x: Tensor, *, sample: bool | None = None) -> Tensor:
        """Pixels (or, for latent codecs, cached moments) -> the network's space; `sample`: draw or take the mean."""
        return x

    def decode(self, z: Tensor) -> Tensor:
        """The network's space -> pixels in [-1, 1]."""
        return z

    def fingerprint(self) -> str:
        """A short hash that differs between codecs giving different latents (for latent cache keys)."""
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:12]


class IdentityCodec(Codec):
    """Pixels are the latents (`codec=identity`, the default)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"kind": "identity"}


def load_vae(path: str, *, dtype: torch.dtype = torch.float32, key: str = "codec.path"):
    """AutoencoderKL from a folder (a VAE folder or a pipeline folder with vae/) or a Hub id, in `dtype`."""
    from diffusion.pipeline import load_component

    return load_component("AutoencoderKL", path, subfolder="vae", key=key, torch_dtype=dtype)


class VAECodec(Codec):
    """A frozen `diffusers.AutoencoderKL` (`codec=vae`).

    Args:
        path: a folder written by `save_pretrained` (an AutoencoderKL, or a pipeline folder with `vae/`) or a
            Hugging Face Hub id (e.g. `stabilityai/sd-vae-ft-mse`, downloaded when online).
        sample: training latents are samples of q(z | x) (true) or its mean (false). Validation uses the mean.
        dtype: the frozen VAE's weights and compute: fp32, bf16 or fp16 (the latents are returned in fp32). A VAE
            whose config sets `force_upcast` (SDXL's, which overflows in fp16) runs in fp32 when dtype=fp16, as
            diffusers' pipelines upcast it.
        encode_batch_size: images per encoder call when building a latent cache.
    """

    def __init__(
        self, *, path: str, sample: bool = True, dtype: CodecDtype = "fp32", encode_batch_size: int = 16
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ConfigError(f"codec.dtype={dtype!r} is not one of {', '.join(map(repr, DTYPES))}")
        if path in (None, "", "???"):
            raise ConfigError("codec=vae needs codec.path=<an AutoencoderKL folder, a pipeline folder or a Hub id>")
        self.vae = load_vae(str(path), dtype=DTYPES[dtype])
        if dtype == "fp16" and self.vae.config.get("force_upcast", False):
            log.info(f"codec: the VAE of {path} overflows in fp16 (its force_upcast): it encodes and decodes in fp32")
            self.vae = self.vae.float()
        self.vae.requires_grad_(False).eval()
        vae_config = self.vae.config
        self.scaling_factor = float(vae_config.scaling_factor)
        self.shift_factor = float(vae_config.get("shift_factor") or 0.0)
        self.latent_channels = int(vae_config.latent_channels)
        self.factor = 2 ** (len(vae_config.block_out_channels) - 1)  # one 2x downsampling per level but the last
        self.sample = sample
        self.encode_batch_size = encode_batch_size
        self.config = {"kind": "vae", "path": str(path), "sample": sample, "dtype": dtype}

    bounded = False

    def train(self, mode: bool = True) -> VAECodec:
        super().train(mode)
        self.vae.eval()  # frozen: dropout and the like stay off while the module around it trains
        return self

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int]:
        if image_size % self.factor:
            raise ConfigError(f"data.image_size={image_size} must be divisible by the VAE's factor {self.factor}")
        if channels != self.vae.config.in_channels:
            raise ConfigError(
                f"codec.path={self.config['path']} takes {self.vae.config.in_channels}-channel images "
                f"but data.channels={channels}"
            )
        return self.latent_channels, image_size // self.factor

    def image_shape(self, channels: int, side: int) -> tuple[int, int]:
        return int(self.vae.config.in_channels), side * self.factor

    def is_moments(self, x: Tensor) -> bool:
        """Whether `x` holds cached moments (B, 2 * latent_channels, h, w) rather than pixels."""
        return x.shape[1] == 2 * self.latent_channels and x.shape[1] != self.vae.config.in_channels

    @torch.no_grad()
    def moments(self, x: Tensor) -> Tensor:
        """Pixels (B, C, H, W) in [-1, 1] -> q(z | x)'s (mean, log-variance) on channels: (B, 2c, h, w), fp32."""
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.parameters.float()

    @torch.no_grad()
    def encode(self, x: Tensor, *, sample: bool | None = None) -> Tensor:
        moments = x.float() if self.is_moments(x) else self.moments(x)
        mean, logvar = moments.chunk(2, dim=1)  # (B, c, h, w) each
        z = mean
        if self.sample if sample is None else sample:
            # as diffusers' DiagonalGaussianDistribution.sample (not randn_like: `mean` is a strided view)
            noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        x = self.vae.decode((z / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample
        return x.float().clamp(-1, 1)

    def fingerprint(self) -> str:
        """The VAE's config, factors and a checksum of every weight: another VAE (or its fine-tune) differs."""
        h = hashlib.sha256(
            json.dumps(
                {k: v for k, v in self.vae.config.items() if not k.startswith("_")}, sort_keys=True, default=str
            ).encode()
        )
        h.update(f"{self.scaling_factor} {self.shift_factor} {self.config['dtype']}".encode())
        for name, p in self.vae.state_dict().items():
            q = p.detach().double()
            h.update(f"{name} {list(p.shape)} {q.sum().item():.10e} {q.abs().sum().item():.10e}".encode())
        return h.hexdigest()[:12]


def sampler_for(sampler: Callable[..., Tensor], codec: Codec | None) -> Callable[..., Tensor]:
    """`sampler` as it must run in `codec`'s space: x0 clipping to [-1, 1] is for pixels, never for latents."""
    return sampler if codec is None or codec.bounded else partial(sampler, clip_x0=False)


CODECS = {"identity": IdentityCodec, "vae": VAECodec}


def build_codec(config: dict | None, *, source: str = "checkpoint") -> Codec:
    """The codec a checkpoint's description names (none: pixels); a missing VAE folder is a one-line error."""
    if not config:
        return IdentityCodec()
    if not isinstance(config, dict) or config.get("kind") not in CODECS:
        raise BadFileError(f"{source} names codec {config!r}, not one of {', '.join(CODECS)}; refused")
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    path = kwargs.get("path")
    if isinstance(path, str) and path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        raise MissingPathError(f"{source} decodes through the VAE at {path}, which does not exist")
    try:
        return CODECS[config["kind"]](**kwargs)
    except TypeError as e:
        raise BadFileError(f"{source}: codec {config['kind']} cannot be built from {kwargs} ({e})") from e
