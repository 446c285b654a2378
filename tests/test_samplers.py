"""Samplers against closed forms and an independent implementation (diffusers), plus guidance and seeding."""

import pytest
import torch
from torch import nn

from diffusion.samplers import (
    ddim_sample,
    ddpm_sample,
    dpmpp_sample,
    draw_noise,
    fixed_noise,
    guided_model,
    image_generators,
    sampling_timesteps,
)
from diffusion.schedule import NoiseSchedule

MU, S = 0.3, 0.2  # data distribution N(MU, S^2) in every pixel


def exact_model(schedule: NoiseSchedule, mu: float = MU, s: float = S):
    """The Bayes-optimal network output for x0 ~ N(mu, s^2): E[x0 | x_t] in closed form, in the schedule's target."""

    def model(x_t, t):
        a = schedule.sqrt_alpha_bar[t].view(-1, 1, 1, 1)
        var = (1 - schedule.alpha_bar[t]).view(-1, 1, 1, 1)
        x0 = mu + a * s**2 / (a**2 * s**2 + var) * (x_t - a * mu)
        eps = (x_t - a * x0) / var.sqrt()
        return schedule.from_x0_eps(x0, eps, t)

    return model


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize(
    "sampler, kwargs",
    [
        (ddpm_sample, {}),
        (ddim_sample, dict(steps=1000)),
        (ddim_sample, dict(steps=1000, eta=1.0)),
        (dpmpp_sample, dict(steps=25, spacing="logsnr")),
        (dpmpp_sample, dict(steps=50, spacing="logsnr")),
        (dpmpp_sample, dict(steps=50, spacing="trailing")),
    ],
)
def test_samplers_recover_gaussian_moments(prediction, sampler, kwargs):
    schedule = NoiseSchedule(kind="cosine", num_steps=1000, prediction=prediction)
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = sampler(
        exact_model(schedule), schedule, noise, generator=torch.Generator().manual_seed(1), clip_x0=False, **kwargs
    )
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.03)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_dpmpp_converges_to_the_exact_ode_solution(prediction):
    """For Gaussian data the probability-flow ODE maps x_T to MU + S (x_T - a_T MU) / sqrt(a_T^2 S^2 + sigma_T^2).

    First order (= DDIM) shrinks its error ~4x from 10 to 40 steps; the second-order multistep is far closer.
    """
    schedule = NoiseSchedule(kind="linear", num_steps=1000, prediction=prediction)
    model, noise = exact_model(schedule), torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a, var = schedule.alpha_bar[-1].double().sqrt(), 1 - schedule.alpha_bar[-1].double()
    exact = MU + S * (noise.double() - a * MU) / (a**2 * S**2 + var).sqrt()

    def err(steps, order):
        x = dpmpp_sample(model, schedule, noise, steps=steps, order=order, spacing="logsnr", clip_x0=False)
        return (x - exact).abs().max().item()

    assert 3 < err(10, 1) / err(40, 1) < 5
    assert err(40, 2) < err(40, 1) / 10
    assert err(80, 2) < 1e-3
    ddim = ddim_sample(model, schedule, noise, steps=10, spacing="logsnr", clip_x0=False)
    order1 = dpmpp_sample(model, schedule, noise, steps=10, order=1, spacing="logsnr", clip_x0=False)
    torch.testing.assert_close(order1, ddim, atol=1e-5, rtol=0)


def test_single_point_data_is_hit_exactly():
    """Data that is one point c: every sampler must land on c (with clipping on, the default)."""
    schedule = NoiseSchedule(kind="cosine", num_steps=100, prediction="v")
    model = exact_model(schedule, mu=0.5, s=0.0)
    noise = torch.randn(16, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for x in (
        ddpm_sample(model, schedule, noise, generator=g),
        ddpm_sample(model, schedule, noise, steps=7, generator=g),
        ddim_sample(model, schedule, noise, steps=7, eta=0.5, generator=g),
        dpmpp_sample(model, schedule, noise, steps=7),
    ):
        torch.testing.assert_close(x, torch.full_like(x, 0.5), atol=1e-4, rtol=0)


def test_respaced_ddpm_equals_ddim_eta1():
    """DDPM respaced to k steps with beta-tilde variance is DDIM with eta=1 (Song et al. 2021, sec. 4.1)."""
    schedule = NoiseSchedule(kind="cosine", num_steps=200, prediction="eps")
    model, noise = exact_model(schedule), torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(0))
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
    model = exact_model(schedule)
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
    model = exact_model(schedule)
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
    # logsnr: uniform in lambda = log(alpha / sigma), so denser near t = 0 than linspace
    alpha_bar = NoiseSchedule(kind="linear", num_steps=1000).alpha_bar
    ts = sampling_timesteps(1000, 10, "logsnr", alpha_bar=alpha_bar)
    assert ts[0] == 999 and ts[-1] == 0 and ts == sorted(set(ts), reverse=True) and ts[-2] < 111
    lam = 0.5 * (alpha_bar / (1 - alpha_bar)).log()[ts]
    assert (lam.diff() - lam.diff().mean()).abs().max() < 0.05 * lam.diff().mean()


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
    x, t = torch.randn(4, 1, 2, 2), torch.tensor([5, 6, 7, 8])
    labels = torch.tensor([0, 1, 2, 1])
    cond, uncond = net(x, t, labels), net(x, t, torch.full((4,), 3))
    torch.testing.assert_close(guided_model(net, labels=labels, guidance=1.0)(x, t), cond)
    torch.testing.assert_close(guided_model(net, labels=labels, guidance=0.0)(x, t), uncond)
    torch.testing.assert_close(guided_model(net)(x, t), uncond)
    net.calls = 0
    out = guided_model(net, labels=labels, guidance=3.0)(x, t)
    assert net.calls == 1  # cond and uncond batched into one pass
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond))


def test_guidance_errors_name_the_problem():
    with pytest.raises(ValueError, match="label=3 is out of range"):
        guided_model(ToyConditionalNet(), labels=torch.tensor([0, 3]))
    unconditional = nn.Identity()
    with pytest.raises(ValueError, match="model is unconditional"):
        guided_model(unconditional, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="guidance=2.0 needs a class-conditional model"):
        guided_model(unconditional, guidance=2.0)


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
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule(kind="cosine", num_steps=1000, prediction=prediction)
    model = exact_model(schedule)
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
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule(kind=kind, num_steps=1000, prediction=prediction)
    model = exact_model(schedule)
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
