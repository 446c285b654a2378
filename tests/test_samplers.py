"""Samplers against closed forms and an independent implementation (diffusers), plus guidance and seeding."""

import math

import pytest
import torch
from torch import nn

from diffusion.conditioning import ClassConditioning, NoConditioning
from diffusion.model import DiffusionModel
from diffusion.process.discrete import NoiseSchedule, sampling_timesteps
from diffusion.samplers import (
    ddim_sample,
    ddpm_sample,
    dpmpp_sample,
    draw_noise,
    fixed_noise,
    image_generators,
    unipc_sample,
)

KINDS = ["linear", "cosine", "sigmoid"]
PREDICTIONS = ["eps", "v", "x0"]


class Mixture:
    """Data x0 ~ sum_k w_k N(mu_k, s_k^2) in every pixel, independently: what a sampler should produce, in closed form.

    `model` is the Bayes-optimal network: E[x0 | x_t] (Tweedie), turned into the schedule's target. Since
    x_t = a x0 + sigma eps is again a mixture, N(a mu_k, a^2 s_k^2 + sigma^2), the posterior over the component
    and each component's Gaussian posterior mean are exact. `ode_solution` is where the probability-flow ODE
    takes x_T: in one dimension the flow is monotone and carries the marginal at T-1 onto the data, so it is the
    quantile map F_data^-1(F_{T-1}(x_T)) (for one Gaussian: mu + s (x_T - a mu) / sqrt(a^2 s^2 + sigma^2)).
    """

    def __init__(self, weights, means, stds):
        self.w, self.mu, self.s = (torch.tensor(v, dtype=torch.float64) for v in (weights, means, stds))

    def model(self, schedule: NoiseSchedule):
        def model(x_t, t):
            ab = schedule.alpha_bar[t].double().view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1): last dim = component
            a, var = ab.sqrt(), 1 - ab
            x = x_t.double()[..., None]  # (B, C, H, W, 1)
            total = a**2 * self.s**2 + var
            posterior = (self.w.log() - 0.5 * (x - a * self.mu) ** 2 / total - 0.5 * total.log()).softmax(-1)
            x0 = (posterior * (self.mu + a * self.s**2 / total * (x - a * self.mu))).sum(-1)  # (B, C, H, W)
            eps = (x_t.double() - a[..., 0] * x0) / var[..., 0].sqrt()
            return schedule.from_x0_eps(x0, eps, t).float()

        return model

    def cdf(self, x, alpha_bar):
        """CDF of x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
        a = torch.as_tensor(alpha_bar, dtype=torch.float64).sqrt()
        scale = (a**2 * self.s**2 + 1 - a**2).sqrt()
        return (self.w * torch.special.ndtr((x[..., None] - a * self.mu) / scale)).sum(-1)

    def ode_solution(self, schedule: NoiseSchedule, x_T):
        u = self.cdf(x_T.double(), schedule.alpha_bar[-1].double())
        lo, hi = torch.full_like(u, -5.0), torch.full_like(u, 5.0)
        for _ in range(60):  # bisection for F_data(x) = u, to float64 precision
            mid = (lo + hi) / 2
            below = self.cdf(mid, 1.0) < u
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2


MU, S = 0.3, 0.2
GAUSSIAN = Mixture([1.0], [MU], [S])
TWO_MODES = Mixture([0.4, 0.6], [-0.5, 0.3], [0.25, 0.2])


def exact_gaussian_moments(schedule, ts, step, mu=MU, s=S):
    """Exact (mean, std, corr with x_T) of a sampler's output for Gaussian data N(mu, s^2), from x_T ~ N(0, 1).

    The exact denoiser is affine, x0 = mu + k d with d = x_t - a mu and k = a s^2 / (a^2 s^2 + 1 - ab), so every
    DDPM / DDIM step is affine in d plus fresh noise: d' = A d + sigma z, with (A, sigma^2) = step(ab, ab', k).
    Mean, variance and covariance with x_T then follow step by step, with no sampling and no step-size error.
    """
    ab = schedule.alpha_bar.double().tolist()
    mean, var, cov = -math.sqrt(ab[ts[0]]) * mu, 1.0, 1.0  # d_T = x_T - a_T mu
    for j, t in enumerate(ts):
        ab_t, ab_next = ab[t], (ab[ts[j + 1]] if j + 1 < len(ts) else 1.0)
        k = math.sqrt(ab_t) * s**2 / (ab_t * s**2 + 1 - ab_t)
        A, noise_var = step(ab_t, ab_next, k)
        mean, var, cov = A * mean, A**2 * var + noise_var, A * cov
    return mu + mean, math.sqrt(var), cov / math.sqrt(var)


def ddim_step(eta):
    """DDIM (Song et al. 2021) eq. 12 with sigma from eq. 16, as (A, sigma^2) of `exact_gaussian_moments`."""

    def step(ab, ab_next, k):
        sigma2 = eta**2 * (1 - ab_next) / (1 - ab) * (1 - ab / ab_next)
        direction = math.sqrt(1 - ab_next - sigma2)  # the coefficient of eps = (x_t - a x0) / sqrt(1 - ab)
        a, a_next = math.sqrt(ab), math.sqrt(ab_next)
        return a_next * k + direction * (1 - a * k) / math.sqrt(1 - ab), sigma2

    return step


def ddpm_step(variance):
    """DDPM (Ho et al. 2020) eq. 6-7 respaced: posterior mean c1 x0 + c2 x_t, variance beta-tilde or beta."""

    def step(ab, ab_next, k):
        beta = 1 - ab / ab_next
        c1, c2 = math.sqrt(ab_next) * beta / (1 - ab), math.sqrt(1 - beta) * (1 - ab_next) / (1 - ab)
        noise_var = beta * (1 - ab_next) / (1 - ab) if variance == "beta_tilde" else beta
        return c1 * k + c2, noise_var if ab_next < 1 else 0.0

    return step


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    "sampler, kwargs, step",
    [
        (ddim_sample, dict(steps=100, eta=0.0), ddim_step(0.0)),
        (ddim_sample, dict(steps=100, eta=0.3), ddim_step(0.3)),
        (ddim_sample, dict(steps=50, eta=0.6, spacing="leading"), ddim_step(0.6)),
        (ddim_sample, dict(steps=100, eta=1.0), ddim_step(1.0)),
        (ddpm_sample, dict(), ddpm_step("beta_tilde")),
        (ddpm_sample, dict(steps=50), ddpm_step("beta_tilde")),
        (ddpm_sample, dict(steps=50, variance="beta"), ddpm_step("beta")),
    ],
)
def test_stochastic_samplers_match_exact_gaussian_moments(prediction, sampler, kwargs, step):
    """Mean, std and correlation with the starting noise, against their exact values for this step count.

    For Gaussian data every sigma that DDIM's eq. 12 uses consistently keeps the marginals right, so mean and
    std alone barely see a wrong sigma; how much of x_T survives to x_0 (the correlation) is set by it.
    """
    schedule = NoiseSchedule(kind="cosine", num_steps=1000, prediction=prediction)
    noise = torch.randn(10000, 1, 2, 2, generator=torch.Generator().manual_seed(0))  # 40000 samples
    x = sampler(
        GAUSSIAN.model(schedule),
        schedule,
        noise,
        generator=torch.Generator().manual_seed(1),
        clip_x0=False,
        **kwargs,
    ).double()
    ts = sampling_timesteps(1000, kwargs.get("steps") or 1000, kwargs.get("spacing", "trailing"))
    mean, std, corr = exact_gaussian_moments(schedule, ts, step)
    sample_corr = torch.corrcoef(torch.stack([x.flatten(), noise.double().flatten()]))[0, 1].item()
    # Sampling errors (1 standard error): mean 0.001, std 0.4%, corr 0.005.
    assert x.mean().item() == pytest.approx(mean, abs=0.004)
    assert x.std().item() == pytest.approx(std, rel=0.015)
    assert sample_corr == pytest.approx(corr, abs=0.02)


@pytest.mark.parametrize("step", [ddim_step(0.0), ddim_step(0.5), ddim_step(1.0), ddpm_step("beta_tilde")])
def test_exact_gaussian_moments_reach_the_data_with_small_steps(step):
    """The reference above: with all T = 4000 steps the output's moments are the data's, N(MU, S^2)."""
    schedule = NoiseSchedule(kind="cosine", num_steps=4000)
    mean, std, _ = exact_gaussian_moments(schedule, list(range(3999, -1, -1)), step)
    assert mean == pytest.approx(MU, abs=1e-3) and std == pytest.approx(S, rel=3e-3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_converges_to_the_exact_ode_solution(kind, prediction):
    """Two-mode data: DPM-Solver++(2M) on the logsnr grid approaches the exact flow map at second order.

    Doubling the steps cuts the error 2.8-8x on every schedule; a grid that wastes model calls where the cosine
    and sigmoid schedules' clipped last beta makes lambda jump gains only 1.7-2.3x from 10 to 20 steps.
    """
    schedule = NoiseSchedule(kind=kind, num_steps=1000, prediction=prediction)
    model, noise = TWO_MODES.model(schedule), torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = TWO_MODES.ode_solution(schedule, noise)

    def err(steps, order=2, spacing="logsnr"):
        x = dpmpp_sample(model, schedule, noise, steps=steps, order=order, spacing=spacing, clip_x0=False)
        return (x - exact).abs().max().item()

    e10, e20, e40 = err(10), err(20), err(40)
    assert e20 < e10 / 2.5 and e40 < e20 / 3.5, (e10, e20, e40)
    assert e40 < 0.01
    assert err(40, order=1) > 3 * e40  # the second-order correction matters
    if kind == "cosine":  # on exact two-mode data logsnr is at least as good as trailing with few steps
        assert e10 <= err(10, spacing="trailing")


def test_dpmpp_first_order_is_ddim():
    schedule = NoiseSchedule(kind="linear", num_steps=1000, prediction="eps")
    model, noise = TWO_MODES.model(schedule), torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = TWO_MODES.ode_solution(schedule, noise)
    order1 = [dpmpp_sample(model, schedule, noise, steps=n, order=1, spacing="logsnr", clip_x0=False) for n in (10, 40)]
    ratio = (order1[0] - exact).abs().max() / (order1[1] - exact).abs().max()
    assert 3 < ratio < 5, ratio  # first order: 4x the steps, ~4x smaller error
    ddim = ddim_sample(model, schedule, noise, steps=10, spacing="logsnr", clip_x0=False)
    torch.testing.assert_close(order1[0], ddim, atol=1e-5, rtol=0)


def recording(model):
    """`model` that also records every (t, x_t) a sampler calls it with."""
    calls = []

    def wrapped(x, t):
        calls.append((int(t[0]), x.clone()))
        return model(x, t)

    return wrapped, calls


@pytest.mark.parametrize(
    "sampler, kwargs",
    [
        (ddim_sample, dict(steps=7)),
        (ddim_sample, dict(steps=10, spacing="logsnr")),
        (dpmpp_sample, dict(steps=7, spacing="logsnr")),
        (dpmpp_sample, dict(steps=7)),
        (unipc_sample, dict(steps=7)),
        (unipc_sample, dict(steps=7, order=3, spacing="logsnr")),
        (ddpm_sample, dict()),
        (ddpm_sample, dict(steps=7)),
        (ddim_sample, dict(steps=7, eta=0.5)),
        (ddim_sample, dict(steps=7, eta=1.0, spacing="linspace")),
    ],
)
def test_point_data_every_step_is_on_the_forward_marginal(sampler, kwargs):
    """Data that is one point c: the denoiser is exact, so every x_t a sampler visits is a_t c + sigma_t eps_t.

    Deterministic samplers keep eps_t = eps_T for each sample (the ODE is a straight line in eps); stochastic
    ones must keep eps_t ~ N(0, 1) at every visited step. The final image is c.
    """
    c = 0.5
    schedule = NoiseSchedule(kind="cosine", num_steps=100, prediction="v")
    model, calls = recording(Mixture([1.0], [c], [0.0]).model(schedule))
    noise = torch.randn(4000, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    x = sampler(model, schedule, noise, generator=torch.Generator().manual_seed(1), **kwargs)
    torch.testing.assert_close(x, torch.full_like(x, c), atol=1e-4, rtol=0)
    ts = [t for t, _ in calls]
    assert ts == sampling_timesteps(
        100,
        kwargs.get("steps") or 100,
        kwargs.get("spacing", "trailing"),
        alpha_bar=schedule.alpha_bar,
    )
    ab = schedule.alpha_bar.double()
    eps_T = (noise.double() - ab[ts[0]].sqrt() * c) / (1 - ab[ts[0]]).sqrt()
    stochastic = sampler is ddpm_sample or kwargs.get("eta", 0) > 0
    for t, x_t in calls:
        if stochastic:  # 36000 samples: standard errors 0.005 (mean), 0.4% (std)
            eps_t = (x_t.double() - ab[t].sqrt() * c) / (1 - ab[t]).sqrt()
            assert abs(eps_t.mean().item()) < 0.02 and eps_t.std().item() == pytest.approx(1, rel=0.015), t
        else:
            closed_form = ab[t].sqrt() * c + (1 - ab[t]).sqrt() * eps_T
            torch.testing.assert_close(x_t.double(), closed_form, atol=1e-5, rtol=0, msg=f"t={t}")


def test_respaced_ddpm_equals_ddim_eta1():
    """DDPM respaced to k steps with beta-tilde variance is DDIM with eta=1 (Song et al. 2021, sec. 4.1)."""
    schedule = NoiseSchedule(kind="cosine", num_steps=200, prediction="eps")
    model, noise = GAUSSIAN.model(schedule), torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = ddpm_sample(model, schedule, noise, steps=13, spacing="leading", generator=torch.Generator().manual_seed(4))
    b = ddim_sample(
        model, schedule, noise, steps=13, spacing="leading", eta=1.0, generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sampler.steps=201"):
        ddpm_sample(model, schedule, noise, steps=201)
    with pytest.raises(ValueError, match="sampler.variance='sigma'"):
        ddpm_sample(model, schedule, noise, variance="sigma")
    with pytest.raises(ValueError, match="sampler.order=3"):
        dpmpp_sample(model, schedule, noise, order=3)


def test_deterministic_and_reproducible():
    schedule = NoiseSchedule(kind="linear", num_steps=100)
    model = GAUSSIAN.model(schedule)
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(model, schedule, noise, steps=10)
    b = ddim_sample(model, schedule, noise, steps=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(dpmpp_sample(model, schedule, noise, steps=10), dpmpp_sample(model, schedule, noise, steps=10))
    for sampler, kw in [(ddpm_sample, {}), (ddim_sample, dict(steps=10, eta=1.0))]:
        c = sampler(model, schedule, noise, generator=torch.Generator().manual_seed(3), **kw)
        d = sampler(model, schedule, noise, generator=torch.Generator().manual_seed(3), **kw)
        e = sampler(model, schedule, noise, generator=torch.Generator().manual_seed(4), **kw)
        assert torch.equal(c, d) and not torch.equal(c, e)


@pytest.mark.parametrize("sampler, kw", [(ddpm_sample, dict(steps=20)), (ddim_sample, dict(steps=10, eta=1.0))])
def test_per_image_generators_make_images_independent_of_batching(sampler, kw):
    schedule = NoiseSchedule(kind="linear", num_steps=100)
    model = GAUSSIAN.model(schedule)
    gens = image_generators(range(10, 16))
    noise = draw_noise((6, 1, 4, 4), generator=gens)
    torch.testing.assert_close(noise, fixed_noise(6, (1, 4, 4), seed=10), atol=0, rtol=0)
    whole = sampler(model, schedule, noise, generator=gens, **kw)
    parts = []
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:
        g = image_generators(range(10 + lo, 10 + hi))
        parts.append(sampler(model, schedule, draw_noise((hi - lo, 1, 4, 4), generator=g), generator=g, **kw))
    assert torch.equal(whole, torch.cat(parts))
    with pytest.raises(ValueError, match="3 per-image generators for a batch of 6"):
        draw_noise((6, 1), generator=gens[:3])


def test_timestep_spacings():
    assert sampling_timesteps(1000, 10, "trailing") == list(range(999, 0, -100))
    assert sampling_timesteps(1000, 10, "leading") == list(range(900, -1, -100))
    assert sampling_timesteps(1000, 4, "linspace") == [999, 666, 333, 0]
    assert sampling_timesteps(10, 10, "trailing") == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="sampler.steps=0"):
        sampling_timesteps(1000, 0)
    with pytest.raises(ValueError, match="sampler.steps=1001"):
        sampling_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="sampler.spacing='uniform'"):
        sampling_timesteps(1000, 10, "uniform")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [2, 5, 10, 20, 50, 100])
def test_logsnr_spacing_wastes_no_model_call(kind, steps):
    """Even in lambda = log(alpha / sigma) from t = T-2 to t = 0 (Lu et al. 2022), starting at T-1.

    The cosine and sigmoid schedules clip the last beta at 0.999, so lambda drops by 3.45 in the last step alone;
    no two model calls may sit much closer in lambda than the grid step h (whole timesteps allowing).
    """
    alpha_bar = NoiseSchedule(kind=kind, num_steps=1000).alpha_bar
    ts = sampling_timesteps(1000, steps, "logsnr", alpha_bar=alpha_bar)
    assert len(ts) == steps and ts[0] == 999 and ts[-1] == 0 and ts == sorted(set(ts), reverse=True)
    lam = 0.5 * (alpha_bar.double() / (1 - alpha_bar.double())).log()
    gaps = lam[ts].diff() / ((lam[0] - lam[998]) / (steps - 1))  # in units of h
    assert gaps[0] >= 1 - 1e-9  # the first step covers the clipped end too
    assert (gaps[1:] > 0.55).all(), (ts, gaps.tolist())
    if steps <= 20:  # few steps: every gap after the first is h, give or take rounding to a timestep
        assert (gaps[1:] > 0.75).all() and (gaps[1:] < 1.25).all(), (ts, gaps.tolist())
    if kind == "cosine" and steps == 20:
        assert sum(t >= 991 for t in ts) == 4  # 8 when the grid started at lambda_{T-1}


def test_logsnr_spacing_edge_cases():
    for kind in KINDS:
        for T in (1, 2, 3, 50):
            alpha_bar = NoiseSchedule(kind=kind, num_steps=T).alpha_bar
            assert sampling_timesteps(T, 1, "logsnr", alpha_bar=alpha_bar) == [T - 1]
            assert sampling_timesteps(T, T, "logsnr", alpha_bar=alpha_bar) == list(range(T - 1, -1, -1))
    with pytest.raises(ValueError, match="needs the schedule's alpha_bar"):
        sampling_timesteps(1000, 10, "logsnr")


# --- classifier-free guidance --------------------------------------------------------------------------------
class ToyConditionalNet(nn.Module):
    """out = x * (y + 1) + t: a different, easily computed output per class; counts its forward passes."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes)
        return x * (y.view(-1, 1, 1, 1) + 1) + t.view(-1, 1, 1, 1)


