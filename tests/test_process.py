"""The process seam: EDM and flow matching against closed forms, every sampler on every family against the exact
probability-flow map, cross-checks with diffusers' Euler / Heun / EDM / flow-matching schedulers, and checkpoints
that describe their family."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.checkpoint import check_description, flat_description, read_checkpoint
from diffusion.errors import BadFileError, ConfigError
from diffusion.process import EDM, Flow, build_process, karras_sigmas, shift_time
from diffusion.process.discrete import NoiseSchedule
from diffusion.samplers import (
    SAMPLERS,
    check_sampler,
    ddim_sample,
    dpmpp_sample,
    euler_sample,
    heun_sample,
    unipc_sample,
)
from tests.conftest import TINY, run_cli, run_train
from tests.test_resume import assert_same_tensors
from tests.test_samplers import TWO_MODES, Mixture

G = torch.Generator


def exact_model(mixture: Mixture, process):
    """The Bayes-optimal network of `process` for mixture data: E[x0 | x_t] (Tweedie) as the network's output.

    It undoes what the process gives the network (`from_net_input`), so it also checks that a sampler calls the
    model on the process's network input (EDM: c_in x and c_noise; flow: x_t and 1000 t).
    """

    def model(x_in, t_in):
        x, level = process.from_net_input(x_in.double(), t_in.double() if t_in.is_floating_point() else t_in)
        a, s = (v.double().view(-1, 1, 1, 1, 1) for v in process.alpha_sigma(level))  # last dim: component
        xc = x[..., None]
        total = a**2 * mixture.s**2 + s**2
        posterior = (mixture.w.log() - 0.5 * (xc - a * mixture.mu) ** 2 / total - 0.5 * total.log()).softmax(-1)
        x0 = (posterior * (mixture.mu + a * mixture.s**2 / total * (xc - a * mixture.mu))).sum(-1)
        return process.output_from_x0(x0, x, level).float()

    return model


def exact_flow_map(mixture: Mixture, x, alpha: float, sigma: float):
    """Where the probability-flow ODE takes x from the marginal alpha x0 + sigma eps: F_data^-1(F(x)) in 1-D."""

    def cdf(v, a, s):
        scale = (a**2 * mixture.s**2 + s**2).sqrt()
        return (mixture.w * torch.special.ndtr((v[..., None] - a * mixture.mu) / scale)).sum(-1)

    a, s = torch.tensor(alpha, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    u = cdf(x.double(), a, s)
    lo, hi = torch.full_like(u, -5.0), torch.full_like(u, 5.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = cdf(mid, torch.ones(()), torch.zeros(())) < u
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def ode_error(process, sampler, steps, noise, **kw):
    """Largest deviation of `sampler` from the exact flow map of TWO_MODES, started where the sampler starts."""
    first = process.sampling_levels(steps, kw.get("spacing"), sampler="heun")[0]
    x_start = noise.double() * process.initial_scale(first)
    exact = exact_flow_map(TWO_MODES, x_start, *process.alpha_sigma64(first))
    x = sampler(exact_model(TWO_MODES, process), process, noise, steps=steps, clip_x0=False, **kw)
    return (x.double() - exact).abs().max().item()


NOISE = torch.randn(256, 1, 2, 2, generator=G().manual_seed(0))


# --- closed forms ----------------------------------------------------------------------------------------
def test_edm_preconditioning_gives_unit_variance_input_and_target():
    """Karras et al. 2022, Table 1 / appendix B.6: for data of std sigma_data, c_in x and F's target have unit
    variance at every sigma, and lambda(sigma) c_out^2 = 1."""
    edm = EDM(sigma_data=0.5)
    x0 = 0.5 * torch.randn(200_000, generator=G().manual_seed(0)).view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=G().manual_seed(1))
    for sigma in (0.002, 0.05, 0.5, 3.0, 80.0):
        level = torch.full((x0.shape[0],), sigma)
        x = edm.q_sample(x0, level, noise)
        torch.testing.assert_close(x, x0 + sigma * noise)
        x_in, c_noise = edm.net_input(x, level)
        assert x_in.std().item() == pytest.approx(1, rel=0.01), sigma
        assert c_noise[0].item() == pytest.approx(math.log(sigma) / 4, rel=1e-6)
        target = edm.target(x0, noise, level)
        assert target.std().item() == pytest.approx(1, rel=0.01), sigma
        # the target is the F that makes D exact, and the weight is lambda c_out^2 = 1
        torch.testing.assert_close(edm.to_x0(target, x, level), x0, atol=1e-4 * max(sigma, 1), rtol=0)
        lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        assert edm.edm_lambda(torch.tensor(sigma)).item() == pytest.approx(lam, rel=1e-6)
        torch.testing.assert_close(edm.loss_weight(level[:3]), torch.ones(3))
        back_x, back_level = edm.from_net_input(x_in[:4], c_noise[:4])
        torch.testing.assert_close(back_level, level[:4], rtol=1e-5, atol=0)
        torch.testing.assert_close(back_x, x[:4], rtol=1e-5, atol=1e-5)


def test_edm_training_sigma_is_lognormal_and_validation_buckets_are_its_quantiles():
    edm = EDM(P_mean=-1.2, P_std=1.2)
    log_sigma = edm.draw_levels(100_000, device=torch.device("cpu"), generator=G().manual_seed(0)).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.02) and log_sigma.std().item() == pytest.approx(
        1.2, rel=0.02
    )
    names = edm.bucket_names(4)
    median = math.exp(-1.2)
    assert names[1].endswith(f"-{median:.3g}") and names[0].startswith("sigma0-") and names[-1].endswith("-inf")
    bucket = torch.arange(8) % 4
    levels = edm.val_levels(bucket, torch.full((8,), 0.5), 4)
    assert (levels[1::4] < median).all() and (levels[2::4] > median).all()


def test_flow_interpolation_target_and_time_distributions():
    flow = Flow(t_sampling="logit_normal", logit_mean=0.5, logit_std=0.8, shift=3.0)
    x0, noise = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    t = torch.tensor([0.0, 0.25, 0.7, 1.0])
    x = flow.q_sample(x0, t, noise)
    torch.testing.assert_close(x, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise)
    v = flow.target(x0, noise, t)
    torch.testing.assert_close(v, noise - x0)
    torch.testing.assert_close(flow.to_x0(v, x, t), x0, atol=1e-6, rtol=0)  # x0 = x_t - t v
    torch.testing.assert_close(flow.output_from_x0(x0[1:], x[1:], t[1:]), v[1:], atol=1e-5, rtol=0)
    assert torch.equal(flow.net_input(x, t)[1], 1000 * t)
    logit = torch.logit(flow.draw_levels(100_000, device=torch.device("cpu"), generator=G().manual_seed(0)))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02) and logit.std().item() == pytest.approx(0.8, rel=0.02)
    uniform = Flow(t_sampling="uniform")
    assert uniform.bucket_names(4) == ["t0-0.25", "t0.25-0.5", "t0.5-0.75", "t0.75-1"]
    # SD3's shift of the sampling grid: t' = shift t / (1 + (shift - 1) t), 10 equal steps in t before the shift
    grid = torch.tensor(flow.sampling_levels(10, None, sampler="euler"), dtype=torch.float64)
    u = torch.linspace(1, 0, 11, dtype=torch.float64)[:-1]
    torch.testing.assert_close(grid, 3 * u / (1 + 2 * u))
    torch.testing.assert_close(shift_time(u, 1.0), u)


def test_karras_grid():
    """Karras et al. 2022, eq. 5: rho = 7 between sigma_max and sigma_min; sigma_i^(1/rho) evenly spaced."""
    sigmas = torch.tensor(karras_sigmas(18, 0.002, 80.0, 7.0), dtype=torch.float64)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-1].item() == pytest.approx(0.002)
    steps = sigmas ** (1 / 7)
    torch.testing.assert_close(steps.diff(), torch.full((17,), steps.diff()[0].item(), dtype=torch.float64))
    assert EDM().sampling_levels(18, None, sampler="heun") == sigmas.tolist()


# --- samplers on every family ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["edm", "flow"])
def test_ode_samplers_converge_to_the_exact_flow_map(family):
    """Two-mode data, exact denoiser: Heun is second order (doubling the steps cuts the error ~4x), Euler and
    DDIM first order and identical, DPM-Solver++(2M) far ahead of Euler at equal model calls."""
    process = EDM() if family == "edm" else Flow()
    heun = [ode_error(process, heun_sample, n, NOISE) for n in (16, 32, 64)]
    assert heun[1] < heun[0] / 3.5 and heun[2] < heun[1] / 3.5, heun
    assert heun[2] < 5e-3
    euler = [ode_error(process, euler_sample, n, NOISE) for n in (32, 64)]
    assert 1.6 < euler[0] / euler[1] < 2.4, euler  # first order
    assert heun[2] < euler[1] / 5  # 127 model calls of Heun against 64 of Euler: far closer all the same
    dpmpp = ode_error(process, dpmpp_sample, 64, NOISE)
    assert dpmpp < euler[1] / 4, (dpmpp, euler)
    model = exact_model(TWO_MODES, process)
    torch.testing.assert_close(
        ddim_sample(model, process, NOISE, steps=16, clip_x0=False),
        euler_sample(model, process, NOISE, steps=16),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("family", ["edm", "flow"])
def test_unipc_converges_to_the_exact_flow_map(family):
    """UniPC on EDM's Karras grid and flow's uniform t (lambda = -inf at t = 1): it reaches the exact flow map of
    two-mode data, many-step Heun's answer, at high order, and is far ahead of DPM-Solver++(2M) at few steps."""
    process = EDM() if family == "edm" else Flow()
    unipc = [ode_error(process, unipc_sample, n, NOISE) for n in (8, 16, 32)]
    dpmpp = [ode_error(process, dpmpp_sample, n, NOISE) for n in (16, 32)]
    assert unipc[1] < unipc[0] / 2.5 and unipc[2] < unipc[1] / 3.5, unipc  # measured 3.1x / 8.7x (edm), 6.1x / 5.5x
    assert unipc[1] < dpmpp[0] and unipc[2] < 0.7 * dpmpp[1], (unipc, dpmpp)
    assert ode_error(process, unipc_sample, 32, NOISE, order=3) < 5e-3
    assert ode_error(process, heun_sample, 64, NOISE) < 5e-3  # many-step Heun: the same exact answer


