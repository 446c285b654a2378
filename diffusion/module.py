"""DiffusionModule: the LightningModule that trains a denoising network (DDPM, Ho et al. 2020, Algorithm 1).

Training step: draw a noise level from the process (`diffusion.process`: a timestep of a discrete schedule,
EDM's sigma, flow matching's t), noise x_0 into x_t, give the network what the process says it takes, and take
the process's weighted MSE against its target in fp32. The module never asks which family it trains. Validation
uses fixed seeds and stratified fixed noise levels (equally likely buckets of the training distribution) so
that `val/loss` is comparable across runs, and reports it per bucket (`val/loss_t0-99` on a discrete schedule,
`val/loss_sigma0.06-0.13` on EDM, `val/loss_t0.3-0.4` on flow, ...). The optimizer is any `torch.optim` factory
(AdamW in the configs) with a linear warm-up and an optional cosine decay. Checkpoints carry what is needed to
rebuild the network and process (see `diffusion.checkpoint`).

Speed and safety options (all off by default except the non-finite check): `compile` runs the network's
forward through `torch.compile` (the checkpoint keeps the plain network's keys), `channels_last` stores
weights and activations NHWC (faster convolutions on tensor cores), and `nonfinite` stops ("error") or skips
and counts ("skip") an optimizer step whose loss or gradients are not finite, before anything is updated or
saved.

A resumed run is the same run: the training randomness (timesteps, noise, label dropout and the network's own
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
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from diffusion.checkpoint import describe
from diffusion.codec import Codec, IdentityCodec
from diffusion.conditioning import Conditioning, class_or_none
from diffusion.errors import ConfigError, UserError
from diffusion.process.base import Process

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LRDecay = Literal["constant", "cosine"]
NonFinite = Literal["error", "skip", "off"]


class NonFiniteLossError(UserError, FloatingPointError, ValueError):
    """A training step produced a non-finite loss or gradient; the weights were not updated by it."""


class DiffusionModule(L.LightningModule):
    """Wraps a denoising network and a diffusion process into a trainable model.

    Args:
        net: maps (x, t, **conditioning kwargs) to the prediction target; e.g. `diffusion.unet.UNet`.
        schedule: the process (`diffusion.process.Process`: a discrete `NoiseSchedule`, `EDM` or `Flow`): how
            levels are drawn, what the network is given and asked for, and the loss weighting.
        codec: what the network models in place of pixels (`diffusion.codec`): batches are encoded through it
            (pixels, or a latent cache's moments), and samples decode through it; default pixels.
        conditioning: turns a batch's conditions (labels, captions) into the net's keyword arguments
            (`diffusion.conditioning`); default: class labels when the net has `num_classes`, else none. A
            trainable text encoder inside it is trained with the net.
        optimizer: a factory taking the parameters, e.g. `functools.partial(torch.optim.AdamW, lr=2e-4)`.
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        lr_decay: "constant" after warm-up, or "cosine" decay to 0 at the trainer's last step.
        cond_drop_prob: for conditional nets, the chance a condition is replaced by the null one (the null class,
            the empty caption) during training, so the net also learns the unconditional model (classifier-free
            guidance).
        val_seed: seed of the validation noise and noise levels.
        val_buckets: number of equally likely noise-level buckets the validation loss is broken into.
        nonfinite: what a non-finite loss or gradient does: "error" stops training before the optimizer step
            (so no checkpoint holds the bad step), "skip" drops that step and counts it in
            `train/skipped_steps`, "off" does not check (saves one host-device sync per step).
        max_consecutive_skips: with `nonfinite="skip"`, more consecutive skipped steps than this stop the run
            with `NonFiniteLossError` (a run that skips most of its steps is not training).
        compile: run the network's forward through `torch.compile` in training and validation.
        channels_last: keep weights and images in channels-last memory format.
        seed: seed of the training random stream (timesteps, noise, label dropout, network dropout); each
            rank draws from `seed` and its rank. The stream's state is saved in checkpoints.
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        schedule: Process,
        codec: Codec | None = None,
        conditioning: Conditioning | None = None,
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
        if nonfinite not in ("error", "skip", "off"):
            raise ConfigError(f"module.nonfinite={nonfinite!r} is not one of 'error', 'skip', 'off'")
        if max_consecutive_skips < 0:
            raise ConfigError(f"module.max_consecutive_skips={max_consecutive_skips} must be >= 0")
        self.save_hyperparameters(ignore=["net", "schedule", "codec", "conditioning", "optimizer"])
        self.net = net
        self.schedule = schedule
        self.codec = codec if codec is not None else IdentityCodec()  # frozen; its tensors stay out of checkpoints
        self.conditioning = conditioning or class_or_none(num_classes=getattr(net, "num_classes", None))
        self.conditioning.check_network(net)
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self.warmup_steps = warmup_steps
        self.lr_decay = lr_decay
        self.cond_drop_prob = cond_drop_prob
        self.val_seed = val_seed
        self.num_classes = getattr(net, "num_classes", None)
        self.bucket_names = schedule.bucket_names(val_buckets)  # raises for a bad module.val_buckets
        self.val_loss = MeanMetric()
        self.val_bucket_loss = nn.ModuleList(MeanMetric() for _ in range(val_buckets))
        self.nonfinite = nonfinite
        self.channels_last = channels_last
        self.skipped_steps = 0
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.seed = seed
        self.rng_state: tuple[str, Tensor] | None = None  # the training stream: (device type, generator state)
        self._configured_lrs: list[float] = []  # each param group's lr as the optimizer factory builds it
        self._step_loss: Tensor | None = None  # detached sum of this optimizer step's micro-batch losses
        self._images_since_log = 0
        self._last_log_time: float | None = None
        self._validation_started: float | None = None
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # torch.compile of the bound forward: a plain function, not a submodule, so the network is registered
        # once (state_dict keys stay "net.*", and a compiled run resumes an eager one and back); samplers call
        # the eager network.
        self._compiled_forward = torch.compile(self.net.forward) if compile else None
        self._pending_bad: tuple[Tensor, torch.cuda.Event, int] | None = None  # read one step late
        # Set by train.py for init_from runs (init.ema_from_init): the net's weights right after loading,
        # for an EMA callback to start its average from (when it is not resuming its own state).
        self.ema_init_state: dict[str, Tensor] | None = None

    # --- the objective ---------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return self.net(x_t, t, **cond)

    def net_forward(self, x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        """The network's forward as training and validation run it: compiled when `compile` is on."""
        if self._compiled_forward is not None:
            return self._compiled_forward(x_t, t, **cond)
        return self.net(x_t, t, **cond)

    def conditions(self, cond, device: torch.device, *, train: bool) -> dict[str, Tensor]:
        """The net's keyword arguments for a batch's conditions; in training some go to the null condition."""
        return self.conditioning(cond, device=device, drop_prob=self.cond_drop_prob if train else 0.0)

    def per_sample_loss(self, x0: Tensor, level: Tensor, noise: Tensor, cond: dict[str, Tensor] | None) -> Tensor:
        """Weighted MSE between the net's output and the process's target at `level`, per sample, in fp32: (B,).

        `cond`: the net's conditioning keyword arguments (`conditions`), None for none."""
        x_t = self.schedule.q_sample(x0, level, noise)
        out = self.net_forward(*self.schedule.net_input(x_t, level), **(cond or {}))
        target = self.schedule.target(x0, noise, level)
        mse = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
        return mse * self.schedule.loss_weight(level)

    def training_step(self, batch: tuple[Tensor, Tensor | list[str]], batch_idx: int) -> Tensor:
        x, y = batch
        with self.training_rng(x.device):
            x0 = self.codec.encode(x)  # a latent sample (or the mean, codec.sample=false) on the training stream
            if self.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            level = self.schedule.draw_levels(x0.shape[0], device=x0.device)
            noise = torch.randn_like(x0)
            loss = self.per_sample_loss(x0, level, noise, self.conditions(y, x0.device, train=True)).mean()
        if self.nonfinite != "off":  # checked once per optimizer step, in configure_gradient_clipping
            self._step_loss = loss.detach() if self._step_loss is None else self._step_loss + loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        self._images_since_log += x0.shape[0]
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
        """True on the batches whose logged values the loggers write (every trainer.log_every_n_steps).

        Lightning writes logs when the count of optimizer steps taken so far plus one is a multiple of the period;
        inside training_step that count is `global_step` (one optimizer, automatic optimization).
        """
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

    # --- gradient clipping and the non-finite loss / gradient guard ----------------------------------------
    def _check_fused_clipping(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse at start-up what cannot work: clipping with a fused optimizer under 16-mixed's loss scaling."""
        trainer = self._attached_trainer()
        if trainer is None or not trainer.gradient_clip_val or not optimizer.defaults.get("fused"):
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ConfigError(
                f"trainer.gradient_clip_val={trainer.gradient_clip_val} with optim.optimizer.fused=true under "
                f"trainer.precision={trainer.precision}: a fused optimizer unscales 16-bit gradients inside its "
                "step, after clipping; use trainer.precision=bf16-mixed, optim.optimizer.fused=false, or "
                "trainer.gradient_clip_val=null"
            )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradients ourselves, and stop (or skip) a step whose loss or gradients are not finite.

        Lightning calls this after backward and `on_before_optimizer_step`, right before the optimizer step.
        Clipping here (not through Lightning's precision plugin) lets fused optimizers clip under bf16-mixed,
        where there is no loss scaling to undo (16-mixed gradients are already unscaled here, except for fused
        optimizers, which `_check_fused_clipping` refuses). The clipping norm is reused by the guard, so
        the gradients are reduced once.

        The guard never lets a bad step reach the weights: on a CUDA device with a fused optimizer the flag goes
        to the optimizer's kernel as `found_inf` (the protocol torch's GradScaler uses), which skips the whole
        update on the device, and the host reads the flag one step late without stalling the queue; elsewhere
        the flag is read at once (on a CPU that costs nothing, there is no queue to stall). With 16-mixed the
        gradient scaler already skips overflowing gradients, so only the loss is checked.
        """
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = None
        if gradient_clip_val and params:
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
        self._check_finite(optimizer, params, norm)

    def _check_finite(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], norm: Tensor | None) -> None:
        """The guard of `configure_gradient_clipping`: `params` have gradients, `norm` is their clipping norm."""
        if getattr(optimizer, "found_inf", None) is not None:
            optimizer.found_inf = None  # set by this guard one step earlier
        if self.nonfinite == "off" or self._step_loss is None:
            return
        bad = (~torch.isfinite(self._step_loss)).float()
        self._step_loss = None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None and params:
            if norm is None:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            bad = bad + 2 * (~torch.isfinite(norm)).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        step = self.trainer.global_step + 1
        if bad.device.type == "cuda" and optimizer.defaults.get("fused") and scaler is None:
            # 1. the device skips the update when bad > 0 (fused kernels take found_inf as a float flag)
            optimizer.found_inf = (bad > 0).float()
            # 2. the host learns of it one step late, from a copy that does not stall the queue
            self._resolve_pending(log=True)
            host = torch.empty(bad.shape, dtype=bad.dtype, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_bad = (host, event, step)
            return
        flag = int(bad.item())
        if flag:
            for p in params:  # optimizers leave parameters whose .grad is None untouched
                p.grad = None
        self._on_step_checked(flag, step, log=True)

    def _resolve_pending(self, *, log: bool = False) -> None:
        """Read a flag left by an earlier step (see `configure_gradient_clipping`); raises or counts if it was bad."""
        if self._pending_bad is None:
            return
        host, event, step = self._pending_bad
        self._pending_bad = None
        event.synchronize()
        self._on_step_checked(int(host.item()), step, log=log)

    def _on_step_checked(self, flag: int, step: int, *, log: bool) -> None:
        """A step's guard flag is known: a finite step ends a run of skips, a non-finite one goes to `_on_bad_step`."""
        if flag:
            self._on_bad_step(flag, step, log=log)
        else:
            self.consecutive_skips = 0

    def _on_bad_step(self, flag: int, step: int, *, log: bool) -> None:
        """A non-finite step was kept out of the weights: stop ("error") or count it ("skip")."""
        what = "loss" if flag & 1 else "gradient"
        if self.nonfinite == "error":
            raise NonFiniteLossError(
                f"non-finite {what} at step {step}; stopped before updating the weights, so the checkpoints "
                f"hold steps <= {step - 1} only. Resume from the last checkpoint with a lower optim.lr, "
                "trainer.gradient_clip_val, another trainer.precision, or skip such steps with module.nonfinite=skip"
            )
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"non-finite {what} at step {step}: {self.consecutive_skips} steps in a row skipped, more than "
                f"module.max_consecutive_skips={self.max_consecutive_skips}; the weights hold steps <= {step - 1}. "
                "Resume from the last checkpoint with a lower optim.lr, trainer.gradient_clip_val or another "
                "trainer.precision (or raise module.max_consecutive_skips)"
            )
        if log:  # Lightning takes self.log only in step hooks
            self.log("train/skipped_steps", float(self.skipped_steps))
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"non-finite {what} at step {step}: skipped ({self.skipped_steps} so far)")

    def on_train_end(self) -> None:
        self._resolve_pending()

    # --- validation at fixed noise and noise levels ---------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor | list[str]], batch_idx: int) -> None:
        x, y = batch
        x0 = self.codec.encode(x, sample=False)  # the latent mean: the same val/loss every time
        b, k = x0.shape[0], len(self.val_bucket_loss)
        g = torch.Generator().manual_seed(self.val_seed * 1_000_003 + batch_idx)
        # Stratified levels: sample i falls in bucket i mod k, at a seeded position inside it.
        bucket = torch.arange(b) % k
        level = self.schedule.val_levels(bucket, torch.rand(b, generator=g), k).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        loss = self.per_sample_loss(x0, level, noise, self.conditions(y, x0.device, train=False))
        self.val_loss.update(loss)
        bucket = bucket.to(x0.device)
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
        total = max(int(self.trainer.estimated_stepping_batches), self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / (total - self.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    def configure_optimizers(self):
        # what trains: the net's trainable weights (LoRA: the adapters) and a trainable text encoder; frozen
        # weights get no optimizer state
        params = [*self.net.parameters(), *self.conditioning.parameters()]
        optimizer = self.optimizer_factory([p for p in params if p.requires_grad])
        self._check_fused_clipping(optimizer)
        self._configured_lrs = [group["lr"] for group in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        # trainer.precision=bf16-true / 16-true casts the whole module, metric states included: keep the
        # validation sums in fp32 (a bf16 val/loss is rounded to 3 significant digits).
        for metric in (self.val_loss, *self.val_bucket_loss):
            metric.set_dtype(torch.float32)

    def on_train_start(self) -> None:
        self._apply_configured_lr()

    def _apply_configured_lr(self) -> None:
        """After a resume, use the configured learning rate, not the one saved with the optimizer's state.

        Lightning restores the optimizer's param groups (lr, initial_lr) and the scheduler's base rates from the
        checkpoint; a resume with another `optim.lr` (e.g. after a non-finite stop) must train at the new rate,
        continuing the warm-up / decay schedule from the restored step.
        """
        scheduler = self.lr_schedulers()
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or not self._configured_lrs:
            return
        if list(scheduler.base_lrs) == self._configured_lrs:
            return
        from lightning.pytorch.utilities import rank_zero_info

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
        self._resolve_pending()  # a bad step found late stops the run here, before this checkpoint is written
        checkpoint["diffusion"] = describe(self.net, self.schedule, self.conditioning, codec=self.codec)
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["consecutive_skips"] = self.consecutive_skips
        if self.rng_state is not None:
            checkpoint["training_rng"] = {"device_type": self.rng_state[0], "state": self.rng_state[1]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self.consecutive_skips = int(checkpoint.get("consecutive_skips", 0))
        rng = checkpoint.get("training_rng")
        if rng is not None:
            self.rng_state = (rng["device_type"], rng["state"].cpu())
        # Checkpoints written before the network was registered once also hold it as "net_forward.*".
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("net_forward.")]:
            del state[key]
