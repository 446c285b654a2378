"""EMA: an exponential moving average of the network's weights, kept beside the weights being trained.

Diffusion models are evaluated and sampled with averaged weights (Ho et al. 2020 use decay 0.9999; Song et al.
2021, "Score-Based Generative Modeling through SDEs", App. H; Karras et al. 2022, EDM). The decay warms up from
0 with the number of steps since the average started (the `1 - (1 + step / inv_gamma) ** -power` form of
diffusers' EMAModel / Karras' "power" EMA), so early averages are not dominated by the random initialisation.

Why not Lightning's `EMAWeightAveraging`: its decay is a constant (no warm-up), it averages the whole
LightningModule, it copies the average into the trained weights when training ends, and it stores the average
as `checkpoint["state_dict"]`. Here the trained weights are never overwritten (evaluation swaps the average in
and restores the raw tensors bit for bit), checkpoints keep the raw weights in `state_dict` and the average,
unprefixed, in `checkpoint["ema_state_dict"]` (what `DiffusionModel.from_checkpoint` reads), and resuming
restores the average exactly.

Every DDP rank holds its own copy and applies the same update to the same (all-reduced) weights, so the copies
stay identical without communication. Under FSDP (`trainer=fsdp`) the weights are sharded DTensors and each rank
averages its own shard; checkpoints hold the whole average (gathered on save, sharded again on load), so they
load into one process as any other. Other callbacks use the average through `ema_weights(trainer, module)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from diffusion.checkpoint import EMA_KEY
from diffusion.errors import ConfigError


def ema_decay(
    step: int, *, decay: float, inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0
) -> float:
    """Decay of the update made `step` optimizer steps after the average started (0 for the first update).

    1 - (1 + step / inv_gamma) ** -power, clamped to [min_decay, decay]; it is 0 at step 0 (the average starts as
    a copy of the weights). power=2/3 reaches 0.999 after ~31k steps, power=3/4 reaches 0.9999 after ~215k.
    """
    if step < 0:
        return 0.0
    value = 1.0 - (1.0 + step / inv_gamma) ** -power
    return max(min_decay, min(decay, value))


class EMA(L.Callback):
    """Keeps an exponential moving average of `pl_module.model.net`'s weights.

    Args:
        decay: the largest decay (the decay itself when `warmup=false`).
        warmup: grow the decay as 1 - (1 + step / inv_gamma) ** -power (see `ema_decay`); else constant.
        inv_gamma, power: the warm-up's shape.
        min_decay: a floor on the warm-up's decay.
        update_every_n_steps: update after every N-th optimizer step (the decay is per update, so the average
            spans N times more optimizer steps; lower (1 - decay) by N to keep the same horizon).
        start_step: the average starts after this many optimizer steps (it equals the raw weights until then).
        device: where the average lives ("cpu" saves accelerator memory); default: the weights' device.
        validate_with_ema: run validation (`val/loss`) with the averaged weights.
    """

    def __init__(
        self,
        *,
        decay: float = 0.9999,
        warmup: bool = True,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        device: str | None = None,
        validate_with_ema: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"callbacks.ema.decay={decay} must be in [0, 1)")
        if not 0.0 <= min_decay <= decay:
            raise ConfigError(f"callbacks.ema.min_decay={min_decay} must be in [0, callbacks.ema.decay={decay}]")
        if inv_gamma <= 0 or power <= 0:
            raise ConfigError(f"callbacks.ema.inv_gamma={inv_gamma} and callbacks.ema.power={power} must be > 0")
        if update_every_n_steps < 1:
            raise ConfigError(f"callbacks.ema.update_every_n_steps={update_every_n_steps} must be >= 1")
        if start_step < 0:
            raise ConfigError(f"callbacks.ema.start_step={start_step} must be >= 0")
        self.decay = decay
        self.warmup = warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_decay = min_decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.device = torch.device(device) if device else None
        self.validate_with_ema = validate_with_ema
        self.ema: dict[str, Tensor] | None = None  # net.state_dict() names -> averaged tensors
        self.num_updates = 0
        self.last_update_step = -1
        self.last_decay: float | None = None
        self.from_init = False  # started from fine-tuning weights (init_from), not from the first step's
        self._swapped = False
        self._val_swap: contextlib.ExitStack | None = None

    # --- the average ----------------------------------------------------------------------------------
    def decay_at(self, global_step: int) -> float:
        """Decay of the update made after optimizer step `global_step` (1-based: after the first step it is 1)."""
        step = global_step - self.start_step - 1
        # An average started from fine-tuning weights (from_init) warms up like any other: the warm-up keeps its
        # horizon a fraction of the steps taken, where a full decay of 0.9999 from the start would hold a short
        # fine-tune's average at the loaded weights (a 300-step LoRA run's EMA was 97% its starting adapters).
        # Only a constant decay (warmup=false) averages from the loaded weights, at full decay at once.
        if not self.warmup:
            return 0.0 if self.num_updates == 0 else self.decay
        return ema_decay(step, decay=self.decay, inv_gamma=self.inv_gamma, power=self.power, min_decay=self.min_decay)

    def _is_due(self, global_step: int) -> bool:
        return (
            global_step > self.start_step
            and global_step > self.last_update_step
            and (global_step - self.start_step - 1) % self.update_every_n_steps == 0
        )

    @torch.no_grad()
    def update(self, net: nn.Module, global_step: int) -> None:
        """ema <- d * ema + (1 - d) * weights for floating-point parameters; buffers are copied."""
        decay = self.decay_at(global_step)
        state = net.state_dict()
        self._to_device(net)
        if self.ema is None or self.num_updates == 0:
            self.ema = {k: self._stored(v).clone() for k, v in state.items()}
        else:
            params = {name for name, _ in net.named_parameters()}
            avg_keys = [k for k, v in state.items() if k in params and v.is_floating_point()]
            ema = [self.ema[k] for k in avg_keys]
            torch._foreach_lerp_(ema, [self._stored(state[k]) for k in avg_keys], 1.0 - decay)
            for k, v in state.items():
                if k not in params or not v.is_floating_point():
                    self.ema[k].copy_(v)
        self.num_updates += 1
        self.last_update_step = global_step
        self.last_decay = decay

    def _stored(self, v: Tensor) -> Tensor:
        """How a weight is stored in the average: on `device`, in at least fp32 (bf16 averages lose updates)."""
        v = v.detach().to(self.device or v.device)
        return v.float() if v.is_floating_point() and v.element_size() < 4 else v

    def _to_device(self, net: nn.Module) -> None:
        """Move a restored average next to the weights (checkpoints load onto the CPU first); a whole average
        restored into a sharded (FSDP) network is sharded as its weights are."""
        if self.ema is None:
            return
        first = next(net.parameters())
        if isinstance(first, DTensor):
            if not any(isinstance(v, DTensor) for v in self.ema.values()):  # whole, from a checkpoint
                ref = net.state_dict()
                self.ema = {k: _shard_like(v, ref[k]) for k, v in self.ema.items()}
            return
        device = self.device or first.device
        if any(v.device != device for v in self.ema.values()):
            self.ema = {k: v.to(device) for k, v in self.ema.items()}

    def maybe_update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Update once per due optimizer step; safe to call from several hooks (other callbacks call it first)."""
        if self._is_due(trainer.global_step):
            self.update(pl_module.model.net, trainer.global_step)

    def state_dict_for_net(self, net: nn.Module) -> dict[str, Tensor]:
        """The averaged weights as a state dict for `net` (its raw weights while the average has not started)."""
        if self.ema is None or self.num_updates == 0:
            return {k: v.detach().clone() for k, v in net.state_dict().items()}
        ref = net.state_dict()
        return {k: v.to(ref[k].dtype) for k, v in self.ema.items()}

    @contextlib.contextmanager
    def swapped_in(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Run the body with the averaged weights in `pl_module.model.net`; the raw tensors are restored exactly after.

        Re-entrant: a nested call inside an active swap does nothing. Before the average starts it does nothing.
        """
        if self._swapped or self.ema is None or self.num_updates == 0:
            yield
            return
        net = pl_module.model.net
        self._to_device(net)
        state = net.state_dict()  # the live tensors, so copy_ writes into the module
        raw = {k: v.detach().clone() for k, v in state.items()}
        self._swapped = True
        try:
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(self.ema[k])
            yield
        finally:
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(raw[k])
            self._swapped = False

    # --- Lightning hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if not hasattr(pl_module, "model"):
            raise TypeError(f"the EMA callback needs a DiffusionModule (a `.model`), not {type(pl_module).__name__}")
        init = getattr(pl_module, "ema_init_state", None)
        if init is not None and self.ema is None and self.num_updates == 0:
            # Fine-tuning (init_from with init.ema_from_init): the average starts at the loaded weights; with the
            # warm-up the first updates move it to the fine-tuned ones, with a constant decay it leaves them slowly.
            self.ema = {k: self._stored(v).clone() for k, v in init.items()}
            self.num_updates, self.from_init = 1, True
            rank_zero_info(
                "EMA: starts from the init_from weights, "
                + ("with the warm-up" if self.warmup else f"at constant decay {self.decay}")
            )
        self._to_device(pl_module.model.net)
        rank_zero_info(
            f"EMA: decay {self.decay} ({'warm-up' if self.warmup else 'constant'}), every "
            f"{self.update_every_n_steps} step(s) after step {self.start_step}; "
            + ("val/loss, " if self.validate_with_ema else "")
            + "sample grids, FID and checkpoints' ema_state_dict use the averaged weights"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        due = self._is_due(trainer.global_step)
        self.maybe_update(trainer, pl_module)
        if due:
            pl_module.log("train/ema_decay", self.last_decay, on_step=True, on_epoch=False)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.validate_with_ema and trainer.state.fn == "fit":
            self._val_swap = contextlib.ExitStack()
            self._val_swap.enter_context(self.swapped_in(pl_module))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # Every forward pass has run by now; the module's own epoch-end hook only reduces the metrics.
        if self._val_swap is not None:
            self._val_swap.close()
            self._val_swap = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._val_swap is not None:  # never leave the average in the trained weights
            self._val_swap.close()
            self._val_swap = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # The average as it is kept (fp32 for low-precision weights), so resuming a bf16-true run loses nothing.
        if self.ema is None or self.num_updates == 0:
            state = {k: self._stored(v) for k, v in pl_module.model.net.state_dict().items()}
        else:
            state = self.ema
        # full_tensor gathers an FSDP shard: a collective, which Lightning runs on every rank
        checkpoint[EMA_KEY] = {k: _whole(v).detach().cpu().clone() for k, v in state.items()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get(EMA_KEY)
        if not state:
            rank_zero_info("EMA: the checkpoint has no ema_state_dict; the average restarts from its weights")
            self.ema, self.num_updates = None, 0
            return
        self.ema = {k: self._stored(v).clone() for k, v in state.items()}

    def state_dict(self) -> dict:
        return {
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "from_init": self.from_init,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self.last_update_step = int(state_dict["last_update_step"])
        self.from_init = bool(state_dict.get("from_init", False))


def _whole(v: Tensor) -> Tensor:
    """A sharded (FSDP DTensor) weight gathered whole; any other tensor as it is."""
    return v.full_tensor() if isinstance(v, DTensor) else v


def _shard_like(v: Tensor, ref: Tensor) -> Tensor:
    """`v` (whole) sharded over the same mesh and placements as `ref` when `ref` is a DTensor."""
    if not isinstance(ref, DTensor):
        return v.to(ref.device)
    return distribute_tensor(v.to(ref.device), ref.device_mesh, ref.placements)


def find_ema(trainer: L.Trainer | None) -> EMA | None:
    """The trainer's EMA callback, if it has one."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, EMA):
            return callback
    return None


@contextlib.contextmanager
def ema_weights(trainer: L.Trainer | None, pl_module: L.LightningModule) -> Iterator[bool]:
    """Run the body with the EMA weights when the trainer has an EMA callback (brought up to date first).

    Yields whether the averaged weights are in use.
    """
    ema = find_ema(trainer)
    if ema is None:
        yield False
        return
    ema.maybe_update(trainer, pl_module)
    with ema.swapped_in(pl_module):
        yield ema.num_updates > 0
