"""Schedule math against closed forms."""

import math

import pytest
import torch

from diffusion.schedule import NoiseSchedule, make_betas

KINDS = ["linear", "cosine", "sigmoid"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_steps", [10, 1000])
def test_alpha_bar_is_monotone_in_unit_interval(kind, num_steps):
    s = NoiseSchedule(kind=kind, num_steps=num_steps)
    ab = s.alpha_bar.double()
    assert ab.shape == (num_steps,)
    assert (ab > 0).all() and (ab <= 1).all()
    assert (ab[1:] < ab[:-1]).all(), "alpha_bar must strictly decrease"
    assert ab[0] > 0.95 and ab[-1] < 0.05, "starts near data, ends near pure noise"


def test_linear_matches_ddpm():
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    ab = torch.cumprod(1 - betas, 0)
    s = NoiseSchedule(kind="linear", num_steps=1000)
    torch.testing.assert_close(s.alpha_bar.double(), ab, rtol=1e-6, atol=1e-7)
    # DDPM's alpha_bar_T for this schedule is about 4.0e-5.
    assert ab[-1].item() == pytest.approx(4.04e-5, rel=0.02)


def test_cosine_matches_closed_form():
    T, s_ = 1000, 0.008
    s = NoiseSchedule(kind="cosine", num_steps=T, cosine_s=s_)

    def f(t):
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    for t in [0, 100, 500, 900]:  # away from the clipped end; alpha_bar_t is f(t+1)/f(0)
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)


def test_sigmoid_matches_closed_form():
    T = 1000
    s = NoiseSchedule(kind="sigmoid", num_steps=T, sigmoid_start=-3, sigmoid_end=3, sigmoid_tau=1)

    def sig(z):
        return 1 / (1 + math.exp(-z))

    def ab(t):
        return (sig(3) - sig((t / T) * 6 - 3)) / (sig(3) - sig(-3))

    for t in [0, 250, 500, 800]:
        assert s.alpha_bar[t].item() == pytest.approx(ab(t + 1) / ab(0), rel=1e-5)


def test_q_sample_moments():
    s = NoiseSchedule(kind="linear", num_steps=1000)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    for t_ in [0, 300, 999]:
        t = torch.full((n,), t_)
        x_t = s.q_sample(x0, t, torch.randn(n, 1, generator=g))
        ab = s.alpha_bar[t_].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=5e-3)
        assert x_t.var().item() == pytest.approx(1 - ab, rel=2e-2, abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_conversions_round_trip(kind, prediction):
    s = NoiseSchedule(kind=kind, num_steps=1000, prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(64, 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(64, 3, 4, 4, generator=g)
    t = torch.randint(0, 990, (64,), generator=g)  # the very last steps make x0 ill-conditioned
    x_t = s.q_sample(x0, t, eps)
    out = s.target(x0, eps, t)
    x0_hat, eps_hat = s.to_x0_eps(out, x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)
    # and back: (x0, eps) -> output of the same kind
    torch.testing.assert_close(s.from_x0_eps(x0_hat, eps_hat, t), out, atol=1e-5, rtol=1e-5)


def test_v_definition():
    s = NoiseSchedule(kind="cosine", num_steps=100, prediction="v")
    x0, eps, t = torch.ones(1, 1), torch.full((1, 1), 2.0), torch.tensor([40])
    a, b = s.alpha_bar[40].sqrt().item(), (1 - s.alpha_bar[40]).sqrt().item()
    assert s.target(x0, eps, t).item() == pytest.approx(a * 2.0 - b * 1.0, rel=1e-6)


def test_min_snr_weights_at_known_points():
    t = torch.arange(1000)
    for prediction, expected in [
        ("eps", lambda snr: min(snr, 5.0) / snr),
        ("v", lambda snr: min(snr, 5.0) / (snr + 1)),
        ("x0", lambda snr: min(snr, 5.0)),
    ]:
        s = NoiseSchedule(kind="linear", num_steps=1000, prediction=prediction, min_snr_gamma=5.0)
        w = s.loss_weight(t)
        snr = s.snr(t)
        for i in [0, 100, 400, 999]:
            assert w[i].item() == pytest.approx(expected(snr[i].item()), rel=1e-5)
    # At SNR = gamma exactly, the eps weight is 1; for high SNR (early t) it is gamma / SNR < 1.
    s = NoiseSchedule(kind="linear", num_steps=1000, min_snr_gamma=5.0)
    assert s.loss_weight(torch.tensor([0])).item() == pytest.approx(5.0 / s.snr(torch.tensor([0])).item())
    assert s.loss_weight(torch.tensor([999])).item() == 1.0
    assert (NoiseSchedule(kind="linear").loss_weight(t) == 1).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="quadratic"), "schedule.kind"),
        (dict(prediction="score"), "schedule.prediction"),
        (dict(num_steps=0), "schedule.num_steps"),
        (dict(min_snr_gamma=-1.0), "schedule.min_snr_gamma"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)
