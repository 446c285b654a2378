"""Samplers against closed forms: with the exact denoiser for Gaussian data they must recover its moments."""

import pytest
import torch

from diffusion.samplers import ddim_sample, ddpm_sample, sampling_timesteps
from diffusion.schedule import NoiseSchedule

MU, S = 0.3, 0.2  # data distribution N(MU, S^2) in every pixel


def exact_model(schedule: NoiseSchedule):
    """The Bayes-optimal network output for x0 ~ N(MU, S^2): E[x0 | x_t] in closed form, in the schedule's target."""

    def model(x_t, t):
        a = schedule.sqrt_alpha_bar[t].view(-1, 1, 1, 1)
        var = (1 - schedule.alpha_bar[t]).view(-1, 1, 1, 1)
        x0 = MU + a * S**2 / (a**2 * S**2 + var) * (x_t - a * MU)
        eps = (x_t - a * x0) / var.sqrt()
        return schedule.from_x0_eps(x0, eps, t)

    return model


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize(
    "sampler, kwargs",
    [(ddpm_sample, {}), (ddim_sample, dict(steps=1000)), (ddim_sample, dict(steps=1000, eta=1.0))],
)
def test_samplers_recover_gaussian_moments(prediction, sampler, kwargs):
    schedule = NoiseSchedule(kind="cosine", num_steps=1000, prediction=prediction)
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = sampler(
        exact_model(schedule), schedule, noise, generator=torch.Generator().manual_seed(1), clip_x0=False, **kwargs
    )
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.03)


def test_ddim_eta0_is_deterministic_and_reproducible():
    schedule = NoiseSchedule(kind="linear", num_steps=100)
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(exact_model(schedule), schedule, noise, steps=10)
    b = ddim_sample(exact_model(schedule), schedule, noise, steps=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    c = ddpm_sample(exact_model(schedule), schedule, noise, generator=torch.Generator().manual_seed(3))
    d = ddpm_sample(exact_model(schedule), schedule, noise, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c, d)


def test_timestep_spacings():
    assert sampling_timesteps(1000, 10, "trailing") == list(range(999, 0, -100))
    assert sampling_timesteps(1000, 10, "leading") == list(range(900, -1, -100))
    assert sampling_timesteps(1000, 4, "linspace") == [999, 666, 333, 0]
    assert sampling_timesteps(10, 10, "trailing") == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="sampler.steps=0"):
        sampling_timesteps(1000, 0)
    with pytest.raises(ValueError, match="sampler.steps=1001"):
        sampling_timesteps(1000, 1001)
