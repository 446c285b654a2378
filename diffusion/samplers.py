"""Samplers: run the learned reverse process from pure noise to images.

A sampler is a plain function `sampler(model, process, noise, *, generator=None, **options)` of a `model` (a
callable (x_t, t) -> network output, called on what the process gives the network: x_t and the integer t for
the discrete schedules, c_in x and c_noise for EDM, x_t and 1000 t for flow), the process (`diffusion.process`),
the starting `noise` and a `generator` for any fresh noise it draws. No Lightning, no Hydra. Every sampler works
on the denoised image x0 = `process.to_x0(output)` and the process's alpha and sigma (x_t = alpha x0 + sigma
eps), so each serves every family: the grid of levels comes from `process.sampling_levels` (discrete: timestep
spacings; EDM: Karras sigmas; flow: shifted uniform t). Outputs are
in the data range [-1, 1] (clipped when `clip_x0`). The samplers:

- `ddpm_sample`: ancestral sampling (Ho et al. 2020, Algorithm 2), optionally respaced to fewer steps;
- `ddim_sample`: DDIM (Song et al. 2021, eq. 12) with `eta`;
- `dpmpp_sample`: DPM-Solver++(2M) (Lu et al. 2022), second-order multistep in data-prediction form;
- `unipc_sample`: UniPC (Zhao et al. 2023), multistep predictor-corrector of order 2 or 3 in data-prediction form;
- `euler_sample`, `heun_sample`: Karras et al. 2022 Algorithm 2 (first / second order, optional churn on EDM).

`generator` is one `torch.Generator` for the whole batch, or a list of one generator per image: then every
image's fresh noise comes from its own stream, so an image does not depend on which batch it was drawn in
(`image_generators` and `draw_noise` make such streams from per-image seeds). Classifier-free guidance is not
a sampler option: `DiffusionModel.denoiser` turns (condition, null condition, guidance) into the `model` every
sampler takes.

Editing is not a sampler either: an `Edit` (image-to-image and inpainting) passed as `edit=` enters every sampler at
the same three places, `_grid` (where on the grid to start), `_start` (x at that level) and `_keep` (after each step:
the known region put back), so a new sampler supports it by calling these three.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from diffusion.errors import ConfigError
from diffusion.process.base import Process

ModelFn = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
PosteriorVariance = Literal["beta_tilde", "beta"]
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
    x) stays fp32, since x_t and the process tables never pass through autocast. "fp32" returns `model` as is.
    """
    if check_precision(precision) == "fp32":
        return model
    device_type = torch.device(device).type
    dtype = _AUTOCAST_DTYPES[precision]

    def low_precision(x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device_type=device_type, dtype=dtype):
            return model(x, t).float()

    return low_precision


def _denoiser(model: ModelFn, process: Process, clip_x0: bool) -> Callable[[Tensor, object], Tensor]:
    """D(x, level): the denoised image the model implies at a grid level, clamped to [-1, 1] when `clip_x0`.

    x is in the process's own scale (x_t = alpha x0 + sigma eps); the model is called on what the process gives the
    network at that level (`Process.net_input`), and its output turned into x0 by `Process.to_x0`.
    """

    def denoise(x: Tensor, level) -> Tensor:
        lev = process.level_tensor(level, x.shape[0], x.device)
        x_in, t_in = process.net_input(x, lev)
        x0 = process.to_x0(model(x_in, t_in).float(), x, lev)
        return x0.clamp(-1, 1) if clip_x0 else x0

    return denoise


