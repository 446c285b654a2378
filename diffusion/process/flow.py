"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023), with Esser et al. 2024's (SD3) choices.

x_t = (1 - t) x0 + t eps for t in [0, 1] (alpha = 1 - t, sigma = t). The network predicts the velocity
v = dx_t/dt = eps - x0, unweighted MSE. Training draws t uniformly or logit-normally, t = sigmoid(m + s n) with
n ~ N(0, 1) (Esser et al. 2024, sec. 3.1: m = 0, s = 1 works well), and the network is given 1000 t (the timestep
scale of SD3 and diffusers' `FlowMatchEulerDiscreteScheduler`). Samplers walk t from 1 to 0 on a uniform grid
bent by the resolution shift t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, sec. 5.3.2; shift > 1 spends
more steps at high noise, for high resolutions). The probability-flow ODE is dx/dt = v = (x - x0) / t: the EDM
form with t in the place of sigma, so Euler and Heun are EDM's with sigma_ode = t.

Fine-tuning SD3 / Flux (`process=pretrained_flow`, `diffusion.pipeline.flow_from_pipeline`) adds what their
training recipes use (diffusers' `compute_density_for_timestep_sampling` / `compute_loss_weighting_for_sd3`):
t drawn by SD3's mode sampling (Esser et al. 2024, eq. 20: f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)), a loss
weight of t^-2 ("sigma_sqrt"), 2 / (pi (1 - 2t + 2t^2)) ("cosmap") or t^2 ("x0": the x0 loss that diffusers' SD3
script's `precondition_outputs` takes, |(x_t - t v) - x0|^2 = t^2 |v - (eps - x0)|^2), and the shift applied to
the training levels as well (`train_shift`: SD3 draws its training sigmas from the shifted scheduler grid; Flux,
whose scheduler shifts by resolution at sampling time only, does not). The target convention is diffusers' own:
its flow-match scripts regress `noise - model_input`, our `target`, with x_t = (1 - sigma) x0 + sigma noise.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffusion.errors import ConfigError
from diffusion.optional import import_diffusers
from diffusion.process.base import Process, broadcast, check_choice, check_spacing

TSampling = Literal["uniform", "logit_normal", "mode"]
Weighting = Literal["none", "sigma_sqrt", "cosmap", "x0"]
FlowSpacing = Literal["uniform"]


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift t' = shift t / (1 + (shift - 1) t): identity for shift = 1, 0 and 1 stay fixed."""
    return shift * t / (1 + (shift - 1) * t)


class Flow(Process):
    """Rectified flow with velocity prediction (see the module docstring).

    Args:
        t_sampling: the training distribution of t, "uniform", "logit_normal" or "mode" (SD3's eq. 20).
        logit_mean, logit_std: m and s of the logit-normal distribution (t = sigmoid(m + s n): diffusers' scripts
            mirror it, t = 1 - sigmoid(m + s n), so their logit_mean is minus ours).
        mode_scale: s of the mode sampling (SD3's 1.29); in [-1, 2 / (pi - 2)] so that f is monotone.
        shift: the sampling grid's resolution shift (1 = none; SD3 uses 3 at 1024 px).
        time_scale: the network is given time_scale * t.
        weighting: the loss weight per level: "none", "sigma_sqrt" (t^-2), "cosmap" or "x0" (t^2).
        train_shift: training levels are shifted by `shift` too (SD3's recipe).
    """

    family = "flow"
    bucket_prefix = "t"

    def __init__(
        self,
        *,
        t_sampling: TSampling = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        time_scale: float = 1000.0,
        mode_scale: float = 1.29,
        weighting: Weighting = "none",
        train_shift: bool = False,
    ) -> None:
        super().__init__()
        check_choice("process.t_sampling", t_sampling, TSampling)
        check_choice("process.weighting", weighting, Weighting)
        for name, value in (("logit_std", logit_std), ("shift", shift), ("time_scale", time_scale)):
            if not value > 0:
                raise ConfigError(f"process.{name}={value} must be > 0")
        if not -1.0 <= mode_scale <= 2 / (math.pi - 2):
            raise ConfigError(f"process.mode_scale={mode_scale} must be in [-1, 2 / (pi - 2)] (a monotone f_mode)")
        self.config = dict(t_sampling=t_sampling, logit_mean=logit_mean, logit_std=logit_std, shift=shift,
                           time_scale=time_scale)  # fmt: skip
        # the fine-tuning keys only where set, so earlier checkpoints' descriptions stay as they were
        extra = dict(mode_scale=mode_scale, weighting=weighting, train_shift=train_shift)
        defaults = dict(mode_scale=1.29, weighting="none", train_shift=False)
        self.config.update({k: v for k, v in extra.items() if v != defaults[k]})
        self.t_sampling, self.logit_mean, self.logit_std = t_sampling, logit_mean, logit_std
        self.shift, self.time_scale = shift, time_scale
        self.mode_scale, self.weighting, self.train_shift = mode_scale, weighting, train_shift

    # --- training ---------------------------------------------------------------------------------------
    def draw_levels(self, n: int, *, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        if self.t_sampling == "logit_normal":
            n_ = torch.randn(n, device=device, generator=generator)
            t = torch.sigmoid(self.logit_mean + self.logit_std * n_)
        else:
            t = self._from_uniform(torch.rand(n, device=device, generator=generator))
        return shift_time(t, self.shift) if self.train_shift else t

    def _from_uniform(self, u: Tensor) -> Tensor:
        """Uniform u -> t for "uniform" and "mode"; f_mode(1 - u) = 1 - f_mode(u) written increasing in u (a
        quantile function; the distribution is symmetric about 1/2, so it is SD3's)."""
        if self.t_sampling == "mode":
            return u - self.mode_scale * (torch.sin(math.pi * u / 2) ** 2 - u)
        return u

    def quantile_levels(self, u: Tensor) -> Tensor:
        if self.t_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(u))
        else:
            t = self._from_uniform(u)
        return shift_time(t, self.shift) if self.train_shift else t

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        t = level if level.is_floating_point() else level.float()
        return 1 - t, t

    def net_input(self, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        return x_t, level.float() * self.time_scale

    def from_net_input(self, x_in: Tensor, t_in: Tensor) -> tuple[Tensor, Tensor]:
        return x_in, t_in / self.time_scale

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """The velocity dx_t/dt = eps - x0."""
        return noise - x0

    def loss_weight(self, level: Tensor) -> Tensor:
        t = level.float()
        if self.weighting == "sigma_sqrt":
            return t.clamp_min(1e-4) ** -2  # (diffusers' name; the weight is sigma^-2)
        if self.weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
        if self.weighting == "x0":
            return t**2
        return torch.ones_like(t)

    def to_x0(self, output: Tensor, x_t: Tensor, level: Tensor) -> Tensor:
        return x_t - broadcast(level.float(), x_t.ndim) * output  # x0 = x_t - t v

    def output_from_x0(self, x0: Tensor, x_t: Tensor, level: Tensor) -> Tensor:
        return (x_t - x0) / broadcast(level.to(x0.dtype), x_t.ndim)  # v = (x_t - x0) / t

    # --- sampling ---------------------------------------------------------------------------------------
    def diffusers_scheduler(self):
        """diffusers' FlowMatchEulerDiscreteScheduler (num_train_timesteps = the network's time scale, our shift):
        `set_timesteps(sigmas=1 - i / steps)` and its loop are our `euler_sample`."""
        cfg = self.config
        if cfg["time_scale"] != int(cfg["time_scale"]):
            raise ConfigError(
                f"format=diffusers: process.time_scale={cfg['time_scale']} is not a whole number, which "
                "FlowMatchEulerDiscreteScheduler's num_train_timesteps must be; use format=safetensors"
            )
        scheduler = import_diffusers("export.py format=diffusers").FlowMatchEulerDiscreteScheduler
        return scheduler(num_train_timesteps=int(cfg["time_scale"]), shift=cfg["shift"])

    def sampling_levels(self, steps: int | None, spacing: str | None, *, sampler: str) -> list[float]:
        """t_i = shift(1 - i / steps) for i < steps: `steps` equal steps in the unshifted time, from t = 1."""
        check_spacing(spacing, FlowSpacing, "flow")
        if steps is None or steps < 1:
            raise ConfigError(
                f"sampler.steps={'null' if steps is None else steps} on process=flow: give a number of steps >= 1"
            )
        u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
        return shift_time(u, self.shift).tolist()

    def ode_frame(self, level) -> tuple[float, float]:
        return 1.0, float(level)
