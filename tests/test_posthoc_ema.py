"""Post-hoc EMA (EDM2): sigma_rel <-> gamma, the tracked power-function EMA against its closed form, reconstruction
against a directly tracked EMA, exact resume, sample.py / export.py through the real conf/, and bad input."""

from __future__ import annotations

import logging
import math
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from torch import nn

from diffusion import posthoc
from diffusion.callbacks.posthoc_ema import PostHocEMA
from diffusion.checkpoint import read_checkpoint
from diffusion.errors import user_error_message
from diffusion.model import DiffusionModel
from tests.conftest import CONF, ROOT, run_cli, run_train
from tests.test_ema import DDP_TINY


class Vec(nn.Module):
    """A network that is one parameter vector (and a buffer, which profiles copy rather than average)."""

    def __init__(self, n: int, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=dtype))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def drive(callbacks, trajectory, *, dtype=torch.float32) -> Vec:
    """Feed the weights of `trajectory` (one row per optimizer step, steps 1..T) to PostHocEMA callbacks."""
    net = Vec(trajectory.shape[1], dtype)
    module = SimpleNamespace(model=SimpleNamespace(net=net))
    for step, theta in enumerate(trajectory, start=1):
        with torch.no_grad():
            net.w.copy_(theta)
            net.count.fill_(step)
        trainer = SimpleNamespace(global_step=step, is_global_zero=True)
        for cb in callbacks:
            cb.on_train_batch_end(trainer, module, None, None, 0)
    return net