def test_heun_and_euler_on_a_discrete_schedule():
    """On a VP schedule the ODE is integrated in x / alpha and sigma / alpha (Karras et al. 2022, sec. 3): Heun
    is second order there too (on the logsnr grid), and Euler is DDIM."""
    schedule = NoiseSchedule(kind="linear", num_steps=1000, prediction="eps")
    model = exact_model(TWO_MODES, schedule)
    exact = exact_flow_map(TWO_MODES, NOISE, *schedule.alpha_sigma64(999))

    def err(sampler, steps):
        x = sampler(model, schedule, NOISE, steps=steps, spacing="logsnr", clip_x0=False)
        return (x.double() - exact).abs().max().item()

    heun = [err(heun_sample, n) for n in (20, 40, 80)]
    assert heun[1] < heun[0] / 3.5 and heun[2] < heun[1] / 3.5 and heun[1] < err(euler_sample, 40) / 5, heun
    torch.testing.assert_close(
        euler_sample(model, schedule, NOISE, steps=10, clip_x0=False),
        ddim_sample(model, schedule, NOISE, steps=10, clip_x0=False),
        atol=1e-5,
        rtol=0,
    )


def data_moments(mixture: Mixture) -> tuple[float, float]:
    mean = (mixture.w * mixture.mu).sum().item()
    return mean, math.sqrt((mixture.w * (mixture.s**2 + mixture.mu**2)).sum().item() - mean**2)


