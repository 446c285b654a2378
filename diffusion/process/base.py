"""The process interface: what training and the samplers need to know about a diffusion family.

Every family writes a noisy image as x_t = alpha x0 + sigma eps at a noise *level* (an integer timestep for the
discrete schedules, sigma for EDM, t in [0, 1] for flow matching), and says
- how a training level is drawn (`draw_levels`, from the caller's random stream) and where the validation levels
  sit (`val_levels`: stratified quantiles of the training distribution, one `bucket_names` entry per bucket);
- how x_t is made (`q_sample`), what the network is given (`net_input`: EDM c_in x and c_noise, discrete x_t and
  the integer t, flow x_t and 1000 t) and asked for (`target`, weighted by `loss_weight`);
- how the network output becomes the denoised image x0 (`to_x0`) and back (`output_from_x0`);
- for the samplers: alpha and sigma of a level (`alpha_sigma`), the grid of levels a sampler walks
  (`sampling_levels`), the scale of the starting noise (`initial_scale`) and the frame in which the
  probability-flow ODE reads dx/dsigma = (x - D) / sigma (`ode_frame`, EDM eq. 3 with s = 1).
No Lightning, no Hydra; subclasses are `nn.Module`s so that they follow their owner's `.to(device)`.
"""

from __future__ import annotations

from typing import ClassVar, get_args

import torch
from torch import Tensor, nn

from diffusion.errors import ConfigError


def check_choice(name: str, value, literal) -> None:
    """A ConfigError naming `name` unless `value` is one of the Literal's choices."""
    choices = get_args(literal)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def check_spacing(spacing: str | None, literal, family: str) -> None:
    """A ConfigError unless `spacing` is None (the family's grid) or one of the family's spacings."""
    if spacing is not None and spacing not in get_args(literal):
        choices = " | ".join(get_args(literal))
        raise ConfigError(
            f"sampler.spacing={spacing!r} does not apply to process={family}: use sampler.spacing=null (or {choices})"
        )


def broadcast(v: Tensor, ndim: int) -> Tensor:
    """A (B,) tensor reshaped to broadcast against a (B, ...) tensor with `ndim` dims: (B, 1, 1, 1)."""
    return v.reshape(-1, *([1] * (ndim - 1)))


