"""DiffusionModule: the LightningModule that trains a denoising network (DDPM, Ho et al. 2020, Algorithm 1).

Training step: sample t uniformly, noise x_0 into x_t with the schedule, predict the schedule's target
(eps, v or x0), and take the (optionally min-SNR-weighted) MSE in fp32. Validation uses fixed seeds and
stratified fixed timesteps so that `val/loss` is comparable across runs, and reports it per timestep bucket
(`val/loss_t0-99`, ...). The optimizer is any `torch.optim` factory (AdamW in the configs) with a linear
warm-up and an optional cosine decay. Checkpoints carry what is needed to rebuild the network and schedule
(see `diffusion.checkpoint`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from diffusion.checkpoint import describe
from diffusion.schedule import NoiseSchedule

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LRDecay = Literal["constant", "cosine"]


class DiffusionModule(L.LightningModule):
    """Wraps a denoising network and a noise schedule into a trainable model.

    Args:
        net: maps (x_t, t, y) to the prediction target; e.g. `diffusion.unet.UNet`.
        schedule: the noise schedule (also decides the prediction target and loss weighting).
        optimizer: a factory taking the parameters, e.g. `functools.partial(torch.optim.AdamW, lr=2e-4)`.
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        lr_decay: "constant" after warm-up, or "cosine" decay to 0 at the trainer's last step.
        cond_drop_prob: for class-conditional nets, the chance a label is replaced by the null class
            during training, so the net also learns the unconditional model (classifier-free guidance).
        val_seed: seed of the validation noise and timesteps.
        val_buckets: number of equal timestep buckets the validation loss is broken into.
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        schedule: NoiseSchedule,
        optimizer: OptimizerFactory | None = None,
        warmup_steps: int = 0,
        lr_decay: LRDecay = "constant",
        cond_drop_prob: float = 0.1,
        val_seed: int = 0,
        val_buckets: int = 10,
    ) -> None:
        super().__init__()
        if lr_decay not in ("constant", "cosine"):
            raise ValueError(f"optim.lr_decay={lr_decay!r} is not one of 'constant', 'cosine'")
        if warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={warmup_steps} must be >= 0")
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"module.cond_drop_prob={cond_drop_prob} must be in [0, 1]")
        if not 1 <= val_buckets <= schedule.num_steps:
            raise ValueError(f"module.val_buckets={val_buckets} must be in [1, {schedule.num_steps}]")
        self.save_hyperparameters(ignore=["net", "schedule", "optimizer"])
        self.net = net
        self.schedule = schedule
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self.warmup_steps = warmup_steps
        self.lr_decay = lr_decay
        self.cond_drop_prob = cond_drop_prob
        self.val_seed = val_seed
        self.num_classes = getattr(net, "num_classes", None)
        T = schedule.num_steps
        self.bucket_edges = [round(i * T / val_buckets) for i in range(val_buckets + 1)]
        self.val_loss = MeanMetric()
        self.val_bucket_loss = nn.ModuleList(MeanMetric() for _ in range(val_buckets))
        self._last_batch_time: float | None = None
        # Set by train.py for init_from runs (init.ema_from_init): the net's weights right after loading,
        # for an EMA callback to start its average from (when it is not resuming its own state).
        self.ema_init_state: dict[str, Tensor] | None = None

    # --- the objective ---------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x_t, t, y)

    def _labels(self, y: Tensor, train: bool) -> Tensor | None:
        """Labels for the net: None for unconditional nets; with label dropout to the null class in training."""
        if self.num_classes is None:
            return None
        if (y < 0).any():
            raise ValueError(
                "model.num_classes is set but the data has no class labels (use data.labels=true or a labeled dataset)"
            )
        if train and self.cond_drop_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.cond_drop_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return y

    def per_sample_loss(self, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None) -> Tensor:
        """Weighted MSE between the net's output and the schedule's target, per sample, in fp32: (B,)."""
        x_t = self.schedule.q_sample(x0, t, noise)
        out = self.net(x_t, t, y)
        target = self.schedule.target(x0, noise, t)
        mse = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
        return mse * self.schedule.loss_weight(t)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, y = batch
        t = torch.randint(0, self.schedule.num_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        loss = self.per_sample_loss(x0, t, noise, self._labels(y, train=True)).mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        now = time.perf_counter()
        if self._last_batch_time is not None:
            world = self.trainer.world_size if self._trainer is not None else 1
            self.log("train/images_per_sec", x0.shape[0] * world / (now - self._last_batch_time), prog_bar=True)
        self._last_batch_time = now
        return loss

    def on_train_epoch_start(self) -> None:
        self._last_batch_time = None  # do not count validation or epoch turnover as training time

    # --- validation at fixed noise and timesteps ------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, y = batch
        b, k = x0.shape[0], len(self.val_bucket_loss)
        g = torch.Generator().manual_seed(self.val_seed * 1_000_003 + batch_idx)
        # Stratified timesteps: sample i falls in bucket i mod k, at a seeded position inside it.
        bucket = torch.arange(b) % k
        lo = torch.tensor(self.bucket_edges[:-1])[bucket]
        width = torch.tensor(self.bucket_edges[1:])[bucket] - lo
        t = (lo + (torch.rand(b, generator=g) * width).long()).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        loss = self.per_sample_loss(x0, t, noise, self._labels(y, train=False))
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
                lo, hi = self.bucket_edges[i], self.bucket_edges[i + 1] - 1
                self.log(f"val/loss_t{lo}-{hi}", metric.compute())
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
        optimizer = self.optimizer_factory(self.net.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- self-describing checkpoints ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diffusion"] = describe(self.net, self.schedule)