def sgd_like(T: int, n: int, seed: int = 0) -> torch.Tensor:
    """A weight trajectory (T, n) that drifts and settles as training does: steps of decaying noise plus a trend."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(T, n, generator=g, dtype=torch.float64) / torch.arange(1, T + 1).sqrt()[:, None] + 0.01
    return steps.cumsum(0)


# --- the math ------------------------------------------------------------------------------------------------
def test_gamma_and_sigma_rel_closed_form():
    # EDM2 sec. 3.1 quotes gamma = 16.97 for sigma_rel = 0.05 and 6.94 for 0.10
    assert posthoc.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert posthoc.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for s in (0.01, 0.05, 0.08, 0.2, posthoc.SIGMA_REL_MAX):
        assert posthoc.gamma_to_sigma_rel(posthoc.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    assert posthoc.sigma_rel_to_gamma(posthoc.SIGMA_REL_MAX) == pytest.approx(0.0, abs=1e-9)  # the plain average
    # the decay: 0 at the first step (a copy), then (1 - 1/t)^(gamma + 1)
    assert posthoc.power_beta(1, 6.94) == 0.0 and posthoc.power_beta(10, 2.0) == pytest.approx(0.9**3)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_tracked_profile_has_the_std_sigma_rel(sigma_rel):
    """The tracked EMA of tau/T and (tau/T)^2 (tau the middle of each step) gives its profile's mean and second
    moment: the standard deviation is sigma_rel, up to the O(1/T) of representing tau by step midpoints."""
    T = 2000
    tau = (torch.arange(1, T + 1, dtype=torch.float64) - 0.5) / T
    cb = PostHocEMA(dirpath="unused", sigma_rels=[sigma_rel], every_n_steps=10**9)
    drive([cb], torch.stack([tau, tau**2], 1), dtype=torch.float64)
    m1, m2 = cb.profiles[0]["w"].tolist()
    assert math.sqrt(m2 - m1**2) == pytest.approx(sigma_rel, rel=2e-3)
    gamma = posthoc.sigma_rel_to_gamma(sigma_rel)
    assert m1 == pytest.approx((gamma + 1) / (gamma + 2), rel=1e-3)  # the continuous profile's mean


def test_tracked_power_ema_equals_its_closed_form_average():
    """After t steps the EMA weights step s by (s^(g+1) - (s-1)^(g+1)) / t^(g+1) (the product of the betas)."""
    T, gamma = 37, posthoc.sigma_rel_to_gamma(0.1)
    theta = torch.randn(T, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cb = PostHocEMA(dirpath="unused", sigma_rels=[0.1], every_n_steps=10**9)
    net = drive([cb], theta, dtype=torch.float64)
    s = torch.arange(1, T + 1, dtype=torch.float64)
    weights = (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / T ** (gamma + 1)
    assert weights.sum().item() == pytest.approx(1.0, rel=1e-12)
    assert cb.profiles[0]["w"].item() == pytest.approx((weights * theta[:, 0]).sum().item(), rel=1e-12)
    assert cb.profiles[0]["count"].item() == T == net.count.item()  # buffers are copied


def test_reconstruction_matches_a_directly_tracked_ema(tmp_path):
    """Profiles 0.05 and 0.10 saved every N steps; 0.08 rebuilt from them against 0.08 tracked directly.

    Tolerance, derived rather than picked: the difference is the integral of (p_rebuilt - p_0.08) times the weight
    trajectory, so by Cauchy-Schwarz each coordinate's error is at most ||dp|| ||theta - c|| + |integral dp| |c|
    (c its mean; ||dp|| = profile_error ||p_0.08||, both closed-form). The error must be within that bound,
    under 1% of the 0.05-vs-0.10 difference with the default 12 snapshots per profile, and shrink as
    snapshots get denser.
    """
    T, n = 600, 256
    trajectory = sgd_like(T, n)
    gamma = posthoc.sigma_rel_to_gamma(0.08)
    p_norm = (gamma + 1) / math.sqrt((2 * gamma + 1) * T)  # ||p_0.08|| in L2 over [0, T]
    direct = PostHocEMA(dirpath=str(tmp_path / "direct"), sigma_rels=[0.08], every_n_steps=10**9)
    errors = []
    for every in (100, 50, 25):
        folder = tmp_path / f"every{every}"
        tracked = PostHocEMA(dirpath=str(folder), sigma_rels=[0.05, 0.10], every_n_steps=every)
        net = drive([tracked, direct] if every == 100 else [tracked], trajectory)
        snaps = posthoc.list_snapshots(folder)
        assert len(snaps) == 2 * T // every and {s.step for s in snaps} == set(range(every, T + 1, every))
        rec = posthoc.reconstruct(net, sigma_rel=0.08, snapshots=snaps, step=T)
        target = direct.profiles[0]["w"].double()
        error = (rec.state_dict["w"].double() - target).abs()
        theta = trajectory.float().double()  # what the net held
        c = theta.mean(0)
        bound = rec.profile_error * p_norm * (theta - c).norm(dim=0) + abs(rec.coefficients.sum() - 1) * c.abs()
        slack = 1e-5 * np.abs(rec.coefficients).sum() * theta.abs().max()  # fp32 profiles and snapshots
        assert (error <= bound + slack).all(), (error - bound).max()
        gap = (tracked.profiles[0]["w"] - tracked.profiles[1]["w"]).double().norm()
        errors.append((error.norm() / gap).item())
        assert rec.state_dict["count"].item() == T  # buffers: the newest snapshot's
    assert errors[1] < 0.01, errors
    assert errors[0] > errors[1] > errors[2], errors


# --- training, resume, entry points --------------------------------------------------------------------------
POSTHOC = [
    "callbacks=[default,posthoc_ema]",
    "callbacks.posthoc_ema.every_n_steps=2",
    "trainer.max_steps=8",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.sample_grid=null",
    "trainer.val_check_interval=8",
    "logger=csv",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run with post-hoc EMA, and its .hydra/config.yaml as Hydra writes it for `python train.py`."""
    run = tmp_path_factory.mktemp("posthoc") / "run"
    cfg, _ = run_train(run, POSTHOC)
    saved = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    (run / ".hydra").mkdir()
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    return run


def snapshot_files(folder: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted(folder.glob("step_*.pt"))}


