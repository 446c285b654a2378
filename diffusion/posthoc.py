"""Post-hoc EMA: choose the EMA length after training (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", EDM2, sec. 3 and app. C).

During training, a few power-function EMAs of the weights are tracked (EDM2 eq. 4:
beta(t) = (1 - 1/t) ** (gamma + 1), t the optimizer step) and saved as snapshots every N steps. The EMA at step
T averages the weights with the profile p(tau) = (gamma + 1) tau^gamma / T^(gamma + 1) on [0, T] (eq. 3), whose
standard deviation relative to T is sigma_rel = (gamma + 1)^(1/2) (gamma + 2)^(-1) (gamma + 3)^(-1/2) (app. C.2,
eq. 123). After training, the profile of any other sigma_rel at step T is approximated, in the L2 sense over
tau, by a linear combination of the snapshots' profiles (app. C.3, eq. 151 and Algorithm 3: the inner products
of power functions are closed-form, so the coefficients solve a small least-squares problem); the same
combination of the snapshots' weights is the reconstructed EMA.

The discrete update is exact, not an approximation of the integral: after t steps it weights step s by
(s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1), which is the integral of p over (s-1, s]. So a snapshot is the
continuous power-function EMA of the piecewise-constant weight trajectory, and the only error of a
reconstruction is the mismatch of the profiles, which `Reconstruction.profile_error` reports (relative L2).

Snapshots are files `<run>/ema_snapshots/step_XXXXXX_sigma_0.050.pt`, each a weights-only loadable dict:
{"format": 1, "kind": "posthoc_ema", "step", "sigma_rel", "gamma", "state_dict"} with fp32 tensors (fp16 would
be amplified by the reconstruction coefficients, whose magnitudes exceed 1). Plain torch and numpy.
"""

from __future__ import annotations

import logging
import math
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from diffusion.checkpoint import POSTHOC_KEY
from diffusion.errors import BadFileError, ConfigError, MissingPathError, NotAFolderError
from diffusion.progress import progress

log = logging.getLogger(__name__)

FORMAT = 1
KIND = "posthoc_ema"
CKPT_KEY = POSTHOC_KEY  # a checkpoint's tracked profiles: {"format", "sigma_rels", "step", "profiles"}
SNAPSHOT_DIR = "ema_snapshots"  # in the run folder
SUPERSEDED_DIR = "superseded"  # snapshots of an abandoned continuation (a resume from an earlier step) go here
SIGMA_REL_MAX = 12**-0.5  # gamma = 0, the uniform average of the whole run
SNAPSHOT_NAME = re.compile(r"^step_(\d+)_sigma_([0-9.]+)\.pt$")


