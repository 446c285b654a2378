"""PostHocEMA: tracks power-function EMAs of the weights and saves snapshots of them, so that the EMA length can
be chosen after training (EDM2 post-hoc EMA; the math is in `diffusion.posthoc`).

Each profile (EDM2's defaults: sigma_rel 0.05 and 0.10) is updated after every optimizer step t with
beta = (1 - 1/t)^(gamma + 1), and every `every_n_steps` steps (and when training ends) rank zero writes each
profile to `<run>/ema_snapshots/step_XXXXXX_sigma_S.pt` (atomically, fp32). The profiles themselves go into
every checkpoint (`checkpoint["posthoc_ema"]`), so a resumed run continues them exactly; snapshot files written
after the resumed step (by the continuation that was abandoned) are moved into `ema_snapshots/superseded/`,
never overwritten or deleted. Every DDP rank tracks the same profiles of the same all-reduced weights; only
rank zero writes. This callback is independent of the EMA callback (`callbacks.ema`), which keeps the average
that training-time validation, sample grids and FID use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from diffusion.errors import ConfigError
from diffusion.posthoc import (
    CKPT_KEY,
    FORMAT,
    check_sigma_rel,
    power_beta,
    sigma_rel_to_gamma,
    snapshot_payload,
    snapshots_after,
    supersede,
    write_snapshot,
)


class PostHocEMA(L.Callback):
    """Power-function EMA profiles of `pl_module.model.net`, saved as snapshots for post-hoc reconstruction.

    Args:
        dirpath: the snapshot folder (`<run>/ema_snapshots`; sample.py and export.py look there).
        sigma_rels: the profiles' relative standard deviations (EDM2: 0.05 and 0.10); each in (0, 0.2887].
        every_n_steps: optimizer steps between snapshots (also one when training ends). More snapshots make the
            reconstruction more accurate; each costs len(sigma_rels) fp32 copies of the weights on disk.
        device: where the profiles live ("cpu" saves accelerator memory); default: the weights' device.
    """

    def __init__(
        self,
        *,
        dirpath: str,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 50,
        device: str | None = None,
    ) -> None:
        sigma_rels = [check_sigma_rel(s, key="callbacks.posthoc_ema.sigma_rels") for s in sigma_rels]
        if not sigma_rels or len({round(s, 3) for s in sigma_rels}) != len(sigma_rels):
            raise ConfigError(
                f"callbacks.posthoc_ema.sigma_rels={sigma_rels} must be non-empty and distinct (to 3 decimals)"
            )
        if every_n_steps < 1:
            raise ConfigError(f"callbacks.posthoc_ema.every_n_steps={every_n_steps} must be >= 1")
        self.dirpath = Path(dirpath)
        self.sigma_rels = sigma_rels
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        self.every_n_steps = every_n_steps
        self.device = torch.device(device) if device else None
        self.profiles: list[dict[str, Tensor]] | None = None
        self.step = 0  # the optimizer step the profiles are at (0: not started)
        self.saved_step = 0  # the step of the last snapshot written

    # --- the profiles -------------------------------------------------------------------------------------
    def _stored(self, v: Tensor) -> Tensor:
        """How a weight is kept: on `device`, in at least fp32 (bf16 / fp16 profiles would lose small updates)."""
        v = v.detach().to(self.device or v.device)
        return v.float() if v.is_floating_point() and v.element_size() < 4 else v

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        """Bring every profile to optimizer step `step` (1-based) with beta = (1 - 1/step)^(gamma + 1)."""
        state = net.state_dict()
        if self.profiles is None or step == 1:
            self.profiles = [{k: self._stored(v).clone() for k, v in state.items()} for _ in self.sigma_rels]
        else:
            params = {name for name, p in net.named_parameters() if p.is_floating_point()}
            keys = [k for k in state if k in params]
            new = [self._stored(state[k]) for k in keys]
            for profile, gamma in zip(self.profiles, self.gammas, strict=True):
                torch._foreach_lerp_([profile[k] for k in keys], new, 1.0 - power_beta(step, gamma))
                for k, v in state.items():
                    if k not in params:
                        profile[k].copy_(v)
        self.step = step

    def _to_device(self, net: nn.Module) -> None:
        """Move restored profiles (checkpoints load onto the CPU) next to the weights."""
        device = self.device or next(net.parameters()).device
        if self.profiles is not None:
            self.profiles = [{k: v.to(device) for k, v in p.items()} for p in self.profiles]

    def save_snapshots(self, trainer: L.Trainer) -> None:
        """Rank zero writes each profile at the current step (once per step)."""
        if self.profiles is None or self.step == self.saved_step:
            return
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            for profile, sigma_rel, gamma in zip(self.profiles, self.sigma_rels, self.gammas, strict=True):
                write_snapshot(self.dirpath, snapshot_payload(self.step, sigma_rel, gamma, profile))
        self.saved_step = self.step

    # --- Lightning hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if not hasattr(pl_module, "model"):
            raise TypeError(f"PostHocEMA needs a DiffusionModule (with a `.model`), not {type(pl_module).__name__}")

    def on_train_start(self, trainer, pl_module) -> None:
        # Here the step is restored. Snapshots after it belong to a continuation this run replaces.
        step = trainer.global_step
        if step > 0 and self.step != step:
            raise ConfigError(
                f"callbacks.posthoc_ema: the checkpoint at step {step} carries no post-hoc EMA profiles (that run "
                "was trained without callbacks.posthoc_ema); its profiles cannot be continued. Resume without "
                "posthoc_ema in callbacks, or start a new run with it"
            )
        if trainer.is_global_zero:
            moved = supersede(self.dirpath, snapshots_after(self.dirpath, step))
            if moved is not None:
                rank_zero_info(
                    f"PostHocEMA: snapshots after step {step} (a continuation this run replaces) moved to {moved}"
                )
        self._to_device(pl_module.model.net)
        rank_zero_info(
            f"PostHocEMA: profiles sigma_rel {', '.join(f'{s:g}' for s in self.sigma_rels)} (gamma "
            f"{', '.join(f'{g:.2f}' for g in self.gammas)}), snapshots every {self.every_n_steps} steps "
            f"in {self.dirpath}"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > self.step:  # once per optimizer step (gradient accumulation calls this per micro-batch)
            self.update(pl_module.model.net, step)
            if step % self.every_n_steps == 0:
                self.save_snapshots(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save_snapshots(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.profiles is None:
            return
        checkpoint[CKPT_KEY] = {
            "format": FORMAT,
            "sigma_rels": list(self.sigma_rels),
            "step": self.step,
            "profiles": [{k: v.detach().cpu().clone() for k, v in p.items()} for p in self.profiles],
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get(CKPT_KEY)
        if not saved:
            self.profiles, self.step = None, 0
            return
        if [round(s, 9) for s in saved["sigma_rels"]] != [round(s, 9) for s in self.sigma_rels]:
            raise ConfigError(
                f"callbacks.posthoc_ema.sigma_rels={self.sigma_rels} but the checkpoint tracked {saved['sigma_rels']}; "
                "resume with the same sigma_rels (profiles cannot be added or changed mid-run)"
            )
        self.profiles = [{k: self._stored(v).clone() for k, v in p.items()} for p in saved["profiles"]]
        self.step = self.saved_step = int(saved["step"])

    def state_dict(self) -> dict:
        return {"step": self.step, "saved_step": self.saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved_step = int(state_dict.get("saved_step", self.saved_step))


@dataclass
class Score:
    """One row of `score_ema_lengths`: which weights, and their validation loss."""

    weights: str  # "raw", "stored EMA" or "post-hoc"
    sigma_rel: float | None
    val_loss: float
    note: str = ""


def score_ema_lengths(
    ckpt_path: str | Path,
    *,
    sigma_rels: Sequence[float],
    datamodule: L.LightningDataModule,
    val_seed: int = 0,
    val_buckets: int = 10,
    snapshots: str | Path | None = None,
    accelerator: str = "auto",
) -> list[Score]:
    """`val/loss` (fixed noise and levels, as training reports it: `val_seed`, `val_buckets`) of a checkpoint's raw
    weights, its stored EMA, and the post-hoc EMA of each of `sigma_rels` at its step, on `datamodule` (the run's
    data)."""
    from diffusion.checkpoint import EMA_KEY, net_state_dict, read_checkpoint
    from diffusion.model import DiffusionModel
    from diffusion.module import DiffusionModule
    from diffusion.posthoc import check_sigma_rel, reconstruct_for_checkpoint

    sigma_rels = [check_sigma_rel(s, key="ema.sigma_rel") for s in sigma_rels]
    ckpt = read_checkpoint(ckpt_path)
    model = DiffusionModel.from_checkpoint(ckpt_path, use_ema=False)
    net = model.net
    candidates: list[tuple[str, float | None, Callable[[], dict], str]] = [
        ("raw", None, lambda: net_state_dict(ckpt, use_ema=False)[0], "")
    ]
    if ckpt.get(EMA_KEY):
        candidates.append(("stored EMA", None, lambda: ckpt[EMA_KEY], ""))
    for s in sigma_rels:
        rec = reconstruct_for_checkpoint(ckpt_path, net, sigma_rel=s, snapshots=snapshots, ckpt=ckpt)
        note = f"profile error {100 * rec.profile_error:.2f}%"
        candidates.append(("post-hoc", s, lambda rec=rec: rec.state_dict, note))
    module = DiffusionModule(model=model, val_seed=val_seed, val_buckets=val_buckets)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    rows = []
    for weights, sigma_rel, state, note in candidates:
        net.load_state_dict(state())
        (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        rows.append(Score(weights, sigma_rel, float(metrics["val/loss"]), note))
    return rows


def score_table(rows: Sequence[Score]) -> str:
    """`rows` as a markdown table, the best post-hoc row marked."""
    posthoc = [r for r in rows if r.sigma_rel is not None]
    best = min(posthoc, key=lambda r: r.val_loss) if posthoc else None
    lines = ["| weights | sigma_rel | val/loss | |", "| --- | --- | --- | --- |"]
    for r in rows:
        mark = "best" if r is best else ""
        sigma = f"{r.sigma_rel:g}" if r.sigma_rel is not None else "-"
        lines.append(f"| {r.weights} | {sigma} | {r.val_loss:.5f} | {', '.join(x for x in (mark, r.note) if x)} |")
    return "\n".join(lines)