def test_guidance_combines_branches_in_one_forward():
    net = ToyConditionalNet()
    model = DiffusionModel(net=net, process=NoiseSchedule(num_steps=10))  # class labels: the net has num_classes
    x, t = torch.randn(4, 1, 2, 2), torch.tensor([5, 6, 7, 8])
    labels = model.conditioning(torch.tensor([0, 1, 2, 1]))
    cond, uncond = net(x, t, labels["y"]), net(x, t, torch.full((4,), 3))
    torch.testing.assert_close(model.denoiser(labels, guidance=1.0)(x, t), cond)
    torch.testing.assert_close(model.denoiser(labels, guidance=0.0)(x, t), uncond)
    torch.testing.assert_close(model.denoiser()(x, t), uncond)
    net.calls = 0
    out = model.denoiser(labels, guidance=3.0)(x, t)
    assert net.calls == 1  # cond and uncond batched into one pass
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond))


def test_guidance_errors_name_the_problem():
    with pytest.raises(ValueError, match="label=3 is out of range"):
        ClassConditioning(num_classes=3).conditions_from(label=[0, 3])
    with pytest.raises(ValueError, match="guidance=2.0 needs a label"):
        ClassConditioning(num_classes=3).conditions_from(guidance=2.0)
    unconditional = NoConditioning()
    with pytest.raises(ValueError, match="model is unconditional"):
        unconditional.conditions_from(label=[0])
    with pytest.raises(ValueError, match="guidance=2.0 needs a class-conditional model"):
        unconditional.conditions_from(guidance=2.0)