# --- sigma_rel <-> gamma -----------------------------------------------------------------------------
def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent gamma (EDM2 eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def check_sigma_rel(sigma_rel, *, key: str) -> float:
    """`sigma_rel` as a float in (0, 12^-1/2], else a ConfigError naming `key` (the largest is gamma = 0)."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not math.isfinite(sigma_rel):
        raise ConfigError(f"{key}={sigma_rel!r} must be a number in (0, {SIGMA_REL_MAX:.4f}]")
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ConfigError(
            f"{key}={sigma_rel} is out of range: a power-function EMA's sigma_rel is in (0, {SIGMA_REL_MAX:.4f}] "
            "(the largest is the plain average of the whole run; EDM2's defaults are 0.05 and 0.10)"
        )
    return float(sigma_rel)


def sigma_rel_to_gamma(sigma_rel: float, *, key: str = "sigma_rel") -> float:
    """The exponent gamma >= 0 whose profile has relative std `sigma_rel` (EDM2 eq. 126, Algorithm 2).

    Squaring eq. 123 gives sigma_rel^-2 (gamma + 1) = (gamma + 2)^2 (gamma + 3), i.e. the cubic
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0; gamma is its largest real root.
    """
    s = check_sigma_rel(sigma_rel, key=key) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return max(0.0, float(roots[np.abs(roots.imag) < 1e-9].real.max()))


def power_beta(step: int, gamma: float) -> float:
    """Decay of the update after optimizer step `step` (1-based): (1 - 1/step)^(gamma + 1) (EDM2 eq. 4); 0 at 1."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


# --- least-squares reconstruction (EDM2 app. C.3) --------------------------------------------------------
def profile_inner(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = integral of the two power-function profiles (ending at t_a, t_b) over tau (EDM2 eq. 151).

    With m = min(t_a, t_b): (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)),
    written with the ratio of the times so that large exponents underflow to 0 instead of overflowing.
    """
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(
    steps: Sequence[int], gammas: Sequence[float], *, target_step: int, target_gamma: float
) -> tuple[np.ndarray, float]:
    """Coefficients x of the snapshots (step_i, gamma_i) whose combined profile best matches the target's in L2,
    and that match's relative L2 error ||sum_i x_i p_i - p_target|| / ||p_target||.

    The normal equations A x = b (A_ij = <p_i, p_j>, b_i = <p_i, p_target>) are solved by least squares, so
    duplicate snapshots (a singular A) are handled too.
    """
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])  # (n, n)
    b = profile_inner(t, g, np.float64(target_step), np.float64(target_gamma))  # (n,)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    target = (target_gamma + 1) ** 2 / ((2 * target_gamma + 1) * target_step)  # <p_target, p_target>
    residual = max(float(target - 2 * x @ b + x @ A @ x), 0.0)
    return x, math.sqrt(residual / target)


# --- snapshots -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """One power-function EMA at `step`: in the file `path`, or (a checkpoint's own profile) in `state`."""

    step: int
    sigma_rel: float
    gamma: float
    path: Path | None = None
    state: dict[str, Tensor] | None = field(default=None, compare=False, repr=False)

    def load(self) -> dict[str, Tensor]:
        return self.state if self.state is not None else read_snapshot(self.path)["state_dict"]


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"step_{step:06d}_sigma_{sigma_rel:.3f}.pt"


def snapshot_payload(step: int, sigma_rel: float, gamma: float, state: dict[str, Tensor]) -> dict:
    """A snapshot file's contents: plain values and fp32 CPU tensors (weights-only loadable)."""
    return {
        "format": FORMAT,
        "kind": KIND,
        "step": int(step),
        "sigma_rel": float(sigma_rel),
        "gamma": float(gamma),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
    }


def write_snapshot(folder: Path, payload: dict) -> Path:
    """Write one snapshot atomically; a file already at its name is moved aside first, never overwritten."""
    from diffusion.files import atomic_write

    path = folder / snapshot_name(payload["step"], payload["sigma_rel"])
    if path.exists() or path.is_symlink():
        supersede(folder, [path])
    atomic_write(path, partial(torch.save, payload))
    return path


def supersede(folder: Path, paths: Sequence[Path]) -> Path | None:
    """Move `paths` (snapshots of an abandoned continuation) into a new `folder/superseded/<time>/`; kept, unused."""
    from diffusion.files import move

    if not paths:
        return None
    dest = folder / SUPERSEDED_DIR / time.strftime("%Y%m%d-%H%M%S")
    k = 0
    while dest.exists():
        k += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{k}")
    dest.mkdir(parents=True)
    for path in paths:
        move(path, dest / path.name)  # a link is moved as a link, never followed
    return dest


def read_snapshot(path: Path, *, mmap: bool = True) -> dict:
    """A snapshot file's contents, read weights-only; a one-line BadFileError naming the file otherwise."""
    from diffusion.checkpoint import load_data

    if path.is_symlink() or not path.is_file():
        raise BadFileError(f"post-hoc EMA snapshot {path} is not a plain file (a link or a folder); refused")
    # mmap: listing a folder reads each file's header, not all its tensors (only torch.save's zip format maps)
    data = load_data(path, what="post-hoc EMA snapshot", mmap=mmap and zipfile.is_zipfile(path))
    problem = None
    if not isinstance(data, dict) or data.get("kind") != KIND or data.get("format") != FORMAT:
        problem = "not a post-hoc EMA snapshot of this project's format"
    elif not all(isinstance(data.get(k), (int, float)) for k in ("step", "sigma_rel", "gamma")):
        problem = "its step, sigma_rel or gamma is not a number"
    elif not isinstance(data.get("state_dict"), dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in data["state_dict"].items()
    ):
        problem = "its state_dict is not a dict of tensors"
    elif (
        data["step"] < 1 or not 0 <= data["gamma"] or abs(gamma_to_sigma_rel(data["gamma"]) - data["sigma_rel"]) > 1e-6
    ):
        problem = f"its step {data['step']} / gamma {data['gamma']} / sigma_rel {data['sigma_rel']} are inconsistent"
    if problem:
        raise BadFileError(f"post-hoc EMA snapshot {path}: {problem}; remove it from the folder")
    return data


def list_snapshots(folder: str | Path, *, max_step: int | None = None) -> list[Snapshot]:
    """The snapshots in `folder` (only its own files named step_XXXXXX_sigma_S.pt; hidden temp files and
    `superseded/` are skipped), up to `max_step`, sorted by step. Each file is checked (`read_snapshot`)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise MissingPathError(
            f"no EMA snapshots at {folder}: the run was trained without callbacks.posthoc_ema (train with "
            "callbacks=[default,posthoc_ema]), or pass ema.snapshots=FOLDER"
        )
    if not folder.is_dir():
        raise NotAFolderError(f"EMA snapshots {folder} is a file, not a folder")
    found = []
    for path in sorted(folder.iterdir()):
        if not SNAPSHOT_NAME.match(path.name):
            continue
        data = read_snapshot(path)
        if max_step is None or data["step"] <= max_step:
            found.append(Snapshot(int(data["step"]), float(data["sigma_rel"]), float(data["gamma"]), path))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def snapshots_after(folder: Path, step: int) -> list[Path]:
    """The snapshot files in `folder` written after `step` (by their names): what a resume from `step` redoes."""
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir()) if (m := SNAPSHOT_NAME.match(p.name)) and int(m.group(1)) > step]


# --- reconstruction ----------------------------------------------------------------------------------------
@dataclass
class Reconstruction:
    """The EMA of `sigma_rel` at `step` rebuilt from `snapshots` with `coefficients`."""

    state_dict: dict[str, Tensor]
    sigma_rel: float
    step: int
    snapshots: list[Snapshot]
    coefficients: np.ndarray
    profile_error: float  # relative L2 error of the combined profile against the target's

    def summary(self) -> str:
        return (
            f"post-hoc EMA sigma_rel={self.sigma_rel:g} at step {self.step} from {len(self.snapshots)} snapshots "
            f"(profile error {100 * self.profile_error:.2f}%, sum |coefficients| {np.abs(self.coefficients).sum():.1f})"
        )


def checkpoint_profiles(ckpt: dict) -> list[Snapshot]:
    """The profiles a checkpoint carries (tracked up to its step by the PostHocEMA callback), as snapshots."""
    saved = ckpt.get(CKPT_KEY)
    if not isinstance(saved, dict) or not saved.get("profiles") or int(saved.get("step", 0)) < 1:
        return []
    step = int(saved["step"])
    return [
        Snapshot(step, float(s), sigma_rel_to_gamma(float(s)), state=state)
        for s, state in zip(saved["sigma_rels"], saved["profiles"], strict=True)
    ]


def reconstruct(
    net: nn.Module,
    *,
    sigma_rel: float,
    snapshots: Sequence[Snapshot],
    step: int,
    key: str = "ema.sigma_rel",
    show_progress: bool = True,
) -> Reconstruction:
    """The power-function EMA of `sigma_rel` at `step`, as `net`'s state dict, from `snapshots` (those up to
    `step`). `net` only gives the keys, shapes and dtypes: its floating-point parameters are combined
    (accumulated in float64, one snapshot in memory at a time), its buffers come from the newest snapshot."""
    from diffusion.checkpoint import weights_mismatch

    gamma = sigma_rel_to_gamma(sigma_rel, key=key)
    snapshots = [s for s in snapshots if s.step <= step]
    if not snapshots:
        raise MissingPathError(f"no EMA snapshots at or before step {step} to reconstruct {key}={sigma_rel} from")
    x, error = solve_coefficients(
        [s.step for s in snapshots], [s.gamma for s in snapshots], target_step=step, target_gamma=gamma
    )
    ref = net.state_dict()
    params = {name for name, p in net.named_parameters() if p.is_floating_point()}
    total = {k: torch.zeros(ref[k].shape, dtype=torch.float64) for k in params}
    newest, newest_step = None, -1
    pairs = progress(
        zip(snapshots, x, strict=True),
        desc=f"post-hoc EMA {key}={sigma_rel}",
        total=len(snapshots),
        enabled=show_progress,
    )
    for snap, coefficient in pairs:
        state = snap.load()
        problems = weights_mismatch(net, state)
        if problems:
            where = snap.path or f"the checkpoint's profile sigma_rel={snap.sigma_rel}"
            raise BadFileError(f"EMA snapshot {where} does not fit the checkpoint's network: {problems}")
        for k in params:
            total[k].add_(state[k].to(torch.float64), alpha=float(coefficient))
        if snap.step > newest_step:
            newest, newest_step = state, snap.step
    out = {k: (total[k] if k in params else newest[k]).to(ref[k].dtype).clone() for k in ref}
    return Reconstruction(out, float(sigma_rel), int(step), list(snapshots), x, error)


def run_folder_of(ckpt_path: Path) -> Path | None:
    """The run folder of a checkpoint inside one (`<run>/checkpoints/X.ckpt`), else None."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None


def reconstruct_for_checkpoint(
    ckpt_path: str | Path,
    net: nn.Module,
    *,
    sigma_rel: float,
    snapshots: str | Path | None = None,
    ckpt: dict | None = None,
    key: str = "ema.sigma_rel",
) -> Reconstruction:
    """The EMA of `sigma_rel` at checkpoint `ckpt_path`'s step for its network `net`, from the snapshots in
    `snapshots` (default: the run folder's `ema_snapshots/`) written up to that step, plus the profiles the
    checkpoint itself carries when its step has no snapshot file (a last.ckpt written between snapshots)."""
    from diffusion.checkpoint import read_checkpoint

    check_sigma_rel(sigma_rel, key=key)
    ckpt_path = Path(ckpt_path)
    ckpt = read_checkpoint(ckpt_path) if ckpt is None else ckpt
    step = int(ckpt.get("global_step", 0))
    if snapshots is None:
        run = run_folder_of(ckpt_path)
        if run is None:
            raise MissingPathError(
                f"{ckpt_path} is not inside a run folder (<run>/checkpoints/), so its EMA snapshots are not known: "
                "pass ema.snapshots=<run>/ema_snapshots"
            )
        snapshots = run / SNAPSHOT_DIR
    found = list_snapshots(snapshots, max_step=step)
    have = {(s.step, round(s.sigma_rel, 9)) for s in found}
    own = [s for s in checkpoint_profiles(ckpt) if (s.step, round(s.sigma_rel, 9)) not in have]
    if not found and not own:
        raise MissingPathError(
            f"no EMA snapshots in {snapshots} at or before the checkpoint's step {step}: train with "
            "callbacks=[default,posthoc_ema]"
        )
    return reconstruct(net, sigma_rel=sigma_rel, snapshots=[*found, *own], step=step, key=key)


def with_posthoc_ema(
    loaded,
    ckpt_path: str | Path,
    *,
    sigma_rel: float | None,
    snapshots: str | Path | None = None,
    use_ema: bool = True,
    key: str = "ema.sigma_rel",
):
    """`loaded` (a `diffusion.model.DiffusionModel` of `ckpt_path`) with its network's weights replaced by the
    post-hoc EMA of `sigma_rel` at the checkpoint's step; unchanged when `sigma_rel` is None."""
    if sigma_rel is None:
        return loaded
    check_sigma_rel(sigma_rel, key=key)
    if not use_ema:
        raise ConfigError(f"use_ema=false asks for the raw weights, {key}={sigma_rel} for a post-hoc EMA: choose one")
    rec = reconstruct_for_checkpoint(ckpt_path, loaded.net, sigma_rel=sigma_rel, snapshots=snapshots, key=key)
    loaded.net.load_state_dict(rec.state_dict)
    loaded.weights = f"post-hoc EMA sigma_rel={rec.sigma_rel:g}"
    log.info(rec.summary())
    return loaded