@pytest.mark.parametrize("family", ["edm", "flow"])
def test_stochastic_samplers_approach_the_data_distribution(family):
    """DDPM = DDIM eta=1 on EDM and flow too; the output's std approaches the data's at first order in the steps."""
    process = EDM() if family == "edm" else Flow()
    model, noise = exact_model(TWO_MODES, process), torch.randn(20000, 1, 1, 1, generator=G().manual_seed(0))
    mean, std = data_moments(TWO_MODES)
    errors = []
    for steps in (100, 400):
        x = SAMPLERS["ddpm"](model, process, noise, steps=steps, generator=G().manual_seed(1), clip_x0=False)
        eta1 = ddim_sample(model, process, noise, steps=steps, eta=1.0, generator=G().manual_seed(1), clip_x0=False)
        torch.testing.assert_close(x, eta1, atol=1e-5, rtol=0)
        errors.append(abs(x.std().item() - std))
    assert errors[1] < errors[0] / 2.5 and errors[1] < 0.015 * std, errors
    assert x.mean().item() == pytest.approx(mean, abs=0.008)


def test_heun_with_churn_samples_the_data_distribution():
    """EDM Algorithm 2 with S_churn: stochastic, and the moments of two-mode data with 80 steps."""
    edm = EDM()
    model, noise = exact_model(TWO_MODES, edm), torch.randn(20000, 1, 1, 1, generator=G().manual_seed(0))
    churn = dict(steps=80, S_churn=10, S_tmin=0.05, S_tmax=50)
    x = heun_sample(model, edm, noise, generator=G().manual_seed(1), **churn)
    mean, std = data_moments(TWO_MODES)
    assert x.mean().item() == pytest.approx(mean, abs=0.01) and x.std().item() == pytest.approx(std, rel=0.015)
    other = heun_sample(model, edm, noise[:8], generator=G().manual_seed(2), **churn)
    assert not torch.allclose(other, x[:8], atol=1e-3)
    assert torch.equal(heun_sample(model, edm, noise[:8], generator=G().manual_seed(2), **churn), other)