@pytest.mark.slow
def test_training_writes_snapshots_and_a_resume_continues_them_exactly(run, tmp_path):
    first = snapshot_files(run / "ema_snapshots")
    assert sorted(first) == [f"step_{s:06d}_sigma_{x:.3f}.pt" for s in (2, 4, 6, 8) for x in (0.05, 0.1)]
    for name, snap in first.items():
        assert snap["format"] == 1 and snap["step"] == int(name[5:11])
        assert snap["gamma"] == pytest.approx(posthoc.sigma_rel_to_gamma(snap["sigma_rel"]))
        assert all(v.dtype == torch.float32 for v in snap["state_dict"].values())
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["posthoc_ema"]["step"] == 8 and ckpt["posthoc_ema"]["sigma_rels"] == [0.05, 0.1]
    for profile, x in zip(ckpt["posthoc_ema"]["profiles"], (0.05, 0.1), strict=True):
        for k, v in profile.items():
            assert torch.equal(v, first[f"step_000008_sigma_{x:.3f}.pt"]["state_dict"][k])

    # Resume from step 4 in a copy of the run: steps 6 and 8 are redone; the first continuation's snapshots of them
    # are moved aside (not lost), and the new ones equal them bit for bit, as do the final profiles.
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    run_train(copy, [*POSTHOC, f"ckpt_path={copy / 'checkpoints' / 'step_000004.ckpt'}"])
    again = snapshot_files(copy / "ema_snapshots")
    assert again.keys() == first.keys()
    for name in first:
        for k, v in first[name]["state_dict"].items():
            assert torch.equal(v, again[name]["state_dict"][k]), (name, k)
    (moved,) = (copy / "ema_snapshots" / "superseded").iterdir()
    assert sorted(p.name for p in moved.iterdir()) == [n for n in sorted(first) if int(n[5:11]) > 4]
    resumed = read_checkpoint(copy / "checkpoints" / "last.ckpt")["posthoc_ema"]
    for a, b in zip(ckpt["posthoc_ema"]["profiles"], resumed["profiles"], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


class DumpProfiles(L.Callback):
    """Test helper: each DDP rank saves its PostHocEMA profiles when training ends."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module):
        (cb,) = [c for c in trainer.callbacks if isinstance(c, PostHocEMA)]
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(cb.profiles, self.dirpath / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_track_the_same_profiles_and_rank_zero_writes(tmp_path):
    run, dump = tmp_path / "run", tmp_path / "dump"
    result = run_cli(
        "train.py",
        *DDP_TINY,
        "callbacks=[default,posthoc_ema]",
        "callbacks.posthoc_ema.every_n_steps=2",
        "+callbacks.dump._target_=tests.test_posthoc_ema.DumpProfiles",
        f"+callbacks.dump.dirpath={dump}",
        "logger=none",
        f"hydra.run.dir={run}",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for a, b in zip(r0, r1, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # one file per (step, profile), no temp files left, nothing superseded
    names = sorted(p.name for p in (run / "ema_snapshots").iterdir())
    assert names == [f"step_{s:06d}_sigma_{x:.3f}.pt" for s in (2, 4) for x in (0.05, 0.1)]
    for profile, x in zip(r0, (0.05, 0.1), strict=True):
        written = torch.load(run / "ema_snapshots" / f"step_000004_sigma_{x:.3f}.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(profile[k], written[k]) for k in profile)


def compose_cli(config: str, *overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(ROOT)
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig().set_config(cfg)
    return cfg


def sample_images(ckpt, out: Path, *overrides: str) -> np.ndarray:
    import sample

    cfg = compose_cli(
        "sample", f"ckpt={ckpt}", f"out={out}", "n=3", "sampler.steps=2", "device=cpu", "progress=false", *overrides
    )
    sample.sample(cfg)
    return np.stack([np.asarray(__import__("PIL.Image").Image.open(p)) for p in sorted((out / "images").glob("*.png"))])


@pytest.mark.slow
def test_sample_and_export_use_the_reconstructed_ema(run, tmp_path, caplog):
    import export

    ckpt = run / "checkpoints" / "last.ckpt"
    net = DiffusionModel.from_checkpoint(ckpt).net
    expected = posthoc.reconstruct_for_checkpoint(ckpt, net, sigma_rel=0.08).state_dict

    # export.py format=ckpt ema.sigma_rel=0.08: a checkpoint whose EMA is the reconstruction
    export.run(compose_cli("export", f"ckpt={run}", f"out={tmp_path / 'e08'}", "format=ckpt", "ema.sigma_rel=0.08"))
    written = read_checkpoint(tmp_path / "e08" / "model.ckpt")
    assert written.keys() >= {"diffusion", "state_dict", "ema_state_dict"} and "optimizer_states" not in written
    assert all(torch.equal(v, expected[k]) for k, v in written["ema_state_dict"].items())

    # sample.py ema.sigma_rel=0.08 draws what that checkpoint draws, and not what the stored EMA draws
    posthoc_images = sample_images(run, tmp_path / "s08", "ema.sigma_rel=0.08")
    assert np.array_equal(posthoc_images, sample_images(tmp_path / "e08" / "model.ckpt", tmp_path / "e08s"))
    assert not np.array_equal(posthoc_images, sample_images(run, tmp_path / "stored"))

    # the sweep: a table of val/loss (raw, stored EMA, each sigma_rel), the best exported
    with caplog.at_level(logging.INFO):
        export.run(
            compose_cli(
                "export", f"ckpt={run}", f"out={tmp_path / 'best'}", "format=ckpt", "ema.sigma_rel=[0.03,0.08,0.15]"
            )
        )
    table = caplog.text[caplog.text.index("| weights |") :]
    losses = {
        line.split("|")[1].strip() + line.split("|")[2].strip(): float(line.split("|")[3])
        for line in table.splitlines()[2:7]
    }
    assert set(losses) == {"raw-", "stored EMA-", "post-hoc0.03", "post-hoc0.08", "post-hoc0.15"}
    best = min((0.03, 0.08, 0.15), key=lambda s: losses[f"post-hoc{s:g}"])
    assert f"best: ema.sigma_rel={best:g}" in caplog.text
    # the stored EMA's row is the val/loss training logged at its last validation (EMA weights, same fixed noise)
    metrics = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    column = metrics[0].split(",").index("val/loss")
    logged = [float(r.split(",")[column]) for r in metrics[1:] if r.split(",")[column]]
    assert losses["stored EMA-"] == pytest.approx(logged[-1], rel=1e-5)
    rebuilt = posthoc.reconstruct_for_checkpoint(ckpt, net, sigma_rel=best).state_dict
    exported = read_checkpoint(tmp_path / "best" / "model.ckpt")["ema_state_dict"]
    assert all(torch.equal(v, rebuilt[k]) for k, v in exported.items())


# --- bad input ---------------------------------------------------------------------------------------------------
class Boom:
    def __reduce__(self):
        return (print, ("pwned",))


def message(fn, *args, **kwargs) -> str:
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    text = user_error_message(info.value)
    assert text is not None and "\n" not in text, info.value
    return text


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3, float("nan"), "x", [0.05]])
def test_sigma_rel_out_of_range_names_the_key(bad):
    assert "ema.sigma_rel=" in message(posthoc.sigma_rel_to_gamma, bad, key="ema.sigma_rel")
    with pytest.raises(ValueError, match="callbacks.posthoc_ema.sigma_rels"):
        PostHocEMA(dirpath="x", sigma_rels=[0.05, bad] if not isinstance(bad, list) else bad * 2)


def test_bad_callback_options():
    with pytest.raises(ValueError, match="every_n_steps=0"):
        PostHocEMA(dirpath="x", every_n_steps=0)
    with pytest.raises(ValueError, match="distinct"):
        PostHocEMA(dirpath="x", sigma_rels=[0.05, 0.0501])


@pytest.mark.slow
def test_bad_snapshot_folders_name_the_culprit(run, tmp_path):
    ckpt = run / "checkpoints" / "last.ckpt"
    net = DiffusionModel.from_checkpoint(ckpt).net
    folder = tmp_path / "snaps"
    shutil.copytree(run / "ema_snapshots", folder)
    (folder / ".step_000002_sigma_0.050.pt.tmp-abc").write_bytes(b"half-written")  # ignored: a temp file
    (folder / "notes.txt").write_text("ignored: not a snapshot name")
    assert len(posthoc.list_snapshots(folder)) == 8

    hostile = folder / "step_000003_sigma_0.050.pt"
    torch.save({"format": 1, "kind": "posthoc_ema", "boom": Boom()}, hostile)
    text = message(posthoc.reconstruct_for_checkpoint, ckpt, net, sigma_rel=0.08, snapshots=folder)
    assert str(hostile) in text and "Python code or objects" in text and "names" in text and "print" in text
    hostile.write_bytes(b"\x00garbage")
    assert str(hostile) in message(posthoc.list_snapshots, folder)
    torch.save(
        {"format": 1, "kind": "posthoc_ema", "step": 3, "sigma_rel": 0.05, "gamma": 1.0, "state_dict": {}}, hostile
    )
    assert "inconsistent" in message(posthoc.list_snapshots, folder)
    good = torch.load(folder / "step_000002_sigma_0.050.pt", weights_only=True)
    good["state_dict"] = {k: v[..., :1] for k, v in good["state_dict"].items()}
    torch.save({**good, "step": 3}, hostile)
    assert str(hostile) in message(posthoc.reconstruct_for_checkpoint, ckpt, net, sigma_rel=0.08, snapshots=folder)

    # a run without snapshots: sample.py and export.py say so in one line (checked through the real CLI once)
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("ema_snapshots"))
    stripped = read_checkpoint(bare / "checkpoints" / "last.ckpt")
    del stripped["posthoc_ema"]
    torch.save(stripped, bare / "checkpoints" / "last.ckpt")
    result = run_cli("export.py", f"ckpt={bare}", f"out={tmp_path / 'o'}", "format=ckpt", "ema.sigma_rel=0.08")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "no EMA snapshots at" in result.stderr and "callbacks=[default,posthoc_ema]" in result.stderr
    assert "ema.sigma_rel=0.4 is out of range" in message(sample_images, run, tmp_path / "bad", "ema.sigma_rel=0.4")
    assert "use_ema=false" in message(sample_images, run, tmp_path / "bad", "ema.sigma_rel=0.08", "use_ema=false")
    assert "use_ema=true|false" in message(
        __import__("export").run, compose_cli("export", f"ckpt={run}", "out=x", "ema=false")
    )

    # resuming a run trained without post-hoc EMA with it on: its profiles cannot be continued
    with pytest.raises(ValueError, match="carries no post-hoc EMA profiles"):
        run_train(bare, [*POSTHOC, "trainer.max_steps=10", f"ckpt_path={bare}"])
    # resuming with other sigma_rels
    with pytest.raises(ValueError, match="sigma_rels"):
        run_train(
            tmp_path / "other",
            [*POSTHOC, "trainer.max_steps=10", f"ckpt_path={ckpt}", "callbacks.posthoc_ema.sigma_rels=[0.05,0.2]"],
        )


def test_hostile_pickle_is_refused_before_it_runs(tmp_path, capsys):
    path = tmp_path / "step_000001_sigma_0.050.pt"
    path.write_bytes(pickle.dumps(Boom(), protocol=2))  # torch.load's own protocol
    with pytest.raises(ValueError, match="Python code or objects"):
        posthoc.read_snapshot(path)
    assert "pwned" not in capsys.readouterr().out
