"""Schedule math against closed forms."""

import copy as copy_module
import math
import pickle

import pytest
import torch
from torch import nn

from diffusion.process.discrete import NoiseSchedule, sampling_timesteps

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


def _cumprod(betas: list[float]) -> list[float]:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), by hand in Python floats."""
    out, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        out.append(prod)
    return out


@pytest.mark.parametrize("T", [1000, 250])
def test_linear_matches_ddpm(T):
    """DDPM (Ho et al. 2020, sec. 4): beta linear from 1e-4 to 0.02 over T = 1000 steps; other T scale both ends
    by 1000 / T (improved-diffusion), so 250 steps run from 4e-4 to 0.08."""
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    betas = [lo + (hi - lo) * i / (T - 1) for i in range(T)]
    s = NoiseSchedule(kind="linear", num_steps=T)
    torch.testing.assert_close(s.betas.double(), torch.tensor(betas, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        s.alpha_bar.double(), torch.tensor(_cumprod(betas), dtype=torch.float64), rtol=1e-6, atol=0
    )
    if T == 1000:
        assert s.alpha_bar[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # DDPM's alpha_bar_T


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_matches_nichol_dhariwal(T):
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2), and
    beta_t = 1 - alpha_bar(t) / alpha_bar(t-1) clipped at 0.999; our index t is their t + 1."""
    s_ = 0.008

    def f(t):
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    s = NoiseSchedule(kind="cosine", num_steps=T, cosine_s=s_)
    torch.testing.assert_close(s.betas.double(), torch.tensor(betas, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        s.alpha_bar.double(), torch.tensor(_cumprod(betas), dtype=torch.float64), rtol=1e-5, atol=0
    )
    for t in range(T - 1):  # before the clipped last step, alpha_bar_t is the closed form itself
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "sigmoid"])
def test_last_beta_is_clipped(kind):
    """alpha_bar(T) = 0 on the cosine and sigmoid schedules, so the last beta would be 1 (x_T carries no signal
    and x0 = (x_T - sigma eps) / alpha divides by 0): it is clipped at 0.999, and only it."""
    s = NoiseSchedule(kind=kind, num_steps=1000)
    betas = s.betas.double()
    assert betas[-1].item() == pytest.approx(0.999, abs=1e-7)
    assert betas[:-1].max() < 0.9
    assert (s.alpha_bar[-1] / s.alpha_bar[-2]).item() == pytest.approx(0.001, rel=1e-4)
    assert s.alpha_bar[-1] > 0


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
def test_targets_and_conversions_match_the_formulas(kind, prediction):
    """x_t, the target and the (x0, eps) a network output implies, against the formulas in float64:
    x_t = a x0 + b eps (DDPM eq. 4) and v = a eps - b x0 (Salimans & Ho 2022), a^2 = alpha_bar, b^2 = 1 - a^2.
    """
    s = NoiseSchedule(kind=kind, num_steps=1000, prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(64, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 990, (64,), generator=g)  # the very last steps make x0 ill-conditioned
    # the float32 tables, so that the ill-conditioned eps = (x_t - a x0) / b near t = 0 sees the same a and b
    a, b = (table.double()[t].view(-1, 1, 1, 1) for table in (s.sqrt_alpha_bar, s.sqrt_one_minus_alpha_bar))
    x_t = a * x0 + b * eps
    output = {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction]
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.q_sample(x0, t, eps), x_t, **tol)
    torch.testing.assert_close(s.target(x0, eps, t), output, **tol)
    torch.testing.assert_close(s.from_x0_eps(x0, eps, t), output, **tol)
    x0_hat, eps_hat = s.to_x0_eps(output, x_t, t)
    torch.testing.assert_close(x0_hat, x0, **tol)
    torch.testing.assert_close(eps_hat, eps, **tol)


def test_v_definition():
    s = NoiseSchedule(kind="cosine", num_steps=100, prediction="v")
    x0, eps, t = torch.ones(1, 1), torch.full((1, 1), 2.0), torch.tensor([40])
    a, b = s.alpha_bar[40].sqrt().item(), (1 - s.alpha_bar[40]).sqrt().item()
    assert s.target(x0, eps, t).item() == pytest.approx(a * 2.0 - b * 1.0, rel=1e-6)