def test_invalid_combinations_are_one_line_config_errors():
    edm, flow, discrete = EDM(), Flow(), NoiseSchedule(num_steps=50)
    cases = [
        (lambda: check_sampler(lambda *a, **k: heun_sample(*a, S_churn=10, **k), flow), "sampler.S_churn=10"),
        (lambda: check_sampler(lambda *a, **k: euler_sample(*a, S_churn=5, **k), discrete), "sampler.S_churn=5"),
        (lambda: check_sampler(SAMPLERS["ddpm"], edm), "sampler.steps=null on process=edm"),
        (lambda: check_sampler(lambda *a, **k: ddim_sample(*a, spacing="trailing", **k), edm), "process=edm"),
        (lambda: check_sampler(lambda *a, **k: dpmpp_sample(*a, spacing="karras", **k), discrete), "spacing='karras'"),
        (lambda: check_sampler(lambda *a, **k: heun_sample(*a, spacing="logsnr", **k), flow), "process=flow"),
        (lambda: Flow(t_sampling="beta"), "process.t_sampling='beta'"),
        (lambda: EDM(sigma_min=1.0, sigma_max=0.5), "process.sigma_max=0.5"),
    ]
    for make, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as e:
            make()
        assert "\n" not in str(e.value)
    check_sampler(lambda *a, **k: heun_sample(*a, S_churn=10, **k), edm)  # churn on EDM is fine


