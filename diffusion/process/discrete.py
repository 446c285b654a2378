"""Noise schedules and the forward process of a discrete-time diffusion model: the "discrete" process family.

The schedule owns beta_t and alpha_bar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1, the forward noising
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4), the three prediction
targets a network can be trained on (eps, v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 from Salimans & Ho
2022, and x0) with exact conversions between them, and min-SNR-gamma loss weights (Hang et al. 2023).
Everything is plain torch: no Lightning, no Hydra. Tables are computed in float64 and handed out in float32 on the
schedule's device, whatever dtype the owning module is cast to: a Lightning `bf16-true` run casts every floating
buffer to bfloat16, which would round alpha_bar to 1 for the first timesteps and zero the min-SNR weights. So the
tables are plain tensors, not buffers, and an empty integer buffer (which `.to(dtype)` / `.half()` leave alone)
tracks the device the schedule was moved to. `NoiseSchedule` implements `diffusion.process.Process`: its levels
are the integer timesteps, and the network is given x_t and t.
"""

from __future__ import annotations

import bisect
import math
from typing import Literal, get_args

import torch
from torch import Tensor

from diffusion.errors import ConfigError
from diffusion.optional import import_diffusers
from diffusion.process.base import Process, check_choice

ScheduleKind = Literal["linear", "cosine", "sigmoid", "scaled_linear"]
Prediction = Literal["eps", "v", "x0"]
TimestepSpacing = Literal["leading", "trailing", "linspace", "logsnr"]
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # ours -> DDPMScheduler's


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
    - scaled_linear: Stable Diffusion's (Rombach et al. 2022), sqrt(beta) evenly spaced from sqrt(beta_start) to
      sqrt(beta_end), not rescaled for T (SD: 0.00085, 0.012, T = 1000; diffusers' "scaled_linear").
    Cosine and sigmoid betas are clipped at max_beta to avoid the singularity at t = T.
    """
    check_choice("process.kind", kind, ScheduleKind)
    if num_steps < 1:
        raise ConfigError(f"process.num_steps={num_steps} must be >= 1")
    if kind == "linear":
        scale = 1000.0 / num_steps
        return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64).clamp(max=max_beta)
    if kind == "scaled_linear":
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64)
        return (root**2).clamp(max=max_beta)
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


class _Table:
    """A schedule table read as an attribute (`schedule.alpha_bar`): float32, on the schedule's device."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, schedule: NoiseSchedule | None, owner: type | None = None) -> Tensor:
        return self if schedule is None else schedule.table(self.name)


class NoiseSchedule(Process):
    """A discrete noise schedule with T steps; t is an integer in [0, T).

    Args:
        kind: "linear", "cosine" or "sigmoid" (see `make_betas`).
        num_steps: T, the number of diffusion steps.
        prediction: what the network predicts: "eps" (noise), "v" or "x0".
        min_snr_gamma: if set, weight the per-sample loss by min-SNR-gamma (Hang et al. 2023); 5 is typical.
        beta_start, beta_end: the linear schedule's endpoints (DDPM: 1e-4, 0.02 for T = 1000).
        cosine_s, sigmoid_start, sigmoid_end, sigmoid_tau: the other schedules' shape parameters.
    """

    family = "discrete"

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
        check_choice("process.prediction", prediction, Prediction)
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ConfigError(f"process.min_snr_gamma={min_snr_gamma} must be > 0 (or null to turn it off)")
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
        snr = alpha_bar / (1 - alpha_bar)
        # float64 on the CPU, derived from config (so nothing of the schedule is in the state dict). Plain
        # attributes: nn.Module casts and moves only parameters and buffers, so no `.to(dtype)` reaches them.
        self.tables64: dict[str, Tensor] = {
            "betas": betas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            # beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, DDPM eq. 7
            "posterior_variance": betas * (1 - alpha_bar_prev) / (1 - alpha_bar),
            "snr": snr,
            "loss_weight": self._min_snr_weight(snr),
        }
        self._float32: dict[torch.device, dict[str, Tensor]] = {}  # float32 copies of the tables, per device

    def _min_snr_weight(self, snr: Tensor) -> Tensor:
        """Per-timestep weight of the MSE on the prediction target; ones unless min-SNR-gamma is on.

        min-SNR-gamma (Hang et al. 2023) caps the x0-space weight at gamma: w_x0 = min(SNR, gamma).
        An eps-loss already carries a factor SNR, a v-loss a factor SNR + 1, so those divide it out.
        """
        if self.min_snr_gamma is None:
            return torch.ones_like(snr)
        capped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            return capped / snr
        if self.prediction == "v":
            return capped / (snr + 1)
        return capped

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_steps={self.num_steps}, prediction={self.prediction}"

    # --- the tables, float32 on a device -----------------------------------------------------------------
    def table(self, name: str, device: torch.device | str | None = None) -> Tensor:
        """The float32 table `name` (T,) on `device` (default: the schedule's), made once per device."""
        device = self.device if device is None else torch.device(device)
        if device not in self._float32:  # cast on the CPU: some devices (MPS) have no float64
            self._float32[device] = {k: v.float().to(device) for k, v in self.tables64.items()}
        return self._float32[device][name]

    betas = _Table()
    alpha_bar = _Table()
    alpha_bar_prev = _Table()
    sqrt_alpha_bar = _Table()
    sqrt_one_minus_alpha_bar = _Table()
    posterior_variance = _Table()

    def _gather(self, name: str, t: Tensor, ndim: int) -> Tensor:
        """table[t] (float32, on t's device) reshaped to broadcast against a (B, ...) tensor with `ndim` dims."""
        return self.table(name, t.device)[t].reshape(-1, *([1] * (ndim - 1)))  # (B, 1, 1, 1)

    # --- forward process -------------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM eq. 4).

        Computed in (at least) float32 and returned in x0's dtype, since x_t is the network's input: bfloat16
        under a bf16-true trainer, whose data and weights are bfloat16.
        """
        a = self._gather("sqrt_alpha_bar", t, x0.ndim)
        s = self._gather("sqrt_one_minus_alpha_bar", t, x0.ndim)
        return (a * x0 + s * noise).to(x0.dtype)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float32 (computed in float64)."""
        return self.table("snr", t.device)[t]

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
        a = self._gather("sqrt_alpha_bar", t, x0.ndim)
        s = self._gather("sqrt_one_minus_alpha_bar", t, x0.ndim)
        return a * eps - s * x0

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a = self._gather("sqrt_alpha_bar", t, x_t.ndim)
        s = self._gather("sqrt_one_minus_alpha_bar", t, x_t.ndim)
        return (x_t - s * eps) / a

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        a = self._gather("sqrt_alpha_bar", t, x_t.ndim)
        s = self._gather("sqrt_one_minus_alpha_bar", t, x_t.ndim)
        return (x_t - a * x0) / s

    def x0_eps_from_v(self, x_t: Tensor, v: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # With a^2 + s^2 = 1: x0 = a x_t - s v and eps = s x_t + a v.
        a = self._gather("sqrt_alpha_bar", t, x_t.ndim)
        s = self._gather("sqrt_one_minus_alpha_bar", t, x_t.ndim)
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
        """Per-sample weight of the MSE on the prediction target, float32: ones unless min-SNR-gamma is on."""
        return self.table("loss_weight", t.device)[t]

    # --- the process interface (diffusion.process.base) ---------------------------------------------------
    def draw_levels(self, n: int, *, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integer timesteps in [0, T) (DDPM Algorithm 1)."""
        return torch.randint(0, self.num_steps, (n,), device=device, generator=generator)

    def quantile_levels(self, u: Tensor) -> Tensor:
        return (u * self.num_steps).floor().long().clamp(max=self.num_steps - 1)

    def bucket_edges(self, k: int) -> list[int]:
        """The k + 1 timestep edges of k equal buckets; a ConfigError unless 1 <= k <= T."""
        if not 1 <= k <= self.num_steps:
            raise ConfigError(f"module.val_buckets={k} must be in [1, {self.num_steps}]")
        return [round(i * self.num_steps / k) for i in range(k + 1)]

    def val_levels(self, bucket: Tensor, r: Tensor, k: int) -> Tensor:
        """Timestep lo + floor(r * width) in bucket [lo, hi) of `bucket_edges`."""
        edges = torch.tensor(self.bucket_edges(k))
        lo = edges[:-1][bucket]
        return lo + (r * (edges[1:][bucket] - lo)).long()

    def bucket_names(self, k: int) -> list[str]:
        edges = self.bucket_edges(k)
        return [f"t{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        t = level.long()
        return self.table("sqrt_alpha_bar", t.device)[t], self.table("sqrt_one_minus_alpha_bar", t.device)[t]

    def alpha_sigma64(self, level) -> tuple[float, float]:
        if level is None:
            return 1.0, 0.0
        ab = self.tables64["alpha_bar"][int(level)]
        return float(ab.sqrt()), float((1 - ab).sqrt())

    def to_x0(self, output: Tensor, x_t: Tensor, level: Tensor) -> Tensor:
        return self.to_x0_eps(output, x_t, level)[0]

    def output_from_x0(self, x0: Tensor, x_t: Tensor, level: Tensor) -> Tensor:
        return self.from_x0_eps(x0, self.eps_from_x0(x_t, x0, level), level)

    def level_tensor(self, level, n: int, device: torch.device) -> Tensor:
        return torch.full((n,), int(level), device=device, dtype=torch.long)

    def diffusers_scheduler(self):
        """diffusers' DDPMScheduler with our betas (`scheduler_config`): DDPMPipeline run with num_steps steps is our
        DDPM sampler (Ho et al. 2020, Algorithm 2)."""
        return import_diffusers("export.py format=diffusers").DDPMScheduler(**scheduler_config(self))

    def sampling_levels(self, steps: int | None, spacing: str | None, *, sampler: str) -> list[int]:
        """`sampling_timesteps` (all T for steps=None); spacing None is trailing for every sampler (measured best
        on the default run's checkpoint, docs/sampling.md)."""
        spacing = spacing or "trailing"
        T = self.num_steps
        return sampling_timesteps(T, T if steps is None else steps, spacing, alpha_bar=self.alpha_bar)


# --- diffusers ---------------------------------------------------------------------------------------------
def scheduler_config(schedule: NoiseSchedule) -> dict:
    """DDPMScheduler kwargs equivalent to `schedule` with our DDPM sampler's defaults (beta-tilde, clipped x0).

    The betas go in as `trained_betas` (float64 from the schedule's own formula), so every schedule kind and
    length is exact; `beta_schedule` names the equivalent built-in for readers but is not used by diffusers.
    """
    cfg = schedule.config
    betas = make_betas(
        cfg["kind"],
        cfg["num_steps"],
        **{k: cfg[k] for k in ("beta_start", "beta_end", "cosine_s", "sigmoid_start", "sigmoid_end", "sigmoid_tau")},
    )
    scale = 1000.0 / cfg["num_steps"] if cfg["kind"] == "linear" else 1.0  # our linear betas are rescaled for T
    names = {"linear": "linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid", "scaled_linear": "scaled_linear"}
    return dict(
        num_train_timesteps=cfg["num_steps"],
        beta_schedule=names[cfg["kind"]],
        beta_start=cfg["beta_start"] * scale,
        beta_end=cfg["beta_end"] * scale,
        trained_betas=betas.tolist(),
        variance_type="fixed_small",  # beta-tilde_t, DDPM eq. 7
        clip_sample=True,
        clip_sample_range=1.0,
        prediction_type=PREDICTION_TYPES[cfg["prediction"]],
        timestep_spacing="leading",
        steps_offset=0,
    )


# --- sampling grids --------------------------------------------------------------------------------------------
def sampling_timesteps(
    num_train_steps: int, steps: int, spacing: TimestepSpacing = "trailing", *, alpha_bar: Tensor | None = None
) -> list[int]:
    """The `steps` training timesteps a strided sampler visits, in decreasing order (fewer only if rounding merges
    two of "leading"/"linspace").

    Spacings follow Lin et al. 2024 (table 2): "leading" (DDIM's original, starts below T-1), "trailing" (ends at
    T-1, so the first step starts from pure noise) and "linspace" (evenly spaced from 0 to T-1, rounded); and
    "logsnr" (Lu et al. 2022, sec. 3.3: uniform in lambda = log(alpha / sigma), see `_logsnr_timesteps`), which
    needs the schedule's `alpha_bar`.
    """
    if spacing not in get_args(TimestepSpacing):
        choices = ", ".join(repr(c) for c in get_args(TimestepSpacing))
        raise ConfigError(f"sampler.spacing={spacing!r} is not one of {choices}")
    if not 1 <= steps <= num_train_steps:
        raise ConfigError(f"sampler.steps={steps} must be in [1, {num_train_steps}] (the schedule's num_steps)")
    T = num_train_steps
    if spacing == "logsnr":
        if alpha_bar is None:
            raise ConfigError("sampler.spacing='logsnr' needs the schedule's alpha_bar")
        return _logsnr_timesteps(alpha_bar, steps)
    if spacing == "leading":
        ts = [i * (T // steps) for i in range(steps)]
    elif spacing == "trailing":
        ts = [round(T - i * T / steps) - 1 for i in range(steps)][::-1]
    else:
        ts = torch.linspace(0, T - 1, steps).round().long().tolist()
    return sorted(set(int(t) for t in ts), reverse=True)


def _logsnr_timesteps(alpha_bar: Tensor, steps: int) -> list[int]:
    """`steps` distinct timesteps from T-1 down to 0, as evenly spaced in lambda = log(alpha / sigma) as whole
    timesteps allow (Lu et al. 2022, sec. 3.3).

    The grid spans lambda from t = T-2, not T-1: the cosine and sigmoid schedules clip the last beta at 0.999, so
    lambda drops by 0.5 log(1000) = 3.45 in the last step alone, and a grid from lambda_{T-1} puts several points
    into that gap, which all round to t >= T-2 (8 of 20 model calls at t >= 991 on cosine). The first step
    still starts from pure noise at T-1. Points are placed from both ends in turn, each at the nearest timestep
    to an even split of the lambda range still open: where timesteps are coarser than the grid (near T-1 and
    near 0 with many steps) the rest of the grid closes up instead of piling up consecutive timesteps.
    """
    T = alpha_bar.shape[0]
    if steps == 1:
        return [T - 1]
    lam = (0.5 * (alpha_bar.double().log() - (1 - alpha_bar.double()).log())).tolist()  # decreasing in t
    neg_lam = [-v for v in lam]  # increasing in t, for bisect
    top, bottom = [T - 1], [0]  # placed from t = T-1 downwards and from t = 0 upwards
    top_lam = lam[max(T - 2, 0)]
    while len(top) + len(bottom) < steps:
        left = steps - len(top) - len(bottom)  # points still to place, this one included
        h = (lam[bottom[-1]] - top_lam) / (left + 1)
        from_top = len(top) <= len(bottom)
        target = top_lam + h if from_top else lam[bottom[-1]] - h
        # the timestep nearest to the target that leaves one free timestep for each later point
        lo = bottom[-1] + 1 + (left - 1 if from_top else 0)
        hi = top[-1] - 1 - (0 if from_top else left - 1)
        i = bisect.bisect_left(neg_lam, -target, lo, hi + 1)  # lam[i - 1] > target >= lam[i]
        t = min((c for c in (i - 1, i) if lo <= c <= hi), key=lambda c: abs(lam[c] - target))
        if from_top:
            top.append(t)
            top_lam = lam[t]
        else:
            bottom.append(t)
    return top + bottom[::-1]
