"""The non-finite guard: no optimizer step whose loss or gradients are not finite ever reaches the weights.

`module.nonfinite` chooses what such a step does: "error" stops training before the optimizer step (so no
checkpoint holds the bad step), "skip" drops that step and counts it (`train/skipped_steps`; more than
`max_consecutive_skips` in a row stop the run), "off" does not check (saves one host-device sync per step).
`DiffusionModule.configure_gradient_clipping` calls `check` right before each optimizer step.

On a CUDA device with a fused optimizer the flag goes to the optimizer's kernel as `found_inf` (the protocol torch's
GradScaler uses), which skips the whole update on the device, and the host reads the flag one step late without
stalling the queue; elsewhere the flag is read at once (on a CPU that costs nothing, there is no queue to stall).
With 16-mixed the gradient scaler already skips overflowing gradients, so only the loss is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from diffusion.errors import ConfigError, UserError

NonFinite = Literal["error", "skip", "off"]


class NonFiniteLossError(UserError, FloatingPointError, ValueError):
    """A training step produced a non-finite loss or gradient; the weights were not updated by it."""


class NonFiniteGuard:
    """The guard's state (skip counts, a flag still on its way from the device) and its checks."""

    def __init__(self, mode: NonFinite = "error", max_consecutive_skips: int = 10) -> None:
        if mode not in ("error", "skip", "off"):
            raise ConfigError(f"module.nonfinite={mode!r} is not one of 'error', 'skip', 'off'")
        if max_consecutive_skips < 0:
            raise ConfigError(f"module.max_consecutive_skips={max_consecutive_skips} must be >= 0")
        self.mode = mode
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._step_loss: Tensor | None = None  # detached sum of this optimizer step's micro-batch losses
        self._pending: tuple[Tensor, torch.cuda.Event, int] | None = None  # read one step late

    def add_loss(self, loss: Tensor) -> None:
        """A micro-batch's loss, checked once per optimizer step."""
        if self.mode != "off":
            self._step_loss = loss.detach() if self._step_loss is None else self._step_loss + loss.detach()

    def check(self, trainer, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], norm: Tensor | None):
        """Before the optimizer step: `params` have gradients, `norm` is their clipping norm (None if not clipped).
        Returns True when `train/skipped_steps` changed (for the caller to log)."""
        if getattr(optimizer, "found_inf", None) is not None:
            optimizer.found_inf = None  # set by this guard one step earlier
        if self.mode == "off" or self._step_loss is None:
            return False
        bad = (~torch.isfinite(self._step_loss)).float()
        self._step_loss = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None and params:
            if norm is None:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            if isinstance(norm, DTensor):  # FSDP's sharded gradients: the norm over every rank's shards
                norm = norm.full_tensor()
            bad = bad + 2 * (~torch.isfinite(norm)).float()
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        step = trainer.global_step + 1
        if bad.device.type == "cuda" and optimizer.defaults.get("fused") and scaler is None:
            # 1. the device skips the update when bad > 0 (fused kernels take found_inf as a float flag)
            optimizer.found_inf = (bad > 0).float()
            # 2. the host learns of it one step late, from a copy that does not stall the queue
            changed = self.resolve_pending(trainer)
            host = torch.empty(bad.shape, dtype=bad.dtype, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event, step)
            return changed
        flag = int(bad.item())
        if flag:
            for p in params:  # optimizers leave parameters whose .grad is None untouched
                p.grad = None
        return self._checked(flag, step, trainer)

    def resolve_pending(self, trainer=None) -> bool:
        """Read a flag left by an earlier step; raises or counts if it was bad."""
        if self._pending is None:
            return False
        host, event, step = self._pending
        self._pending = None
        event.synchronize()
        return self._checked(int(host.item()), step, trainer)

    def _checked(self, flag: int, step: int, trainer=None) -> bool:
        if not flag:
            self.consecutive_skips = 0
            return False
        what = "loss" if flag & 1 else "gradient"
        saved = saved_checkpoint(trainer)
        redo = f"Resume with ckpt_path={saved} and" if saved else "No checkpoint was saved before it: start again with"
        if self.mode == "error":
            held = f", so the checkpoints hold steps <= {step - 1} only" if saved else ""
            raise NonFiniteLossError(
                f"non-finite {what} at step {step}; stopped before updating the weights{held}. {redo} a lower "
                "optim.lr, trainer.gradient_clip_val, another trainer.precision, or skip such steps with "
                "module.nonfinite=skip"
            )
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"non-finite {what} at step {step}: {self.consecutive_skips} steps in a row skipped, more than "
                f"module.max_consecutive_skips={self.max_consecutive_skips}; the weights hold steps <= {step - 1}. "
                f"{redo} a lower optim.lr, trainer.gradient_clip_val or another trainer.precision (or raise "
                "module.max_consecutive_skips)"
            )
        rank_zero_warn(f"non-finite {what} at step {step}: skipped ({self.skipped_steps} so far)")
        return True

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


def saved_checkpoint(trainer) -> str | None:
    """The newest checkpoint file that exists of those this run saved (its checkpoint callbacks' last and best) or
    resumed from; None when there is none (a run that diverged before its first save): advice names only it."""
    if trainer is None:
        return None
    paths = [
        getattr(cb, name, "") for cb in trainer.checkpoint_callbacks for name in ("last_model_path", "best_model_path")
    ]
    found = [Path(p) for p in [*paths, trainer.ckpt_path] if p and Path(p).is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def check_fused_clipping(trainer, optimizer: torch.optim.Optimizer) -> None:
    """Refuse at start-up what cannot work: clipping with a fused optimizer under 16-mixed's loss scaling."""
    if trainer is None or not trainer.gradient_clip_val or not optimizer.defaults.get("fused"):
        return
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ConfigError(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val} with optim.optimizer.fused=true under "
            f"trainer.precision={trainer.precision}: a fused optimizer unscales 16-bit gradients inside its "
            "step, after clipping; use trainer.precision=bf16-mixed, optim.optimizer.fused=false, or "
            "trainer.gradient_clip_val=null"
        )