def test_min_snr_weights_at_known_points():
    """Hang et al. 2023: weight min(SNR, gamma) on x0, divided by SNR for eps and by SNR + 1 for v; float32."""
    t = torch.arange(1000)
    alpha_bar = _cumprod([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)])  # DDPM's linear schedule
    snr = [ab / (1 - ab) for ab in alpha_bar]
    for prediction, expected in [
        ("eps", lambda snr: min(snr, 5.0) / snr),
        ("v", lambda snr: min(snr, 5.0) / (snr + 1)),
        ("x0", lambda snr: min(snr, 5.0)),
    ]:
        s = NoiseSchedule(kind="linear", num_steps=1000, prediction=prediction, min_snr_gamma=5.0)
        w = s.loss_weight(t)
        assert w.dtype == torch.float32 and s.snr(t).dtype == torch.float32
        for i in [0, 100, 250, 400, 999]:
            assert s.snr(t)[i].item() == pytest.approx(snr[i], rel=1e-5)
            assert w[i].item() == pytest.approx(expected(snr[i]), rel=1e-5)
    # At SNR = gamma exactly, the eps weight is 1; for high SNR (early t) it is gamma / SNR < 1.
    s = NoiseSchedule(kind="linear", num_steps=1000, min_snr_gamma=5.0)
    assert s.loss_weight(torch.tensor([0])).item() == pytest.approx(5.0 / s.snr(torch.tensor([0])).item())
    assert s.loss_weight(torch.tensor([999])).item() == 1.0
    ones = NoiseSchedule(kind="linear").loss_weight(t)
    assert ones.dtype == torch.float32 and (ones == 1).all()


def _tables(s: NoiseSchedule) -> dict[str, torch.Tensor]:
    t = torch.arange(s.num_steps)
    tables = {name: getattr(s, name) for name in ("betas", "alpha_bar", "sqrt_alpha_bar", "posterior_variance")}
    tables.update(snr=s.snr(t), loss_weight=s.loss_weight(t))
    tables["logsnr_20"] = torch.tensor(sampling_timesteps(s.num_steps, 20, "logsnr", alpha_bar=s.alpha_bar))
    return tables


@pytest.mark.parametrize("cast", ["bf16", "half", "double"])
def test_tables_stay_float32_when_the_owner_is_cast(cast):
    """Lightning's bf16-true / 16-true cast the whole module (`.to(dtype)`): the schedule's math must not follow.

    In bfloat16 alpha_bar rounds to 1 for the first timesteps, so SNR is infinite and min-SNR weights are 0.
    """
    reference = _tables(NoiseSchedule(kind="cosine", num_steps=1000, prediction="v", min_snr_gamma=5.0))
    owner = nn.Module()
    owner.net = nn.Linear(2, 2)
    owner.schedule = NoiseSchedule(kind="cosine", num_steps=1000, prediction="v", min_snr_gamma=5.0)
    dtype = {"bf16": torch.bfloat16, "half": torch.float16, "double": torch.float64}[cast]
    owner = owner.half() if cast == "half" else owner.to(dtype)
    assert owner.net.weight.dtype == dtype
    for name, table in _tables(owner.schedule).items():
        assert table.dtype == reference[name].dtype and torch.equal(table, reference[name]), name
    assert reference["loss_weight"].min() > 0
    # x_t is the network's input: computed in float32, returned in the data's dtype
    x0, noise, t = torch.rand(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.tensor([0, 10, 500, 999])
    x_t = owner.schedule.q_sample(x0.to(dtype), t, noise.to(dtype))
    assert x_t.dtype == dtype
    torch.testing.assert_close(x_t.float(), owner.schedule.q_sample(x0, t, noise), atol=1e-2, rtol=1e-2)


def test_schedule_follows_its_owners_device_and_survives_copies():
    owner = nn.Module()
    owner.schedule = NoiseSchedule(kind="sigmoid", num_steps=100, min_snr_gamma=5.0)
    reference = _tables(NoiseSchedule(kind="sigmoid", num_steps=100, min_snr_gamma=5.0))
    assert owner.state_dict() == {}  # derived from the config, so checkpoints carry none of it
    owner.to("meta")  # a device without data: where the tables go is all that is checked
    assert owner.schedule.device.type == "meta" and owner.schedule.alpha_bar.device.type == "meta"
    assert owner.schedule.loss_weight(torch.tensor([3], device="meta")).device.type == "meta"
    owner.to_empty(device="cpu")  # back from meta (the schedule holds no data that could be lost)
    assert owner.schedule.to("cpu") is owner.schedule and owner.schedule.alpha_bar.device.type == "cpu"
    for copy in (copy_module.deepcopy(owner.schedule), pickle.loads(pickle.dumps(owner.schedule))):
        for name, table in _tables(copy).items():
            assert torch.equal(table, reference[name]), name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="quadratic"), "process.kind"),
        (dict(prediction="score"), "process.prediction"),
        (dict(num_steps=0), "process.num_steps"),
        (dict(min_snr_gamma=-1.0), "process.min_snr_gamma"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)