# --- cross-checks against diffusers ---------------------------------------------------------------------------
def run_scheduler(scheduler, model, x, *, to_net_time=lambda t: t, **step_kwargs):
    """The standard diffusers loop: scale the input, call the model, step."""
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = model(x_in, to_net_time(t).expand(x.shape[0]))
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def test_edm_euler_matches_diffusers_edm_euler_scheduler():
    import diffusers  # a dev dependency: missing, these tests fail rather than skip

    edm = EDM(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    theirs = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    theirs.set_timesteps(12)
    ours = torch.tensor(edm.sampling_levels(12, None, sampler="euler"), dtype=torch.float64)
    torch.testing.assert_close(theirs.sigmas[:-1].double(), ours, rtol=1e-6, atol=0)
    model = exact_model(TWO_MODES, edm)
    # diffusers' init_noise_sigma is sqrt(sigma_max^2 + 1); EDM (Algorithm 1) starts from sigma_max noise
    # diffusers' scale_model_input gives c_in x, and its timesteps are c_noise: exactly what our model takes.
    ref = run_scheduler(theirs, model, NOISE * 80.0)
    torch.testing.assert_close(euler_sample(model, edm, NOISE, steps=12), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_discrete_euler_and_heun_match_diffusers(prediction):
    """In x / alpha and sigma / alpha, as diffusers' `EulerDiscreteScheduler` and `HeunDiscreteScheduler`.

    (The linear schedule: on cosine, sigma / alpha is 2e4 at t = T-1, and Heun's first correction multiplies the
    float32 rounding of both implementations by that step, so they part by ~1 though both compute the same thing.)
    """
    import diffusers

    schedule = NoiseSchedule(kind="linear", num_steps=1000, prediction=prediction)
    model = exact_model(TWO_MODES, schedule)
    common = dict(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.numpy(),
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
        timestep_spacing="trailing",
    )
    pairs = ((euler_sample, diffusers.EulerDiscreteScheduler, 10), (heun_sample, diffusers.HeunDiscreteScheduler, 8))
    for ours, cls, steps in pairs:
        scheduler = cls(**common)
        scheduler.set_timesteps(steps)
        start = NOISE * scheduler.init_noise_sigma
        ref = run_scheduler(scheduler, model, start, to_net_time=lambda t: t.round().long())
        torch.testing.assert_close(
            ours(model, schedule, NOISE, steps=steps, spacing="trailing"), ref, atol=2e-4, rtol=0
        )


def test_flow_euler_matches_diffusers_flow_match_scheduler_with_shift():
    import diffusers

    flow = Flow(shift=3.0)
    model = exact_model(TWO_MODES, flow)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, 13)[:-1].tolist())
    grid = torch.tensor(flow.sampling_levels(12, None, sampler="euler"))
    torch.testing.assert_close(scheduler.sigmas[:-1], grid, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scheduler.timesteps, 1000 * grid, rtol=1e-6, atol=1e-4)
    ref = run_scheduler(scheduler, model, NOISE.clone())
    torch.testing.assert_close(euler_sample(model, flow, NOISE, steps=12), ref, atol=1e-4, rtol=0)


# --- descriptions ---------------------------------------------------------------------------------------------
def test_descriptions_rebuild_every_family_and_old_ones_are_discrete():
    net = {"target": "diffusion.unet.UNet", "config": {}}
    for process in (EDM(sigma_data=0.6), Flow(shift=2.0, t_sampling="uniform"), NoiseSchedule(kind="cosine")):
        description = {"format": 1, "net": net, "schedule": process.description()}
        check_description(description, source="x")
        rebuilt = build_process(description["schedule"])
        assert type(rebuilt) is type(process) and rebuilt.config == process.config
    old = {"format": 1, "net": net, "schedule": dict(NoiseSchedule(kind="sigmoid").config)}  # before families
    check_description(old, source="x")
    assert isinstance(build_process(old["schedule"]), NoiseSchedule)
    assert flat_description(old)["process.family"] == "discrete"
    with pytest.raises(BadFileError, match="family 'vp'"):
        check_description({**old, "schedule": {"family": "vp"}}, source="x")
    with pytest.raises(BadFileError, match=r"EDM does not take: \['kind'\]"):
        check_description({**old, "schedule": {"family": "edm", "kind": "linear"}}, source="x")
    # today's format names it "process"
    new = {"format": 2, "net": net, "process": EDM().description()}
    assert check_description(new, source="x") == new and flat_description(new)["process.family"] == "edm"
    assert check_description(old, source="x")["process"] == old["schedule"]
    with pytest.raises(BadFileError, match="family 'vp'"):
        check_description({**new, "process": {"family": "vp"}}, source="x")


