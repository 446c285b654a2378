"""DiffusionModule: the LightningModule that trains a `DiffusionModel` (network + process + conditioning + codec).

The model computes the loss (`DiffusionModel.training_loss`, `validation_loss`); this module keeps Lightning's
concerns around it: the training random stream, logging, the optimizer and its learning-rate plan, the non-finite
guard (`diffusion.guard`), and the checkpoint hooks. Validation uses fixed seeds and stratified fixed noise levels
(equally likely buckets of the training distribution) so that `val/loss` is comparable across runs, and reports it
per bucket (`val/loss_t0-99` on a discrete schedule, `val/loss_sigma0.06-0.13` on EDM, `val/loss_t0.3-0.4` on
flow, ...). The optimizer is any `torch.optim` factory (AdamW in the configs) with a linear warm-up and an optional
cosine decay. Checkpoints carry the model's self-description (`DiffusionModel.describe`).

Speed options (off by default): `compile` runs the network's forward through `torch.compile` (the checkpoint keeps
the plain network's keys), `channels_last` stores weights and activations NHWC (faster convolutions on tensor cores).

Memory options (docs/finetune.md, "Memory"): `adamw8bit` is the 8-bit AdamW factory of `optim=adamw8bit`; under
`trainer=fsdp` (Lightning's ModelParallelStrategy) `configure_model` shards the network with FSDP2's `fully_shard`
(Zhao et al. 2023, "PyTorch FSDP"), one unit per block, and checkpoints are saved whole (loadable in one process);
under a bf16-true / 16-true base a LoRA network's adapters go back to fp32 before the optimizer is built
(`LoRANet.cast_adapters`, as diffusers' `cast_training_params`).

A resumed run is the same run: the training randomness (levels, noise, condition dropout and the network's own
dropout) comes from one random stream owned by the module, seeded from `seed` and the rank and saved in every
checkpoint, so a run stopped at any step and resumed (`ckpt_path=`) takes the same steps as one that never stopped
(the data order and position come back through the datamodule's sampler, `diffusion.data.base.ResumableSampler`).
A resume with another `optim.lr` applies the new rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from diffusion.checkpoint import upgrade
from diffusion.errors import ConfigError
from diffusion.guard import NonFinite, NonFiniteGuard, NonFiniteLossError, check_fused_clipping
from diffusion.model import DiffusionModel
from diffusion.optional import require

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LRDecay = Literal["constant", "cosine"]
__all__ = ["DiffusionModule", "NonFiniteLossError", "adamw8bit"]
# Device types bitsandbytes 0.45+ runs its 8-bit optimizers on (CPU checked here: it trains; CUDA is the usual one).
BNB_DEVICES = ("cuda", "cpu", "xpu")


def adamw8bit(
    params: Iterable[nn.Parameter],
    *,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): both moments
    stored in 8 bits (2 bytes per parameter instead of 8), `optim=adamw8bit`. A one-line error names the extra when
    bitsandbytes is missing, and the device when bitsandbytes does not run there."""
    params = list(params)
    bnb = require("bitsandbytes", feature="optim=adamw8bit")
    for p in params:
        if p.device.type not in BNB_DEVICES:
            raise ConfigError(
                f"optim=adamw8bit: bitsandbytes' 8-bit AdamW does not run on {p.device.type} (it runs on "
                f"{', '.join(BNB_DEVICES)}); use optim=adamw"
            )
    return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards as units, innermost first: every item of every ModuleList (the blocks of a U-Net or
    a transformer, and the layers inside them), then the network itself; each unit's weights are gathered only
    while it runs."""
    containers = (nn.ModuleList, nn.ModuleDict)  # no forward of their own: FSDP cannot hook them
    units = [
        m
        for lst in net.modules()
        if isinstance(lst, nn.ModuleList)
        for m in lst
        if not isinstance(m, containers) and next(m.parameters(), None) is not None
    ]
    depth = {m: name.count(".") for name, m in net.named_modules()}
    return [*sorted(units, key=lambda m: -depth[m]), net]


class DiffusionModule(L.LightningModule):
    """Trains `model` (a `diffusion.model.DiffusionModel`).

    Args:
        model: the network, process, conditioning and codec; a trainable text encoder inside its conditioning is
            trained with the network.
        optimizer: a factory taking the parameters, e.g. `functools.partial(torch.optim.AdamW, lr=2e-4)`.
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        lr_decay: "constant" after warm-up, or "cosine" decay to 0 at the trainer's last step.
        cond_drop_prob: for conditional nets, the chance a condition is replaced by the null one (the null class,
            the empty caption) during training, so the net also learns the unconditional model (classifier-free
            guidance).
        val_seed: seed of the validation noise and noise levels.
        val_buckets: number of equally likely noise-level buckets the validation loss is broken into.
        nonfinite, max_consecutive_skips: the non-finite guard (`diffusion.guard`): "error", "skip" or "off".
        compile: run the network's forward through `torch.compile` in training and validation.
        channels_last: keep weights and images in channels-last memory format.
        seed: seed of the training random stream; each rank draws from `seed` and its rank. The stream's state
            is saved in checkpoints.
    """

    def __init__(
        self,
        *,
        model: DiffusionModel,
        optimizer: OptimizerFactory | None = None,
        warmup_steps: int = 0,
        lr_decay: LRDecay = "constant",
        cond_drop_prob: float = 0.1,
        val_seed: int = 0,
        val_buckets: int = 10,
        nonfinite: NonFinite = "error",
        max_consecutive_skips: int = 10,
        compile: bool = False,
        channels_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if lr_decay not in ("constant", "cosine"):
            raise ConfigError(f"optim.lr_decay={lr_decay!r} is not one of 'constant', 'cosine'")
        if warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={warmup_steps} must be >= 0")
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ConfigError(f"module.cond_drop_prob={cond_drop_prob} must be in [0, 1]")
        self.guard = NonFiniteGuard(nonfinite, max_consecutive_skips)
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.model = model
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self.warmup_steps = warmup_steps
        self.lr_decay = lr_decay
        self.cond_drop_prob = cond_drop_prob
        self.val_seed = val_seed
        self.bucket_names = model.process.bucket_names(val_buckets)  # raises for a bad module.val_buckets
        self.val_loss = MeanMetric()
        self.val_bucket_loss = nn.ModuleList(MeanMetric() for _ in range(val_buckets))
        self.channels_last = channels_last
        self.seed = seed
        self.rng_state: tuple[str, Tensor] | None = None  # the training stream: (device type, generator state)
        self._configured_lrs: list[float] = []  # each param group's lr as the optimizer factory builds it
        self._images_since_log = 0
        self._last_log_time: float | None = None
        self._validation_started: float | None = None
        if channels_last:
            model.net.to(memory_format=torch.channels_last)
        # torch.compile of the bound forward: a plain function, not a submodule, so the network is registered
        # once (state_dict keys stay "model.net.*", and a compiled run resumes an eager one and back); samplers
        # call the eager network.
        self.compiled_forward = torch.compile(model.net.forward) if compile else None
        # Set by train.py for init_from runs (init.ema_from_init): the net's weights right after loading,
        # for an EMA callback to start its average from (when it is not resuming its own state).
        self.ema_init_state: dict[str, Tensor] | None = None
        self._saved_lr_plan: dict | None = None  # the cosine plan a resumed checkpoint was trained with

    # --- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: tuple, batch_idx: int) -> Tensor:
        # (images, conditions) or (images, conditions, per-sample loss weights): the loss is the batch mean, or
        # sum(weights * losses) (DreamBooth: instance MSE + w * prior MSE, `diffusion.dreambooth.prior_weights`)
        x, conditions, *weights = batch
        with self.training_rng(x.device):
            losses = self.model.training_loss(
                x,
                conditions,
                drop_prob=self.cond_drop_prob,
                forward=self.compiled_forward,
                channels_last=self.channels_last,
            )
        loss = losses.mean() if not weights else (losses * weights[0].to(losses)).sum()
        self.guard.add_loss(loss)  # checked once per optimizer step, in configure_gradient_clipping
        self.log("train/loss", loss, prog_bar=True)
        self._images_since_log += x.shape[0]
        if self._is_log_step():
            self._log_rates()
        return loss

    @contextmanager
    def training_rng(self, device: torch.device) -> Iterator[None]:
        """Run the block on the module's training random stream, leaving the global one as it was.

        The block draws from torch's global generator of `device` (so the network's dropout is covered too);
        here that generator holds the stream's state, saved back afterwards. Backward passes draw nothing
        (activation checkpointing replays the state it stashed in the forward).
        """
        kind = device.type
        accel = None if kind == "cpu" else torch.get_device_module(kind)
        index = device.index if device.index is not None else (accel.current_device() if accel else 0)
        with torch.random.fork_rng(devices=[index] if accel else [], device_type=kind if accel else "cuda"):
            if self.rng_state is None or self.rng_state[0] != kind:  # a new run, or resumed on another device type
                trainer = self._attached_trainer()
                rank, step = (trainer.global_rank, trainer.global_step) if trainer is not None else (0, 0)
                g = torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + rank) * 1_000_003 + step)
                self.rng_state = (kind, g.get_state())
            if accel is None:
                torch.set_rng_state(self.rng_state[1])
            else:
                accel.set_rng_state(self.rng_state[1], index)
            yield
            self.rng_state = (kind, torch.get_rng_state() if accel is None else accel.get_rng_state(index))

    def _attached_trainer(self) -> L.Trainer | None:
        """The trainer this module is attached to, or None (research use: training_step outside a Trainer)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _is_log_step(self) -> bool:
        """True on the batches whose logged values the loggers write: Lightning writes when the optimizer steps
        taken so far (`global_step` inside training_step) plus one is a multiple of trainer.log_every_n_steps."""
        trainer = self._attached_trainer()
        if trainer is None:
            return False
        every = trainer.log_every_n_steps
        return every > 0 and (trainer.global_step + 1) % every == 0

    def _log_rates(self) -> None:
        """Learning rate and images/s over the batches since the last log: host-side only, no device sync."""
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        now = time.perf_counter()
        if self._last_log_time is not None:
            trainer = self._attached_trainer()
            world = trainer.world_size if trainer is not None else 1
            rate = self._images_since_log * world / (now - self._last_log_time)
            self.log("train/images_per_sec", rate, prog_bar=True)
        self._last_log_time = now
        self._images_since_log = 0

    def on_validation_start(self) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self) -> None:
        # validation is not training time: move the rate's clock on by its duration. The clock runs across epochs
        # (the turnover is part of training), so a rate is logged also when an epoch is shorter than the period.
        if self._last_log_time is not None and self._validation_started is not None:
            self._last_log_time += time.perf_counter() - self._validation_started
        self._validation_started = None

    # --- gradient clipping and the non-finite guard ------------------------------------------------------
    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradients ourselves, then let the guard stop (or skip) a non-finite step; Lightning calls this
        right before the optimizer step. Clipping here (not in Lightning's precision plugin) lets fused optimizers
        clip under bf16-mixed (16-mixed ones are refused: `check_fused_clipping`); the guard reuses the norm."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = None
        if gradient_clip_val and params:
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
        if self.guard.check(self.trainer, optimizer, params, norm):
            self.log("train/skipped_steps", float(self.guard.skipped_steps))

    def on_train_end(self) -> None:
        self.guard.resolve_pending(self.trainer)

    # --- validation at fixed noise and noise levels ---------------------------------------------------
    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, conditions, *_ = batch
        loss, bucket = self.model.validation_loss(
            x,
            conditions,
            seed=self.val_seed * 1_000_003 + batch_idx,
            buckets=len(self.val_bucket_loss),
            forward=self.compiled_forward,
        )
        self.val_loss.update(loss)
        for i, metric in enumerate(self.val_bucket_loss):
            sel = loss[bucket == i]
            if sel.numel():
                metric.update(sel)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=False)
        self.val_loss.reset()
        for i, metric in enumerate(self.val_bucket_loss):
            if metric.update_count:  # torchmetrics syncs the sums across ranks in compute()
                self.log(f"val/loss_{self.bucket_names[i]}", metric.compute())
            metric.reset()

    # --- optimization ------------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Multiplier on the base learning rate at optimizer step `step`: warm-up, then constant or cosine."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_decay == "constant":
            return 1.0
        total = self._lr_total()
        progress = min(1.0, (step - self.warmup_steps) / (total - self.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    def configure_model(self) -> None:
        """trainer=fsdp (ModelParallelStrategy, which hands the module a device mesh): shard the network's weights,
        gradients and optimizer state over the data-parallel ranks with FSDP2. The frozen codec and text encoder
        stay whole on every rank (they take no gradients or optimizer state)."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names else mesh
        for unit in shard_units(self.model.net):
            fully_shard(unit, mesh=dp_mesh)

    def configure_optimizers(self):
        # what trains: the net's trainable weights (LoRA: the adapters) and a trainable text encoder; frozen
        # weights get no optimizer state. Lightning has applied trainer.precision by now: a bf16-true base
        # puts LoRA adapters back into fp32 here (finetune.adapter_dtype), before the optimizer sees them.
        cast_adapters = getattr(self.model.net, "cast_adapters", None)
        if cast_adapters is not None:
            cast_adapters()
        params = [*self.model.net.parameters(), *self.model.conditioning.parameters()]
        optimizer = self.optimizer_factory([p for p in params if p.requires_grad])
        check_fused_clipping(self._attached_trainer(), optimizer)
        self._configured_lrs = [group["lr"] for group in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        # trainer.precision=bf16-true / 16-true casts the whole module, metric states included: keep the
        # validation sums in fp32 (a bf16 val/loss is rounded to 3 significant digits).
        for metric in (self.val_loss, *self.val_bucket_loss):
            metric.set_dtype(torch.float32)

    def _lr_total(self) -> int:
        """The step where the cosine decay reaches 0: the trainer's last (trainer.max_steps or the epochs')."""
        return max(int(self.trainer.estimated_stepping_batches), self.warmup_steps + 1)

    def on_train_start(self) -> None:
        self._apply_configured_lr()
        saved = self._saved_lr_plan
        if saved and self.lr_decay == "cosine" and saved.get("total") != self._lr_total():
            step, base = self.lr_schedulers().last_epoch, self._configured_lrs[0]
            rank_zero_info(
                f"resuming at step {step} with the cosine decay to 0 at step {self._lr_total()} (trainer.max_steps), "
                f"where the checkpoint's ended at step {saved.get('total')}: from here the learning rate follows the "
                f"new plan ({base * self.lr_factor(step):g} now, {base * self.lr_factor(saved.get('total')):g} at "
                f"step {saved.get('total')})"
            )

    def _apply_configured_lr(self) -> None:
        """After a resume, train at the configured learning rate (Lightning restores the checkpoint's), continuing
        the warm-up / decay plan from the restored step: a resume after a non-finite stop may lower `optim.lr`."""
        scheduler = self.lr_schedulers()
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or not self._configured_lrs:
            return
        if list(scheduler.base_lrs) == self._configured_lrs:
            return
        rank_zero_info(
            f"resuming with optim.lr={self._configured_lrs[0]:g} (the checkpoint's was {scheduler.base_lrs[0]:g}); "
            f"the schedule continues from step {scheduler.last_epoch}"
        )
        factor = self.lr_factor(scheduler.last_epoch)
        scheduler.base_lrs = list(self._configured_lrs)
        for group, lr in zip(scheduler.optimizer.param_groups, self._configured_lrs, strict=True):
            group["initial_lr"] = lr
            group["lr"] = lr * factor

    # --- self-describing checkpoints ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.guard.resolve_pending(self.trainer)  # a bad step found late stops the run here, before this save
        checkpoint["diffusion"] = self.model.describe()
        if self.lr_decay == "cosine" and self._attached_trainer() is not None:
            checkpoint["lr_plan"] = {"decay": self.lr_decay, "total": self._lr_total()}
        checkpoint.update(self.guard.state_dict())
        if self.rng_state is not None:
            checkpoint["training_rng"] = {"device_type": self.rng_state[0], "state": self.rng_state[1]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade(checkpoint)  # a checkpoint written before the model object: its keys as today's (before loading)
        self.guard.load_state_dict(checkpoint)
        self._saved_lr_plan = checkpoint.get("lr_plan")
        rng = checkpoint.get("training_rng")
        if rng is not None:
            self.rng_state = (rng["device_type"], rng["state"].cpu())
