"""EDM: the variance-exploding process with Karras et al. 2022's preconditioning ("Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv:2206.00364).

x = x0 + sigma eps (alpha = 1). The network F sees c_in x and c_noise = ln(sigma) / 4 and is wrapped into the
denoiser D(x; sigma) = c_skip x + c_out F (Table 1, "EDM" column):
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)      c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in = 1 / sqrt(sigma^2 + sigma_data^2)
so that for data of standard deviation sigma_data both the network's input and its effective target
(x0 - c_skip x) / c_out have unit variance at every sigma. Training draws ln(sigma) ~ N(P_mean, P_std^2) and
weights ||D - x0||^2 by lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; in terms of F's target
that weight is lambda c_out^2 = 1 (eq. 8). Sampling walks the Karras grid
sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (eq. 5), then sigma = 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from diffusion.errors import ConfigError
from diffusion.optional import import_diffusers
from diffusion.process.base import Process, broadcast, check_spacing

EDMSpacing = Literal["karras"]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """The `steps` noise levels of Karras et al. 2022, eq. 5, from sigma_max down to sigma_min (float64)."""
    if steps == 1:
        return [float(sigma_max)]
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)]


class EDM(Process):
    """EDM preconditioning and training distribution (see the module docstring).

    Args:
        sigma_data: the data's standard deviation (0.5 for images in [-1, 1], as in the paper).
        P_mean, P_std: ln(sigma) ~ N(P_mean, P_std^2) in training.
        sigma_min, sigma_max: the sampling grid's ends (the training sigma is not clipped).
        rho: the Karras grid's curvature (7: more steps at low noise).
    """

    family = "edm"
    bucket_prefix = "sigma"
    variance_exploding = True

    def __init__(
        self,
        *,
        sigma_data: float = 0.5,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
    ) -> None:
        super().__init__()
        for name, value in (("sigma_data", sigma_data), ("P_std", P_std), ("sigma_min", sigma_min), ("rho", rho)):
            if not value > 0:
                raise ConfigError(f"process.{name}={value} must be > 0")
        if not sigma_max > sigma_min:
            raise ConfigError(f"process.sigma_max={sigma_max} must be > process.sigma_min={sigma_min}")
        self.config = dict(sigma_data=sigma_data, P_mean=P_mean, P_std=P_std, sigma_min=sigma_min,
                           sigma_max=sigma_max, rho=rho)  # fmt: skip
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    # --- preconditioning (Table 1) ---------------------------------------------------------------------
    def c_skip(self, sigma: Tensor) -> Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4

    def edm_lambda(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, the weight of ||D - x0||^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    # --- training ---------------------------------------------------------------------------------------
    def draw_levels(self, n: int, *, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        return (self.P_mean + self.P_std * torch.randn(n, device=device, generator=generator)).exp()

    def quantile_levels(self, u: Tensor) -> Tensor:
        return (self.P_mean + self.P_std * torch.special.ndtri(u)).exp()

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        sigma = level if level.is_floating_point() else level.float()
        return torch.ones_like(sigma), sigma

    def net_input(self, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        sigma = level.float()
        return (broadcast(self.c_in(sigma), x_t.ndim) * x_t).to(x_t.dtype), self.c_noise(sigma)

    def from_net_input(self, x_in: Tensor, t_in: Tensor) -> tuple[Tensor, Tensor]:
        sigma = (4 * t_in).exp()
        return x_in / broadcast(self.c_in(sigma), x_in.ndim), sigma

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """F's effective target (x0 - c_skip x) / c_out, with x = x0 + sigma eps."""
        sigma = broadcast(level.float(), x0.ndim)
        x_t = x0 + sigma * noise
        return (x0 - self.c_skip(sigma) * x_t) / self.c_out(sigma)

    def loss_weight(self, level: Tensor) -> Tensor:
        sigma = level.float()
        return self.edm_lambda(sigma) * self.c_out(sigma) ** 2  # = 1 (eq. 8): F's loss is unit-weighted

    def to_x0(self, output: Tensor, x_t: Tensor, level: Tensor) -> Tensor:
        sigma = broadcast(level.float(), x_t.ndim)
        return self.c_skip(sigma) * x_t + self.c_out(sigma) * output

    def output_from_x0(self, x0: Tensor, x_t: Tensor, level: Tensor) -> Tensor:
        sigma = broadcast(level.to(x0.dtype), x_t.ndim)
        return (x0 - self.c_skip(sigma) * x_t) / self.c_out(sigma)

    # --- sampling ---------------------------------------------------------------------------------------
    def diffusers_scheduler(self):
        """diffusers' EDMEulerScheduler: its loop (x = sigma_max noise, `scale_model_input`, the network, `step`) is our
        `euler_sample` on the Karras grid; "epsilon" there is EDM's F preconditioning, D = c_skip x + c_out F."""
        cfg = self.config
        return import_diffusers("export.py format=diffusers").EDMEulerScheduler(
            sigma_min=cfg["sigma_min"],
            sigma_max=cfg["sigma_max"],
            sigma_data=cfg["sigma_data"],
            sigma_schedule="karras",
            rho=cfg["rho"],
            prediction_type="epsilon",
            final_sigmas_type="zero",
        )

    def sampling_levels(self, steps: int | None, spacing: str | None, *, sampler: str) -> list[float]:
        check_spacing(spacing, EDMSpacing, "edm")
        if steps is None or steps < 1:
            raise ConfigError(
                f"sampler.steps={'null' if steps is None else steps} on process=edm: give a number of steps >= 1"
            )
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)

    def initial_scale(self, level) -> float:
        return float(level)  # x_N ~ N(0, sigma_max^2 I), Algorithm 1 line 1

    def ode_frame(self, level) -> tuple[float, float]:
        return 1.0, float(level)


__all__ = ["EDM", "karras_sigmas"]