# --- end to end through train.py / sample.py / export.py --------------------------------------------------------
# conftest's TINY without its discrete-only schedule.num_steps
E2E = [t for t in TINY if not t.startswith("process")] + [
    "logger=csv",
    "trainer.deterministic=true",
]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["edm", "flow"])
def test_train_resume_sample_init_from_and_export(tmp_path, family):
    """process=edm / flow: train, resume exactly (as tests/test_resume.py), sample.py, init_from, safetensors."""
    from diffusion.export import export
    from diffusion.model import DiffusionModel

    overrides = [*E2E, f"process={family}", "model.dropout=0.1"]  # the network's dropout is on the stream too
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(straight, [*overrides, "trainer.max_steps=4"], tiny=False)
    run_train(split, [*overrides, "trainer.max_steps=2"], tiny=False)
    run_train(split, [*overrides, "trainer.max_steps=4", f"ckpt_path={split}"], tiny=False)
    a, b = (read_checkpoint(str(run / "checkpoints" / "last.ckpt")) for run in (straight, split))
    assert a["global_step"] == b["global_step"] == 4 and a["diffusion"]["process"]["family"] == family
    for key in ("state_dict", "ema_state_dict", "optimizer_states", "training_rng"):
        assert_same_tensors(a[key], b[key], key)
    header = (straight / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    buckets = [h for h in header if h.startswith("val/loss_")]
    assert "val/loss" in header and len(buckets) == 10
    assert all(h.startswith("val/loss_sigma" if family == "edm" else "val/loss_t0") for h in buckets), buckets

    sampler = "heun" if family == "edm" else "euler"
    out = tmp_path / "samples"
    result = run_cli("sample.py", f"ckpt={straight}", "n=3", f"sampler={sampler}", "sampler.steps=3", f"out={out}")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    bad = run_cli("sample.py", f"ckpt={straight}", "sampler=ddpm", f"out={tmp_path / 'bad'}")
    assert bad.returncode == 1 and f"sampler.steps=null on process={family}" in bad.stderr
    assert not (tmp_path / "bad").exists()  # refused before the output folder was made

    tuned = tmp_path / "tuned"
    run_train(tuned, [*overrides, f"init_from={straight}", "trainer.max_steps=1"], tiny=False)
    assert read_checkpoint(str(tuned / "checkpoints" / "last.ckpt"))["diffusion"] == a["diffusion"]

    export(straight / "checkpoints" / "last.ckpt", tmp_path / "st", format="safetensors")
    loaded = DiffusionModel.from_export(tmp_path / "st")
    assert loaded.process.family == family and loaded.process.config == build_process(a["diffusion"]["process"]).config


@pytest.mark.slow
@pytest.mark.parametrize("family", ["edm", "flow"])
def test_diffusers_export_reproduces_our_euler_sampler(tmp_path, family):
    """EDM -> EDMEulerScheduler, flow -> FlowMatchEulerDiscreteScheduler: the exported unet and scheduler, run in
    diffusers' scheduler loop, give our euler_sample's images for the same noise."""
    import diffusers

    from diffusion.export import export
    from diffusion.model import DiffusionModel
    from tests.test_diffusers_unet import save_tiny_unet

    save_tiny_unet(tmp_path / "pretrained")
    run = tmp_path / "run"
    quiet = [
        "callbacks.sample_grid.every_n_steps=0",
        "trainer.max_steps=2",
        "logger=none",
        "+trainer.limit_val_batches=1",
    ]
    model = ["model=diffusers_unet", f"model.pretrained={tmp_path / 'pretrained'}", "data.batch_size=4"]
    knob = "process.shift=3.0" if family == "flow" else "process.rho=5"
    run_train(run, [*E2E, f"process={family}", knob, *model, *quiet], tiny=False)
    ckpt = run / "checkpoints" / "last.ckpt"
    ours = DiffusionModel.from_checkpoint(ckpt)
    export(ckpt, tmp_path / "out", format="diffusers")
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "out"))
    noise = torch.randn(2, 1, 16, 16, generator=G().manual_seed(0))
    steps = 6
    if family == "edm":
        assert isinstance(pipe.scheduler, diffusers.EDMEulerScheduler) and pipe.scheduler.config.rho == 5
        pipe.scheduler.set_timesteps(steps)
        start = noise * ours.process.sigma_max
    else:
        assert (
            isinstance(pipe.scheduler, diffusers.FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3
        )
        pipe.scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
        start = noise
    with torch.no_grad():
        theirs = run_scheduler(pipe.scheduler, lambda x, t: pipe.unet(x, t).sample, start)
        expected = euler_sample(lambda x, t: ours.net(x, t), ours.process, noise, steps=steps)
    assert (theirs - expected).abs().max() < 1e-4
    if family == "flow":  # DDPMPipeline itself runs: Euler on diffusers' own grid (close to ours, not equal)
        images = pipe(batch_size=1, num_inference_steps=steps, output_type="np").images
        assert images.shape == (1, 16, 16, 1)