# --- editing: image-to-image and inpainting -------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """Image-to-image (SDEdit, Meng et al. 2022) and inpainting (RePaint, Lugmayr et al. 2022) for any sampler.

    `known`: (B, C, h, w) the images to edit, in the sampler's space (latents for a latent model). `strength`: the
    share of the sampling grid that is run: the last round(strength * steps) steps, starting from `known` noised to
    the first level they visit with the sampler's own starting noise (SDEdit); 0 returns `known`, 1 runs the whole
    grid from pure noise, as plain generation does. `mask`: (B, 1, h, w) in {0, 1}, 1 = generate, 0 = keep (the
    diffusers convention), or None. After every step the kept region of x is replaced by `known` noised to the
    level just reached (RePaint's replacement, with the starting noise as in diffusers' inpainting pipelines, so
    no fresh draws shift a stochastic sampler's stream); at the clean end it is `known` itself.
    """

    known: Tensor
    strength: float = 1.0
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.strength) <= 1.0:
            raise ConfigError(f"strength={self.strength} must be in [0, 1]")
        if self.mask is not None:
            b, _, h, w = self.known.shape
            if self.mask.shape != (b, 1, h, w):
                raise ConfigError(f"mask of shape {tuple(self.mask.shape)} for images of shape {(b, 1, h, w)}")
            if not ((self.mask == 0) | (self.mask == 1)).all():
                raise ConfigError("mask must hold only 0 (keep) and 1 (generate)")


def _grid(process: Process, steps: int | None, spacing: str | None, sampler: str, edit: Edit | None = None) -> list:
    """The grid of levels `sampler` walks (noisiest first), then None for clean data (alpha = 1, sigma = 0).

    With an `edit`, only its last round(strength * steps) levels: the start index into the full grid.
    """
    grid = [*process.sampling_levels(steps, spacing, sampler=sampler), None]
    if edit is None:
        return grid
    run = round(float(edit.strength) * (len(grid) - 1))
    return grid[len(grid) - 1 - run :]


def _start(process: Process, grid: list, noise: Tensor, edit: Edit | None) -> Tensor:
    """x at grid[0] in the process's scale: pure noise (as plain generation, also at strength 1), or the edit's
    known images noised there with the same `noise`: x = alpha known + sigma noise (SDEdit's start)."""
    if edit is None or float(edit.strength) >= 1.0:
        return noise * process.initial_scale(grid[0])
    alpha, sigma = process.alpha_sigma64(grid[0])
    return alpha * edit.known.to(noise) + sigma * noise


def _keep(process: Process, x: Tensor, level, noise: Tensor, edit: Edit | None, scale: float = 1.0) -> Tensor:
    """After a step to `level`: x with the edit's kept region (mask 0) replaced by the known images noised to
    `level` with the starting `noise` (RePaint); `scale` is the sampler's frame (x~ = x / scale, Karras et al.)."""
    if edit is None or edit.mask is None:
        return x
    alpha, sigma = process.alpha_sigma64(level)
    known = (alpha * edit.known.to(x) + sigma * noise.to(x)) / scale
    return torch.where(edit.mask.to(x.device) > 0.5, x, known)


# --- DDPM ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def ddpm_sample(
    model: ModelFn,
    process: Process,
    noise: Tensor,
    *,
    steps: int | None = None,
    spacing: str | None = None,
    variance: PosteriorVariance = "beta_tilde",
    generator: Generators = None,
    clip_x0: bool = True,
    progress: bool = False,
    edit: Edit | None = None,
) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, through all T steps or a respaced subset of `steps`.

    Each step predicts x0 (clipped to [-1, 1] when `clip_x0`), then draws x_s from the posterior
    q(x_s | x_t, x0) = N(mu~, sigma~^2 I) (DDPM eq. 6-7), s the next visited level. Written for any process
    x_t = alpha_t x0 + sigma_t eps (Kingma et al. 2021, eq. 32-33): with alpha_t|s = alpha_t / alpha_s and
    sigma_t|s^2 = sigma_t^2 - alpha_t|s^2 sigma_s^2 (= the respaced beta_t on a discrete process, Nichol &
    Dhariwal 2021, sec. 4), mu~ = (alpha_t|s sigma_s^2 x_t + alpha_s sigma_t|s^2 x0) / sigma_t^2 and
    sigma~^2 = sigma_t|s^2 sigma_s^2 / sigma_t^2 (beta-tilde) or sigma_t|s^2 (beta). `steps=None` walks every
    timestep of a discrete process; EDM and flow need `steps`.
    """
    if variance not in get_args(PosteriorVariance):
        raise ConfigError(f"sampler.variance={variance!r} is not one of 'beta_tilde', 'beta'")
    grid = _grid(process, steps, spacing, "ddpm", edit)
    denoise = _denoiser(model, process, clip_x0)
    x = _start(process, grid, noise, edit)
    for j in _progress(range(len(grid) - 1), progress, "DDPM"):
        # 1. predict x0 from the network output
        x0 = denoise(x, grid[j])
        # 2. posterior mean mu~(x_t, x0), DDPM eq. 7 in alpha / sigma form
        a_t, s_t = process.alpha_sigma64(grid[j])
        a_s, s_s = process.alpha_sigma64(grid[j + 1])
        a_ts = a_t / a_s
        var_ts = max(s_t**2 - a_ts**2 * s_s**2, 0.0)
        x = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * x0
        if grid[j + 1] is not None:  # 3. x_s = mu~ + sigma~ z (4. the last step returns x_0 = mu~ without noise)
            var = var_ts * s_s**2 / s_t**2 if variance == "beta_tilde" else var_ts
            x = x + math.sqrt(var) * draw_noise(x.shape, generator=generator, device=x.device).to(x.dtype)
        x = _keep(process, x, grid[j + 1], noise, edit)
    return x.clamp(-1, 1) if clip_x0 else x


# --- DDIM ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_sample(
    model: ModelFn,
    process: Process,
    noise: Tensor,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str | None = None,
    generator: Generators = None,
    clip_x0: bool = True,
    progress: bool = False,
    edit: Edit | None = None,
) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12, on a strided grid of levels; eta=0 is deterministic, eta=1 is DDPM-like.

    x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with c = eta sigma_s sqrt(1 - SNR_t / SNR_s), s the next
    level; on a discrete process c is eq. 16's eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s). The same
    update serves any process x_t = alpha_t x0 + sigma_t eps; with eta = 0 it is the Euler step of the
    probability-flow ODE in x / alpha and sigma / alpha (Karras et al. 2022, sec. 3), on EDM and flow models too.
    """
    if eta < 0:
        raise ConfigError(f"sampler.eta={eta} must be >= 0")
    grid = _grid(process, steps, spacing, "ddim", edit)
    denoise = _denoiser(model, process, clip_x0)
    x = _start(process, grid, noise, edit)
    for j in _progress(range(len(grid) - 1), progress, "DDIM"):
        # 1. predicted x0, and the eps consistent with it (after any clipping)
        x0 = denoise(x, grid[j])
        a_t, s_t = process.alpha_sigma64(grid[j])
        a_s, s_s = process.alpha_sigma64(grid[j + 1])
        eps = (x - a_t * x0) / s_t
        # 2. c(eta), eq. 16 in SNR form: SNR_t / SNR_s = (alpha_t sigma_s / (alpha_s sigma_t))^2
        c = eta * s_s * math.sqrt(max(1 - (a_t * s_s / (a_s * s_t)) ** 2, 0.0))
        # 3. eq. 12: predicted x0, direction pointing to x_t, random noise
        x = a_s * x0 + math.sqrt(max(s_s**2 - c**2, 0.0)) * eps
        if c > 0:
            x = x + c * draw_noise(x.shape, generator=generator, device=x.device).to(x.dtype)
        x = _keep(process, x, grid[j + 1], noise, edit)
    return x.clamp(-1, 1) if clip_x0 else x


# --- DPM-Solver++ -------------------------------------------------------------------------------------------
def _lambda(alpha: float, sigma: float) -> Tensor:
    """lambda = log(alpha / sigma) as a float64 tensor (-inf at alpha = 0, +inf at sigma = 0)."""
    return torch.tensor(alpha, dtype=torch.float64).log() - torch.tensor(sigma, dtype=torch.float64).log()


@torch.no_grad()
def dpmpp_sample(
    model: ModelFn,
    process: Process,
    noise: Tensor,
    *,
    steps: int = 20,
    order: int = 2,
    spacing: str | None = None,
    generator: Generators = None,
    clip_x0: bool = True,
    progress: bool = False,
    edit: Edit | None = None,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2: multistep, data prediction, midpoint form.

    In log-SNR time lambda = log(alpha / sigma) the probability flow ODE is solved exactly in its linear part; the
    x0-prediction integral is approximated by the current x0 (first order, = DDIM) or by a linear extrapolation
    through the previous step's x0 (second order). From s to t with h = lambda_t - lambda_s and r = h_prev / h:
        D = x0_s + (x0_s - x0_prev) / (2 r)      (order 2; D = x0_s for order 1)
        x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D
    Any process x_t = alpha x0 + sigma eps: discrete (alpha = sqrt(ab)), EDM (alpha = 1), flow (alpha = 1 - t;
    lambda = -inf at t = 1, where the first step is DDIM's). The first step has no history and the last step goes
    to sigma = 0 (lambda = inf), so both are first order, as in diffusers' `DPMSolverMultistepScheduler`
    (`lower_order_final`, `final_sigmas_type="zero"`). Deterministic; `generator` is accepted and unused.
    """
    if order not in (1, 2):
        raise ConfigError(f"sampler.order={order} must be 1 or 2")
    grid = _grid(process, steps, spacing, "dpmpp", edit)
    denoise = _denoiser(model, process, clip_x0)
    x = _start(process, grid, noise, edit)
    x0_prev, lambda_prev = None, None
    for j in _progress(range(len(grid) - 1), progress, "DPM-Solver++"):
        # 1. data prediction at s = grid[j]
        x0 = denoise(x, grid[j])
        alpha_s, sigma_s = process.alpha_sigma64(grid[j])
        alpha_t, sigma_t = process.alpha_sigma64(grid[j + 1])
        lambda_s, lambda_t = _lambda(alpha_s, sigma_s), _lambda(alpha_t, sigma_t)
        h = lambda_t - lambda_s
        # 2. D: first order at the first and the last step, else the multistep second-order correction
        if order == 2 and x0_prev is not None and grid[j + 1] is not None:
            r = (lambda_s - lambda_prev) / h
            D = x0 + (0.5 / r).float() * (x0 - x0_prev)
        else:
            D = x0
        # 3. the exact linear part plus the exponentially weighted data prediction (Lu et al. 2022, eq. 8)
        x = (sigma_t / sigma_s) * x - (alpha_t * torch.expm1(-h)).float() * D
        x = _keep(process, x, grid[j + 1], noise, edit)
        x0_prev, lambda_prev = x0, lambda_s
    return x.clamp(-1, 1) if clip_x0 else x


# --- UniPC --------------------------------------------------------------------------------------------------
def _unipc_step(
    x: Tensor,
    x0s: list[Tensor],
    lambdas: list[float],
    *,
    lambda_t: float,
    alpha_t: float,
    ratio: float,
    x0_t: Tensor | None = None,
) -> Tensor:
    """One UniP-p (`x0_t` None) or UniC-p step of UniPC's B(h) = e^h - 1 ("bh2") form in data prediction.

    From level s0 to t, with h = lambda_t - lambda_s0: `x` is at s0, `x0s` / `lambdas` the data predictions and
    log-SNRs at s0, s1, ... (newest first, p of them), `ratio` = sigma_t / sigma_s0. With r_k = (lambda_sk -
    lambda_s0) / h and D_k = (x0_sk - x0_s0) / r_k (Zhao et al. 2023, Algorithm 2 and eq. 9 with B(h) = e^-h - 1):
        x_t = ratio x - alpha_t (e^-h - 1) x0_s0 - alpha_t B(h) sum_k rho_k D_k
    rho solves R rho = b, R_ik = r_k^(i-1) and b_i = i! phi_(i+1)(-h) h / B(h) (the vector `b`, by the phi_k
    recursion). The predictor uses the p - 1 history terms (rho = 1/2 for p = 2); the corrector adds the new
    prediction at t as the term with r = 1 (rho = 1/2 for p = 1), raising the order by one. Scalars are float64.
    """
    order = len(x0s)
    h = lambda_t - lambdas[0]
    hh = -h  # data prediction integrates in -lambda
    h_phi_1 = math.expm1(hh)
    B_h = math.expm1(hh)  # "bh2"
    rks = [(lam - lambdas[0]) / h for lam in lambdas[1:]] + [1.0]
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.tensor([[r ** (i - 1) for r in rks] for i in range(1, order + 1)], dtype=torch.float64)
    D1s = [(x0s[k] - x0s[0]) / rks[k - 1] for k in range(1, order)]
    if x0_t is None:  # predictor UniP-p: the p - 1 history differences
        if order <= 2:
            rhos = [0.5] * (order - 1)
        else:
            rhos = torch.linalg.solve(R[:-1, :-1], torch.tensor(b[:-1], dtype=torch.float64)).tolist()
        res = sum((rho * d for rho, d in zip(rhos, D1s)), torch.zeros_like(x))
    else:  # corrector UniC-p: the new prediction at t enters with r = 1
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()
        res = sum((rho * d for rho, d in zip(rhos[:-1], D1s)), rhos[-1] * (x0_t - x0s[0]))
    return ratio * x - (alpha_t * h_phi_1) * x0s[0] - (alpha_t * B_h) * res


@torch.no_grad()
def unipc_sample(
    model: ModelFn,
    process: Process,
    noise: Tensor,
    *,
    steps: int = 10,
    order: int = 2,
    corrector: bool = True,
    spacing: str | None = None,
    generator: Generators = None,
    clip_x0: bool = True,
    progress: bool = False,
    edit: Edit | None = None,
) -> Tensor:
    """UniPC, Zhao et al. 2023 ("UniPC: a unified predictor-corrector framework"): multistep UniP-p predictor and
    UniC corrector in data prediction with B(h) = e^h - 1 (`_unipc_step`), as diffusers' `UniPCMultistepScheduler`
    runs it by default (`predict_x0`, `solver_type="bh2"`, `lower_order_final`, `final_sigmas_type="zero"`).

    Each model call at a new level first corrects the sample the predictor just moved there (UniC, using the new
    x0 with the history, no extra model call), then predicts the next level from it with order `order` (2 or 3).
    The order warms up over the first steps (one x0 more each step), steps down towards the end
    (order min(order, steps left), so the step to sigma = 0 is first order and returns the last x0), and counts
    only levels with a finite log-SNR (flow's t = 1 has lambda = -inf: its x0 starts no history). The corrector
    of the final model call would be discarded by that last step, so it is skipped. `corrector=False` is UniP
    alone (order 2: DPM-Solver++(2M) up to its r-dependent weight). Deterministic; `generator` is unused.
    """
    if order not in (1, 2, 3):
        raise ConfigError(f"sampler.order={order} must be 1, 2 or 3")
    grid = _grid(process, steps, spacing, "unipc", edit)
    denoise = _denoiser(model, process, clip_x0)
    x = _start(process, grid, noise, edit)
    x0s: list[Tensor] = []  # data predictions at the visited levels with a finite log-SNR, newest first
    lambdas: list[float] = []
    x_prev, prev_order = None, 0  # the sample before the last predictor step, and that step's order
    for j in _progress(range(len(grid) - 1), progress, "UniPC"):
        x0 = denoise(x, grid[j])
        alpha_s, sigma_s = process.alpha_sigma64(grid[j])
        alpha_t, sigma_t = process.alpha_sigma64(grid[j + 1])
        lambda_s, lambda_t = float(_lambda(alpha_s, sigma_s)), float(_lambda(alpha_t, sigma_t))
        # 1. UniC: correct x at grid[j] with its own x0 (the model call is not repeated at the corrected x)
        if corrector and x_prev is not None and grid[j + 1] is not None:
            alpha_p, sigma_p = process.alpha_sigma64(grid[j - 1])
            x = _unipc_step(x_prev, x0s[:prev_order], lambdas[:prev_order], lambda_t=lambda_s, alpha_t=alpha_s,
                            ratio=sigma_s / sigma_p, x0_t=x0)  # fmt: skip
            x = _keep(process, x, grid[j], noise, edit)  # the corrector moved the kept region too
        # the start of a flow grid (lambda = -inf) serves its own step and the corrector after it, no later step
        finite = [(a, lam) for a, lam in zip(x0s, lambdas) if math.isfinite(lam)]
        x0s, lambdas = [x0, *(a for a, _ in finite)][:order], [lambda_s, *(lam for _, lam in finite)][:order]
        # 2. UniP: predict x at grid[j + 1]; first order at the start, stepping down at the end
        this_order = min(order, len(grid) - 1 - j, len(x0s))
        x_prev, prev_order = x, this_order
        x = _unipc_step(x, x0s[:this_order], lambdas[:this_order], lambda_t=lambda_t, alpha_t=alpha_t,
                        ratio=sigma_t / sigma_s)  # fmt: skip
        x = _keep(process, x, grid[j + 1], noise, edit)
    return x.clamp(-1, 1) if clip_x0 else x


# --- Euler and Heun (Karras et al. 2022) ---------------------------------------------------------------------
def _karras_ode(
    model: ModelFn,
    process: Process,
    noise: Tensor,
    *,
    second_order: bool,
    steps: int,
    spacing: str | None,
    S_churn: float,
    S_tmin: float,
    S_tmax: float,
    S_noise: float,
    generator: Generators,
    clip_x0: bool,
    progress: bool,
    edit: Edit | None,
) -> Tensor:
    """Karras et al. 2022, Algorithm 2 (Heun, `second_order`) or its first-order Euler form.

    The ODE is integrated in the frame where it reads dx~/dsigma = (x~ - D(x~; sigma)) / sigma (EDM eq. 3 with
    s = 1): x~ = x / s and sigma = sigma_ode of `Process.ode_frame` (EDM: x, sigma; discrete: x / alpha,
    sigma / alpha; flow: x, t, where the ODE is dx/dt = v). Numbered as the paper's lines.
    """
    for name, value in (("S_churn", S_churn), ("S_tmin", S_tmin), ("S_noise", S_noise)):
        if value < 0:
            raise ConfigError(f"sampler.{name}={value} must be >= 0")
    if S_churn > 0 and not process.variance_exploding:
        raise ConfigError(
            f"sampler.S_churn={S_churn} adds noise in the form x0 + sigma eps, which only process=edm has "
            f"(this is process family {process.family!r}); use sampler.S_churn=0"
        )
    name = "Heun" if second_order else "Euler"
    grid = _grid(process, steps, spacing, name.lower(), edit)
    n = len(grid) - 1
    denoise = _denoiser(model, process, clip_x0)
    frames = [process.ode_frame(level) for level in grid[:-1]] + [(1.0, 0.0)]  # (s, sigma_ode); clean: (1, 0)
    # 1. x_0 ~ N(0, sigma_0^2 I) in the process's scale, then x~ = x / s
    x = _start(process, grid, noise, edit) / frames[0][0]
    for i in _progress(range(n), progress, name):
        (s_i, sigma_i), (s_next, sigma_next) = frames[i], frames[i + 1]
        level = grid[i]
        # 3-5. churn: raise sigma by gamma and add the matching noise (variance-exploding processes only)
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0.0
        if gamma > 0:
            sigma_hat = sigma_i * (1 + gamma)
            z = draw_noise(x.shape, generator=generator, device=x.device).to(x.dtype)
            x = x + math.sqrt(sigma_hat**2 - sigma_i**2) * S_noise * z
            sigma_i, level = sigma_hat, sigma_hat
        # 7-8. Euler step from sigma_i to sigma_next
        d = (x - denoise(s_i * x, level)) / sigma_i
        x_next = x + (sigma_next - sigma_i) * d
        # 9-11. Heun's correction with the slope at sigma_next, unless that is the clean end
        if second_order and grid[i + 1] is not None:
            d_next = (x_next - denoise(s_next * x_next, grid[i + 1])) / sigma_next
            x_next = x + (sigma_next - sigma_i) * (0.5 * d + 0.5 * d_next)
        x = _keep(process, x_next, grid[i + 1], noise, edit, scale=s_next)
    return x.clamp(-1, 1) if clip_x0 else x


@torch.no_grad()
def heun_sample(
    model: ModelFn,
    process: Process,
    noise: Tensor,
    *,
    steps: int = 18,
    spacing: str | None = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    generator: Generators = None,
    clip_x0: bool = False,
    progress: bool = False,
    edit: Edit | None = None,
) -> Tensor:
    """Heun's second-order method, Karras et al. 2022 Algorithm 2: 2 steps - 1 network evaluations.

    S_churn > 0 (EDM only) adds fresh noise at levels in [S_tmin, S_tmax]: gamma = min(S_churn / steps,
    sqrt(2) - 1), scaled by S_noise. The grid is the process's (EDM: Karras sigmas; flow: shifted uniform t;
    discrete: the timesteps of `spacing`).
    """
    return _karras_ode(model, process, noise, second_order=True, steps=steps, spacing=spacing, S_churn=S_churn,
                       S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, generator=generator, clip_x0=clip_x0,
                       progress=progress, edit=edit)  # fmt: skip


@torch.no_grad()
def euler_sample(
    model: ModelFn,
    process: Process,
    noise: Tensor,
    *,
    steps: int = 50,
    spacing: str | None = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    generator: Generators = None,
    clip_x0: bool = False,
    progress: bool = False,
    edit: Edit | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without lines 9-11): `steps`
    network evaluations; with S_churn = 0 the same update as DDIM with eta = 0. Churn as for `heun_sample`."""
    return _karras_ode(model, process, noise, second_order=False, steps=steps, spacing=spacing, S_churn=S_churn,
                       S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, generator=generator, clip_x0=clip_x0,
                       progress=progress, edit=edit)  # fmt: skip


def check_sampler(sampler: Callable[..., Tensor], process: Process) -> None:
    """Run `sampler` (options bound) on one pixel with a zero network, so that a sampler option or a
    sampler / process combination that cannot work raises its one-line ConfigError before any real work."""
    noise = torch.zeros(1, 1, 1, 1, device=process.device)
    sampler(lambda x, t: torch.zeros_like(x), process, noise, generator=torch.Generator(), progress=False)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpmpp": dpmpp_sample,
    "unipc": unipc_sample,
    "euler": euler_sample,
    "heun": heun_sample,
}