class Process(nn.Module):
    """Base class of the diffusion families (see the module docstring); `config` rebuilds the instance."""

    family: ClassVar[str]
    bucket_prefix: ClassVar[str] = "level"  # validation buckets are named <prefix><lo>-<hi>
    config: dict

    def __init__(self) -> None:
        super().__init__()
        # Follows the owner's .to(device); integer, so .to(torch.bfloat16) and .half() leave it as it is.
        self.register_buffer("device_anchor", torch.empty(0, dtype=torch.long), persistent=False)

    @property
    def device(self) -> torch.device:
        """The device the process was last moved to (with its owner, or by `.to(device)`)."""
        return self.device_anchor.device

    def description(self) -> dict:
        """Plain values that rebuild this process (`diffusion.process.build_process`); saved in checkpoints."""
        return {"family": self.family, **self.config}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())

    # --- training ---------------------------------------------------------------------------------------
    def draw_levels(self, n: int, *, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """`n` training noise levels (B,), drawn from `generator` (default: torch's global stream of `device`)."""
        u = torch.rand(n, device=device, generator=generator)
        return self.quantile_levels(u)

    def quantile_levels(self, u: Tensor) -> Tensor:
        """The training distribution's quantile function: the levels at probabilities u in [0, 1)."""
        raise NotImplementedError

    def quantile_edges(self, k: int) -> list[float]:
        """The k + 1 levels at probabilities 0, 1/k, ..., 1: the edges of `k` equally likely buckets."""
        u = torch.linspace(0, 1, k + 1, dtype=torch.float64)
        return self.quantile_levels(u).tolist()

    def val_levels(self, bucket: Tensor, r: Tensor, k: int) -> Tensor:
        """Validation levels: sample i in `bucket[i]` of k equally likely buckets, at position r[i] in [0, 1)."""
        return self.quantile_levels((bucket.double() + r.double()) / k).float()

    def bucket_names(self, k: int) -> list[str]:
        """Names of the k validation buckets of `val_levels` (metric `val/loss_<name>`): `bucket_prefix` and the
        bucket's level range, e.g. "sigma0.11-0.16"; a ConfigError unless k >= 1."""
        if k < 1:
            raise ConfigError(f"module.val_buckets={k} must be >= 1")
        edges = self.quantile_edges(k)
        return [f"{self.bucket_prefix}{lo:.3g}-{hi:.3g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) of x_t = alpha x0 + sigma eps at each level, float32 (or the level's float dtype)."""
        raise NotImplementedError

    def q_sample(self, x0: Tensor, level: Tensor, noise: Tensor) -> Tensor:
        """x_t = alpha x0 + sigma eps, computed in (at least) float32 and returned in x0's dtype (the net's input)."""
        alpha, sigma = self.alpha_sigma(level)
        return (broadcast(alpha, x0.ndim) * x0 + broadcast(sigma, x0.ndim) * noise).to(x0.dtype)

    def net_input(self, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        """(image, time) the network is called with at x_t and `level`."""
        return x_t, level

    def from_net_input(self, x_in: Tensor, t_in: Tensor) -> tuple[Tensor, Tensor]:
        """The inverse of `net_input`: (x_t, level) from what the network was given."""
        return x_in, t_in

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """What the network should output for (x0, noise, level)."""
        raise NotImplementedError

    def loss_weight(self, level: Tensor) -> Tensor:
        """Per-sample weight of the MSE on `target`, float32."""
        raise NotImplementedError

    def to_x0(self, output: Tensor, x_t: Tensor, level: Tensor) -> Tensor:
        """The denoised image implied by the network's `output` at (x_t, level)."""
        raise NotImplementedError

    def output_from_x0(self, x0: Tensor, x_t: Tensor, level: Tensor) -> Tensor:
        """The network output that denoises x_t at `level` to x0 (the inverse of `to_x0`)."""
        raise NotImplementedError

    def diffusers_scheduler(self):
        """The diffusers scheduler that defines this process and our Euler / DDPM sampler (export format=diffusers)."""
        raise ConfigError(
            f"format=diffusers: the {self.family} process has no diffusers scheduler; use format=safetensors"
        )

    # --- sampling ---------------------------------------------------------------------------------------
    def sampling_levels(self, steps: int | None, spacing: str | None, *, sampler: str) -> list:
        """The levels a sampler with `steps` model calls visits, noisiest first; the clean end is implicit.

        `spacing` None is the family's default for `sampler` ("ddpm", "ddim", "dpmpp", "euler", "heun").
        """
        raise NotImplementedError

    def level_tensor(self, level, n: int, device: torch.device) -> Tensor:
        """`level` (a grid entry) as the (n,) tensor `net_input` and `to_x0` take."""
        return torch.full((n,), level, device=device, dtype=torch.float32)

    def alpha_sigma64(self, level) -> tuple[float, float]:
        """(alpha, sigma) of a grid entry in float64, for the samplers' step coefficients; None is clean data."""
        if level is None:
            return 1.0, 0.0
        alpha, sigma = self.alpha_sigma(torch.tensor([level], dtype=torch.float64))
        return float(alpha), float(sigma)

    def initial_scale(self, level) -> float:
        """Standard deviation of x at the first grid level given pure noise: sampling starts from scale * noise."""
        return 1.0

    def ode_frame(self, level) -> tuple[float, float]:
        """(s, sigma_ode) with x = s x~ such that the probability-flow ODE reads dx~/dsigma_ode = (x~ - D) / sigma_ode.

        EDM: (1, sigma). Discrete (variance preserving): (alpha, sigma / alpha), the variance-exploding form
        Karras et al. 2022 (sec. 3) integrate every model in. Flow: (1, t), since dx/dt = v = (x - x0) / t.
        """
        alpha, sigma = self.alpha_sigma64(level)
        return alpha, sigma / alpha

    #: True where x_t = x0 + sigma eps (alpha = 1): stochastic churn (EDM Algorithm 2) may raise sigma freely.
    variance_exploding: ClassVar[bool] = False
