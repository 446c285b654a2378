"""Samplers: run the learned reverse process from pure noise to images.

A sampler is a plain function `sampler(model, schedule, noise, *, generator=None, **options)` of a `model` (a
callable (x_t, t) -> network output in the schedule's prediction space), the `schedule`, the starting `noise`
and a `generator` for any fresh noise it draws. No Lightning, no Hydra. Outputs are in the data range [-1, 1]
(clipped when `clip_x0`). Three samplers:

- `ddpm_sample`: ancestral sampling (Ho et al. 2020, Algorithm 2), optionally respaced to fewer steps;
- `ddim_sample`: DDIM (Song et al. 2021, eq. 12) with `eta`;
- `dpmpp_sample`: DPM-Solver++(2M) (Lu et al. 2022), second-order multistep in data-prediction form.

`generator` is one `torch.Generator` for the whole batch, or a list of one generator per image: then every
image's fresh noise comes from its own stream, so an image does not depend on which batch it was drawn in
(`image_generators` and `draw_noise` make such streams from per-image seeds). Classifier-free guidance is not
a sampler option: `guided_model` turns (net, condition, null condition, guidance) into the `model` every
sampler takes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from diffusion.errors import ConfigError
from diffusion.schedule import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
PosteriorVariance = Literal["beta_tilde", "beta"]
TimestepSpacing = Literal["leading", "trailing", "linspace", "logsnr"]
SamplePrecision = Literal["fp32", "bf16", "fp16"]


# --- randomness -----------------------------------------------------------------------------------------
def image_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed (CPU, so results match across devices)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw_noise(
    shape: tuple[int, ...], *, generator: Generators = None, device: torch.device | str | None = None
) -> Tensor:
    """Standard normal noise of `shape` = (B, ...), drawn per image when `generator` is a list of B generators.

    Noise is drawn on the generator's device and then moved to `device`, so a CPU generator gives the same
    numbers on every device.
    """
    if generator is None:
        return torch.randn(shape, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ConfigError(f"got {len(generator)} per-image generators for a batch of {shape[0]} images")
    per_image = [torch.randn(shape[1:], generator=g, device=g.device).to(device) for g in generator]
    return torch.stack(per_image)  # (B, ...)


def fixed_noise(n: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """(n, *shape) standard normal noise where image i depends only on seed + i (the first draw of its generator)."""
    return draw_noise((n, *shape), generator=image_generators(range(seed, seed + n)))


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # installed with lightning

    return tqdm(iterable, desc=desc, leave=False)


# --- precision ------------------------------------------------------------------------------------------
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_from_trainer(precision: str | None) -> SamplePrecision:
    """The sampling precision that follows a Lightning `trainer.precision` ("bf16-mixed" -> "bf16", ...)."""
    precision = str(precision or "32")
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return "fp32"


def check_precision(precision: str) -> SamplePrecision:
    """`precision` if it is a sampling precision, else a ConfigError naming the choices."""
    if precision not in get_args(SamplePrecision):
        raise ConfigError(f"precision={precision!r} is not one of 'fp32', 'bf16', 'fp16'")
    return precision


def with_precision(model: ModelFn, precision: SamplePrecision, device: torch.device | str) -> ModelFn:
    """`model` whose network calls run under autocast in `precision`, returning fp32.

    Only the network runs in low precision: the sampler's own arithmetic (timesteps, alpha_bar, the update of
    x) stays fp32, since x_t and the schedule tables never pass through autocast. "fp32" returns `model` as is.
    """
    if check_precision(precision) == "fp32":
        return model
    device_type = torch.device(device).type
    dtype = _AUTOCAST_DTYPES[precision]

    def low_precision(x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device_type=device_type, dtype=dtype):
            return model(x, t).float()

    return low_precision


# --- classifier-free guidance ---------------------------------------------------------------------------
def guided_model(
    net: nn.Module,
    *,
    labels: Tensor | None = None,
    guidance: float = 1.0,
    cond: dict[str, Tensor] | None = None,
    null: dict[str, Tensor] | None = None,
) -> ModelFn:
    """The `model(x_t, t)` a sampler takes, from a network called as `net(x_t, t, **kwargs)`.

    Classifier-free guidance (Ho & Salimans 2022): out = uncond + guidance * (cond - uncond). The conditional
    branch is the net with `cond` (the conditioning's keyword arguments for the batch, e.g. a caption's
    `context` and `context_mask`), the unconditional one with `null` (the null condition, or a negative
    prompt's). `labels` is the class-label shorthand: cond = {"y": labels}, null = the null class num_classes.
    guidance=1 is the plain conditional model, 0 the unconditional one; anything else evaluates both branches in
    one batched forward pass (sequences of different lengths padded, their masks False there). Without `cond`
    (or `labels`) the model is the unconditional branch: `null`, or the net's own default (the null class).
    """
    from diffusion.conditioning import concat_kwargs

    num_classes = getattr(net, "num_classes", None)
    if labels is not None:
        if num_classes is None:
            raise ConfigError(
                "label=... was given but the model is unconditional (trained with model.num_classes=null)"
            )
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise ConfigError(f"label={bad} is out of range: the model has classes 0..{num_classes - 1}")
        cond, null = {"y": labels}, {"y": torch.full_like(labels, num_classes)}
    if cond is None:
        if guidance != 1.0 and num_classes is None and null is None:
            raise ConfigError(
                f"guidance={guidance} needs a class-conditional model (or a text-conditional one), but this one "
                "is unconditional"
            )
        uncond = null or {}
        return lambda x, t: net(x, t, **_on(uncond, x.device))
    if guidance != 1.0 and null is None:
        raise ConfigError(f"guidance={guidance} needs the null condition of the model's conditioning")

    def model(x: Tensor, t: Tensor) -> Tensor:
        if guidance == 1.0:
            return net(x, t, **_on(cond, x.device))
        if guidance == 0.0:
            return net(x, t, **_on(null, x.device))
        both = concat_kwargs(_on(cond, x.device), _on(null, x.device))
        out = net(torch.cat([x, x]), torch.cat([t, t]), **both)  # (2B, C, H, W)
        c, u = out.chunk(2)
        return u + guidance * (c - u)

    return model


def _on(kwargs: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in kwargs.items()}


# --- timesteps --------------------------------------------------------------------------------------------
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


def _x0_eps(model: ModelFn, schedule: NoiseSchedule, x: Tensor, i: int, clip_x0: bool) -> tuple[Tensor, Tensor]:
    """The model's (x0, eps) at timestep i; with `clip_x0`, x0 is clamped to [-1, 1] and eps re-derived from it."""
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    x0, eps = schedule.to_x0_eps(model(x, t).float(), x, t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = schedule.eps_from_x0(x, x0, t)
    return x0, eps


# --- DDPM ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def ddpm_sample(
    model: ModelFn,
    schedule: NoiseSchedule,
    noise: Tensor,
    *,
    steps: int | None = None,
    spacing: TimestepSpacing = "trailing",
    variance: PosteriorVariance = "beta_tilde",
    generator: Generators = None,
    clip_x0: bool = True,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, through all T steps or a respaced subset of `steps`.

    Each step predicts x0 (clipped to [-1, 1] when `clip_x0`), then draws x_{t'} from the posterior
    q(x_{t'} | x_t, x0) = N(mu~_t, sigma_t^2 I) (DDPM eq. 6-7), t' the next visited timestep, with
    sigma_t^2 = beta-tilde_t or beta_t. With fewer steps the process is respaced (Nichol & Dhariwal 2021,
    sec. 4): beta_t = 1 - alpha_bar_t / alpha_bar_{t'} between consecutive visited timesteps.
    """
    if variance not in get_args(PosteriorVariance):
        raise ConfigError(f"sampler.variance={variance!r} is not one of 'beta_tilde', 'beta'")
    s = schedule
    ts = sampling_timesteps(s.num_steps, s.num_steps if steps is None else steps, spacing, alpha_bar=s.alpha_bar)
    x = noise
    for j in _progress(range(len(ts)), progress, "DDPM"):
        i = ts[j]
        # 1. predict x0 (and eps) from the network output
        x0, _ = _x0_eps(model, s, x, i, clip_x0)
        # 2. posterior mean mu~_t(x_t, x0), DDPM eq. 7, with the respaced beta_t
        ab = s.alpha_bar[i]
        ab_prev = s.alpha_bar[ts[j + 1]] if j + 1 < len(ts) else torch.ones_like(ab)
        beta = 1 - ab / ab_prev
        mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x
        if j + 1 == len(ts):  # 4. return x_0 = mu~_1 (= x0) without noise
            x = mean
            break
        # 3. x_{t'} = mu~ + sigma_t z
        var = beta * (1 - ab_prev) / (1 - ab) if variance == "beta_tilde" else beta
        x = mean + var.sqrt() * draw_noise(x.shape, generator=generator, device=x.device).to(x.dtype)
    return x.clamp(-1, 1) if clip_x0 else x


# --- DDIM ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_sample(
    model: ModelFn,
    schedule: NoiseSchedule,
    noise: Tensor,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: TimestepSpacing = "trailing",
    generator: Generators = None,
    clip_x0: bool = True,
    progress: bool = False,
) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12, on a strided subset of timesteps; eta=0 is deterministic, eta=1 is DDPM-like.

    x_{t'} = sqrt(ab_{t'}) x0 + sqrt(1 - ab_{t'} - sigma^2) eps + sigma z, with
    sigma = eta * sqrt((1 - ab_{t'}) / (1 - ab_t)) * sqrt(1 - ab_t / ab_{t'}) (eq. 16), t' the next timestep.
    """
    if eta < 0:
        raise ConfigError(f"sampler.eta={eta} must be >= 0")
    s = schedule
    ts = sampling_timesteps(s.num_steps, steps, spacing, alpha_bar=s.alpha_bar)
    x = noise
    for j in _progress(range(len(ts)), progress, "DDIM"):
        i = ts[j]
        # 1. predicted x0 and eps at t (eps re-derived after clipping so the two stay consistent)
        x0, eps = _x0_eps(model, s, x, i, clip_x0)
        ab = s.alpha_bar[i]
        ab_next = s.alpha_bar[ts[j + 1]] if j + 1 < len(ts) else torch.ones_like(ab)
        # 2. sigma_t(eta), eq. 16
        sigma = eta * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)).clamp(min=0).sqrt()
        # 3. eq. 12: predicted x0, direction pointing to x_t, random noise
        x = ab_next.sqrt() * x0 + (1 - ab_next - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and j + 1 < len(ts):
            x = x + sigma * draw_noise(x.shape, generator=generator, device=x.device).to(x.dtype)
    return x.clamp(-1, 1) if clip_x0 else x


# --- DPM-Solver++ -------------------------------------------------------------------------------------------
@torch.no_grad()
def dpmpp_sample(
    model: ModelFn,
    schedule: NoiseSchedule,
    noise: Tensor,
    *,
    steps: int = 20,
    order: int = 2,
    spacing: TimestepSpacing = "logsnr",
    generator: Generators = None,
    clip_x0: bool = True,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2: multistep, data prediction, midpoint form.

    In log-SNR time lambda = log(alpha / sigma), with alpha = sqrt(ab) and sigma = sqrt(1 - ab), the probability
    flow ODE is solved exactly in its linear part; the x0-prediction integral is approximated by the current x0
    (first order, = DDIM) or by a linear extrapolation through the previous step's x0 (second order). From s to t
    with h = lambda_t - lambda_s and r = h_prev / h:
        D = x0_s + (x0_s - x0_prev) / (2 r)      (order 2; D = x0_s for order 1)
        x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D
    The first step has no history and the last step goes to sigma = 0 (lambda = inf), so both are first order,
    as in diffusers' `DPMSolverMultistepScheduler` (`lower_order_final`, `final_sigmas_type="zero"`). The
    sampler is deterministic; `generator` is accepted for the common signature and unused.
    """
    if order not in (1, 2):
        raise ConfigError(f"sampler.order={order} must be 1 or 2")
    s = schedule
    ts = sampling_timesteps(s.num_steps, steps, spacing, alpha_bar=s.alpha_bar)
    ab = s.alpha_bar.double()  # lambda differences lose precision in float32 near t = 0

    def alpha_sigma_lambda(i: int | None) -> tuple[Tensor, Tensor, Tensor]:
        if i is None:  # the end point: clean data
            one = torch.ones((), dtype=torch.float64, device=ab.device)
            return one, torch.zeros_like(one), torch.full_like(one, math.inf)
        alpha, sigma = ab[i].sqrt(), (1 - ab[i]).sqrt()
        return alpha, sigma, alpha.log() - sigma.log()

    x = noise
    x0_prev, lambda_prev = None, None
    for j in _progress(range(len(ts)), progress, "DPM-Solver++"):
        i, i_next = ts[j], (ts[j + 1] if j + 1 < len(ts) else None)
        # 1. data prediction at s = ts[j]
        x0, _ = _x0_eps(model, s, x, i, clip_x0)
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(i)
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(i_next)
        h = lambda_t - lambda_s
        # 2. D: first order at the first and the last step, else the multistep second-order correction
        if order == 2 and x0_prev is not None and i_next is not None:
            r = (lambda_s - lambda_prev) / h
            D = x0 + (0.5 / r).float() * (x0 - x0_prev)
        else:
            D = x0
        # 3. the exact linear part plus the exponentially weighted data prediction (Lu et al. 2022, eq. 8)
        x = (sigma_t / sigma_s).float() * x - (alpha_t * torch.expm1(-h)).float() * D
        x0_prev, lambda_prev = x0, lambda_s
    return x.clamp(-1, 1) if clip_x0 else x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpmpp": dpmpp_sample}
