"""Noise schedules and the forward process of a discrete-time diffusion model.

The schedule owns beta_t and alpha_bar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1, the forward noising
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4), the three prediction
targets a network can be trained on (eps, v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 from Salimans & Ho
2022, and x0) with exact conversions between them, and min-SNR-gamma loss weights (Hang et al. 2023).
Everything is plain torch: no Lightning, no Hydra. Tables are computed in float64 and stored as float32 buffers,
so the schedule moves with the module that owns it (`.to(device)`).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

ScheduleKind = Literal["linear", "cosine", "sigmoid"]
Prediction = Literal["eps", "v", "x0"]


def _check_choice(name: str, value: str, literal) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def make_betas(
    kind: ScheduleKind,
    num_steps: int,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    sigmoid_start: float = -3.0,
    sigmoid_end: float = 3.0,
    sigmoid_tau: float = 1.0,
    max_beta: float = 0.999,
) -> Tensor:
    """beta_1..beta_T as a float64 tensor of length `num_steps`.

    - linear: DDPM (Ho et al. 2020), betas evenly spaced from beta_start to beta_end (scaled for T != 1000
      so that the total noise stays the same, as in improved-diffusion).
    - cosine: Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2).
    - sigmoid: Jabri et al. 2022: alpha_bar(t) follows a scaled, flipped sigmoid over [start, end] / tau.
    Cosine and sigmoid betas are clipped at max_beta to avoid the singularity at t = T.
    """
    _check_choice("schedule.kind", kind, ScheduleKind)
    if num_steps < 1:
        raise ValueError(f"schedule.num_steps={num_steps} must be >= 1")
    if kind == "linear":
        scale = 1000.0 / num_steps
        return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64).clamp(max=max_beta)
    t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)  # t/T at the T+1 edges
    if kind == "cosine":
        f = torch.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
    else:
        v_start = torch.sigmoid(torch.tensor(sigmoid_start / sigmoid_tau, dtype=torch.float64))
        v_end = torch.sigmoid(torch.tensor(sigmoid_end / sigmoid_tau, dtype=torch.float64))
        s = torch.sigmoid((t * (sigmoid_end - sigmoid_start) + sigmoid_start) / sigmoid_tau)
        alpha_bar = (v_end - s) / (v_end - v_start)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min=0.0, max=max_beta)


def _gather(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] reshaped to broadcast against a (B, ...) tensor with `ndim` dims."""
    return table[t].reshape(-1, *([1] * (ndim - 1)))  # (B, 1, 1, 1)


class NoiseSchedule(nn.Module):
    """A discrete noise schedule with T steps; t is an integer in [0, T).

    Args:
        kind: "linear", "cosine" or "sigmoid" (see `make_betas`).
        num_steps: T, the number of diffusion steps.
        prediction: what the network predicts: "eps" (noise), "v" or "x0".
        min_snr_gamma: if set, weight the per-sample loss by min-SNR-gamma (Hang et al. 2023); 5 is typical.
        beta_start, beta_end: the linear schedule's endpoints (DDPM: 1e-4, 0.02 for T = 1000).
        cosine_s, sigmoid_start, sigmoid_end, sigmoid_tau: the other schedules' shape parameters.
    """

    def __init__(
        self,
        *,
        kind: ScheduleKind = "linear",
        num_steps: int = 1000,
        prediction: Prediction = "eps",
        min_snr_gamma: float | None = None,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        sigmoid_start: float = -3.0,
        sigmoid_end: float = 3.0,
        sigmoid_tau: float = 1.0,
    ) -> None:
        super().__init__()
        _check_choice("schedule.prediction", prediction, Prediction)
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"schedule.min_snr_gamma={min_snr_gamma} must be > 0 (or null to turn it off)")
        # Plain values, enough to rebuild this schedule (saved into checkpoints).
        self.config = dict(
            kind=kind,
            num_steps=num_steps,
            prediction=prediction,
            min_snr_gamma=min_snr_gamma,
            beta_start=beta_start,
            beta_end=beta_end,
            cosine_s=cosine_s,
            sigmoid_start=sigmoid_start,
            sigmoid_end=sigmoid_end,
            sigmoid_tau=sigmoid_tau,
        )
        self.kind = kind
        self.num_steps = num_steps
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma
        betas = make_betas(
            kind,
            num_steps,
            beta_start=beta_start,
            beta_end=beta_end,
            cosine_s=cosine_s,
            sigmoid_start=sigmoid_start,
            sigmoid_end=sigmoid_end,
            sigmoid_tau=sigmoid_tau,
        )
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        # Buffers are derived from config, so they stay out of the state dict.
        tables = {
            "betas": betas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            # beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, DDPM eq. 7
            "posterior_variance": betas * (1 - alpha_bar_prev) / (1 - alpha_bar),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_steps={self.num_steps}, prediction={self.prediction}"

    # --- forward process -------------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM eq. 4)."""
        a = _gather(self.sqrt_alpha_bar, t, x0.ndim)
        s = _gather(self.sqrt_one_minus_alpha_bar, t, x0.ndim)
        return a * x0 + s * noise

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t)."""
        ab = self.alpha_bar[t]
        return ab / (1 - ab)

    # --- prediction targets and conversions ---------------------------------------------------------------
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network should output for (x0, noise, t) under `self.prediction`."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.v_from(x0, noise, t)

    def v_from(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, sec. 4)."""
        a = _gather(self.sqrt_alpha_bar, t, x0.ndim)
        s = _gather(self.sqrt_one_minus_alpha_bar, t, x0.ndim)
        return a * eps - s * x0

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a = _gather(self.sqrt_alpha_bar, t, x_t.ndim)
        s = _gather(self.sqrt_one_minus_alpha_bar, t, x_t.ndim)
        return (x_t - s * eps) / a

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        a = _gather(self.sqrt_alpha_bar, t, x_t.ndim)
        s = _gather(self.sqrt_one_minus_alpha_bar, t, x_t.ndim)
        return (x_t - a * x0) / s

    def x0_eps_from_v(self, x_t: Tensor, v: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # With a^2 + s^2 = 1: x0 = a x_t - s v and eps = s x_t + a v.
        a = _gather(self.sqrt_alpha_bar, t, x_t.ndim)
        s = _gather(self.sqrt_one_minus_alpha_bar, t, x_t.ndim)
        return a * x_t - s * v, s * x_t + a * v

    def to_x0_eps(self, output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by a network output under `self.prediction`."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, output, t), output
        if self.prediction == "x0":
            return output, self.eps_from_x0(x_t, output, t)
        return self.x0_eps_from_v(x_t, output, t)

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The network output under `self.prediction` that corresponds to (x0, eps)."""
        return self.target(x0, eps, t)

    # --- loss weighting ------------------------------------------------------------------------------
    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight of the MSE on the prediction target; ones unless min-SNR-gamma is on.

        min-SNR-gamma (Hang et al. 2023) caps the x0-space weight at gamma: w_x0 = min(SNR, gamma).
        An eps-loss already carries a factor SNR, a v-loss a factor SNR + 1, so those divide it out.
        """
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        capped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            return capped / snr
        if self.prediction == "v":
            return capped / (snr + 1)
        return capped
