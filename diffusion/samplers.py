"""Samplers: run the learned reverse process from pure noise to images.

A sampler is a plain function of a `model` (a callable (x_t, t) -> network output in the schedule's
prediction space), the `schedule`, the starting `noise` and a `generator` for any fresh noise it draws. No
Lightning, no Hydra. Outputs are in the data range [-1, 1] (clipped when `clip_x0`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from diffusion.schedule import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
PosteriorVariance = Literal["beta_tilde", "beta"]


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # installed with lightning

    return tqdm(iterable, desc=desc, leave=False)


@torch.no_grad()
def ddpm_sample(
    model: ModelFn,
    schedule: NoiseSchedule,
    noise: Tensor,
    *,
    generator: torch.Generator | None = None,
    variance: PosteriorVariance = "beta_tilde",
    clip_x0: bool = True,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, through all T steps of the schedule.

    Each step predicts x0 (clipped to [-1, 1] when `clip_x0`), then draws x_{t-1} from the posterior
    q(x_{t-1} | x_t, x0) = N(mu~_t, sigma_t^2 I) (DDPM eq. 6-7), with sigma_t^2 = beta-tilde_t or beta_t.
    Fresh noise is drawn on `generator`'s device and moved, so results match across devices for a CPU
    generator.
    """
    if variance not in get_args(PosteriorVariance):
        raise ValueError(f"sampler.variance={variance!r} is not one of 'beta_tilde', 'beta'")
    s = schedule
    x = noise
    gen_device = generator.device if generator is not None else x.device
    for i in _progress(range(s.num_steps - 1, -1, -1), progress, "DDPM"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        # 1. predict x0 (and eps) from the network output
        x0, _ = s.to_x0_eps(model(x, t).float(), x, t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        # 2. posterior mean mu~_t(x_t, x0), DDPM eq. 7
        ab, ab_prev, beta = s.alpha_bar[i], s.alpha_bar_prev[i], s.betas[i]
        mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x
        if i == 0:  # 4. return x_0 = mu~_1 without noise
            x = mean
            break
        # 3. x_{t-1} = mu~ + sigma_t z
        var = s.posterior_variance[i] if variance == "beta_tilde" else beta
        z = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
        x = mean + var.sqrt() * z
    return x.clamp(-1, 1) if clip_x0 else x


TimestepSpacing = Literal["leading", "trailing", "linspace"]


def sampling_timesteps(num_train_steps: int, steps: int, spacing: TimestepSpacing = "trailing") -> list[int]:
    """The `steps` training timesteps a strided sampler visits, in decreasing order.

    Spacings follow Lin et al. 2024 (table 2): "leading" (DDIM's original, starts below T-1), "trailing" (ends at
    T-1, so the first step starts from pure noise) and "linspace" (evenly spaced from 0 to T-1, rounded).
    """
    if spacing not in get_args(TimestepSpacing):
        raise ValueError(f"sampler.spacing={spacing!r} is not one of 'leading', 'trailing', 'linspace'")
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"sampler.steps={steps} must be in [1, {num_train_steps}] (the schedule's num_steps)")
    T = num_train_steps
    if spacing == "leading":
        ts = [i * (T // steps) for i in range(steps)]
    elif spacing == "trailing":
        ts = [round(T - i * T / steps) - 1 for i in range(steps)][::-1]
    else:
        ts = torch.linspace(0, T - 1, steps).round().long().tolist()
    return sorted(set(int(t) for t in ts), reverse=True)


@torch.no_grad()
def ddim_sample(
    model: ModelFn,
    schedule: NoiseSchedule,
    noise: Tensor,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: TimestepSpacing = "trailing",
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
    progress: bool = False,
) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12, on a strided subset of timesteps; eta=0 is deterministic, eta=1 is DDPM-like.

    x_{t'} = sqrt(ab_{t'}) x0 + sqrt(1 - ab_{t'} - sigma^2) eps + sigma z, with
    sigma = eta * sqrt((1 - ab_{t'}) / (1 - ab_t)) * sqrt(1 - ab_t / ab_{t'}) (eq. 16), t' the next timestep.
    """
    if eta < 0:
        raise ValueError(f"sampler.eta={eta} must be >= 0")
    s = schedule
    ts = sampling_timesteps(s.num_steps, steps, spacing)
    x = noise
    gen_device = generator.device if generator is not None else x.device
    for j in _progress(range(len(ts)), progress, "DDIM"):
        i = ts[j]
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        # 1. predicted x0 and eps at t (eps re-derived after clipping so the two stay consistent)
        x0, eps = s.to_x0_eps(model(x, t).float(), x, t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = s.eps_from_x0(x, x0, t)
        ab = s.alpha_bar[i]
        ab_next = s.alpha_bar[ts[j + 1]] if j + 1 < len(ts) else torch.ones_like(ab)
        # 2. sigma_t(eta), eq. 16
        sigma = eta * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)).clamp(min=0).sqrt()
        # 3. eq. 12: predicted x0, direction pointing to x_t, random noise
        x = ab_next.sqrt() * x0 + (1 - ab_next - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and j + 1 < len(ts):
            z = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
            x = x + sigma * z
    return x.clamp(-1, 1) if clip_x0 else x