# --- cross-check against diffusers -------------------------------------------------------------------------
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def run_diffusers(scheduler, model, noise, steps, **step_kwargs):
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        out = model(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize(
    "prediction, spacing, steps, eta, clip",
    [
        ("eps", "trailing", 10, 0.0, False),
        ("v", "leading", 25, 0.0, True),
        ("x0", "trailing", 8, 0.0, False),  # diffusers steps by T // steps, so only exact divisors agree
        ("eps", "trailing", 10, 1.0, True),
    ],
)
def test_ddim_matches_diffusers(prediction, spacing, steps, eta, clip):
    import diffusers  # a dev dependency: missing, these tests fail rather than skip

    schedule = NoiseSchedule(kind="cosine", num_steps=1000, prediction=prediction)
    model = GAUSSIAN.model(schedule)
    noise = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.numpy(),
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        timestep_spacing=spacing,
        clip_sample=clip,
        set_alpha_to_one=True,
        steps_offset=0,
    )
    theirs = run_diffusers(scheduler, model, noise, steps, eta=eta, generator=torch.Generator().manual_seed(1))
    ours = ddim_sample(
        model,
        schedule,
        noise,
        steps=steps,
        eta=eta,
        spacing=spacing,
        clip_x0=clip,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "prediction, kind, steps", [("eps", "linear", 10), ("eps", "linear", 30), ("v", "cosine", 25), ("x0", "cosine", 20)]
)
def test_dpmpp_matches_diffusers(prediction, kind, steps):
    # (eps on the cosine schedule is left out: at t = T-1 its alpha is ~1e-5, so converting eps to x0 in float32
    # amplifies rounding of alpha_bar, which diffusers accumulates in float32 and we in float64, past 1e-4.)
    import diffusers  # a dev dependency: missing, these tests fail rather than skip

    schedule = NoiseSchedule(kind=kind, num_steps=1000, prediction=prediction)
    model = GAUSSIAN.model(schedule)
    noise = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.numpy(),
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        timestep_spacing="trailing",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    theirs = run_diffusers(scheduler, model, noise, steps)
    ours = dpmpp_sample(model, schedule, noise, steps=steps, spacing="trailing", clip_x0=False)
    assert not torch.allclose(ours, ddim_sample(model, schedule, noise, steps=steps, clip_x0=False), atol=1e-3)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "prediction, kind, steps, order",
    [("eps", "linear", 10, 2), ("v", "cosine", 25, 3), ("x0", "linear", 7, 3), ("v", "linear", 4, 2)],
)
def test_unipc_matches_diffusers(prediction, kind, steps, order):
    """UniPC (bh2, data prediction, corrector on every step but the last) against diffusers' default
    `UniPCMultistepScheduler` on the same betas and grid, with a nonlinear exact denoiser (two-mode data), so
    every history term and corrector weight enters."""
    import diffusers  # a dev dependency: missing, these tests fail rather than skip

    schedule = NoiseSchedule(kind=kind, num_steps=1000, prediction=prediction)
    model = TWO_MODES.model(schedule)
    noise = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.numpy(),
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        solver_order=order,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="trailing",
    )
    theirs = run_diffusers(scheduler, model, noise, steps)
    ours = unipc_sample(model, schedule, noise, steps=steps, order=order, spacing="trailing", clip_x0=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    for other in (  # the corrector and the order both change the result
        unipc_sample(
            model, schedule, noise, steps=steps, order=order, corrector=False, spacing="trailing", clip_x0=False
        ),
        dpmpp_sample(model, schedule, noise, steps=steps, spacing="trailing", clip_x0=False),
    ):
        assert not torch.allclose(ours, other, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_unipc_converges_to_the_exact_ode_solution(kind):
    """Two-mode data on the logsnr grid: UniPC (order 2 + corrector) cuts the error > 3.5x from 10 to 20 steps
    (6.7-12x measured; DPM-Solver++(2M) 2.3-4x) and is > 1.5x closer than DPM-Solver++(2M) at 20 steps; order 3 too
    reaches the exact map."""
    schedule = NoiseSchedule(kind=kind, num_steps=1000, prediction="v")
    model, noise = TWO_MODES.model(schedule), torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = TWO_MODES.ode_solution(schedule, noise)

    def err(sampler, steps, **kw):
        x = sampler(model, schedule, noise, steps=steps, spacing="logsnr", clip_x0=False, **kw)
        return (x - exact).abs().max().item()

    e10, e20, e40 = (err(unipc_sample, n) for n in (10, 20, 40))
    assert e20 < e10 / 3.5 and e40 < 0.005, (e10, e20, e40)
    assert e20 < err(dpmpp_sample, 20) / 1.5, (e20, err(dpmpp_sample, 20))
    assert err(unipc_sample, 40, order=3) < 0.005
