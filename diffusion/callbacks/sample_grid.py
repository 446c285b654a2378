"""SampleGrid: draw a grid of samples from fixed noise every N steps and at the end of training.

The noise comes from fixed seeds (image i from seed + i), so grids from different steps, and from different
runs with the same seed, show the same starting points and can be compared by eye. When the trainer has an
`EMA` callback the grid is drawn with the averaged weights. Grids are saved as `samples/step_XXXXXX.png` in
the run folder and logged to every logger that takes images (W&B `log_image`, TensorBoard `add_image`).
Rank zero only. `generate` (fixed-seed previews for any set of indices) is shared with the FID callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from diffusion.callbacks.ema import ema_weights
from diffusion.data import to_unit_range
from diffusion.errors import ConfigError
from diffusion.model import DiffusionModel
from diffusion.samplers import SamplePrecision, precision_from_trainer


@torch.no_grad()
def generate(
    model: DiffusionModel,
    sampler: Callable[..., Tensor],
    indices: Sequence[int],
    *,
    seed: int,
    batch_size: int = 64,
    precision: SamplePrecision = "fp32",
) -> Tensor:
    """(len(indices), C, H, W) pixels in [-1, 1] from `model` (`DiffusionModel.generate`), the previews of grids
    and FID: sample i starts from noise seeded seed + i and, for conditional models, is conditioned on condition
    i mod K of the conditioning's K `preview_conditions()` (the classes, or a text model's preview prompts). So
    which samples exist depends only on the indices, not on how they are split into batches or across ranks.
    Guided with the scale the conditioning recommends (`conditioning.guidance`, as sample.py by default).
    `precision` is the network's autocast precision ("bf16" under a bf16 trainer); the sampler's stays fp32."""
    indices = list(indices)
    previews = model.conditioning.preview_conditions()
    conditions = [previews[i % len(previews)] for i in indices] if previews else None
    seeds = [seed + i for i in indices]
    return model.generate(
        conditions,
        seeds=seeds,
        sampler=sampler,
        guidance=model.conditioning.guidance,
        batch_size=batch_size,
        precision=precision,
    )


class SampleGrid(L.Callback):
    """Saves a grid of `num_images` samples every `every_n_steps` optimizer steps and when training ends.

    Args:
        dirpath: where the PNGs go (the configs use `<run folder>/samples`).
        sampler: a sampler function with its options bound, called as sampler(model, schedule, noise,
            generator=...); e.g. `functools.partial(diffusion.samplers.ddim_sample, steps=50)`.
        num_images: images in the grid; `nrow` per row (default: a square-ish grid).
        every_n_steps: period in optimizer steps; 0 or null for only the end of training.
        seed: the noise seed; image i uses seed + i (and condition i mod K of the K preview conditions (classes,
            prompts) for conditional nets).
        use_ema: draw with the EMA callback's averaged weights when there is one.
    """

    def __init__(
        self,
        *,
        dirpath: str,
        sampler: Callable[..., Tensor],
        num_images: int = 64,
        nrow: int | None = None,
        every_n_steps: int | None = 1000,
        seed: int = 0,
        use_ema: bool = True,
    ) -> None:
        if num_images < 1:
            raise ConfigError(f"callbacks.sample_grid.num_images={num_images} must be >= 1")
        self.dirpath = Path(dirpath)
        self.sampler = sampler
        self.num_images = num_images
        self.nrow = nrow or math.ceil(math.sqrt(num_images))
        self.every_n_steps = every_n_steps or 0
        self.seed = seed
        self.use_ema = use_ema
        self.last_saved_step: int | None = None
        self.last_used_ema = False

    @torch.no_grad()
    def sample(self, pl_module: L.LightningModule, trainer: L.Trainer | None = None) -> Tensor:
        """(num_images, C, H, W) samples in [-1, 1], with the EMA weights when `trainer` has an EMA callback."""
        with ema_weights(trainer if self.use_ema else None, pl_module) as used_ema:
            self.last_used_ema = used_ema
            precision = precision_from_trainer(getattr(trainer, "precision", None))
            return generate(
                pl_module.model,
                self.sampler,
                range(self.num_images),
                seed=self.seed,
                batch_size=self.num_images,
                precision=precision,
            )

    @rank_zero_only
    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        from diffusion.grid import save_grid

        step = trainer.global_step
        images = to_unit_range(self.sample(pl_module, trainer).float().cpu())
        conditions = pl_module.model.conditioning.preview_conditions()
        images, nrow = class_rows(images, len(conditions) if conditions else None, self.nrow)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"step_{step:06d}.png"
        grid = save_grid(images, path, nrow=nrow)  # (C, H', W') in [0, 1]; small images enlarged
        self.last_saved_step = step
        log_grid(trainer, grid, step=step, caption=f"step {step}" + (" (EMA)" if self.last_used_ema else ""))
        return path

    def setup(self, trainer, pl_module, stage: str) -> None:
        # rank 0 draws alone; a sharded network (trainer=fsdp: a device mesh) gathers its weights from every rank in
        # each forward, so the grid would wait forever for the others
        if getattr(pl_module, "device_mesh", None) is not None:
            raise ConfigError(
                "callbacks.sample_grid draws on rank 0 alone, which a sharded network (trainer=fsdp) cannot: set "
                "callbacks.sample_grid=null and sample from the checkpoints (sample.py ckpt=...)"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_saved_step:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_saved_step:
            self.save(trainer, pl_module)


def class_rows(images: Tensor, num_classes: int | None, nrow: int) -> tuple[Tensor, int]:
    """Arrange samples for a grid: as they are for unconditional nets; one row per class for conditional ones.

    `generate` conditions sample i on class i mod K, so class k's samples are k, k + K, k + 2K, ...; the grid
    then has K rows of num_images // K samples (the remainder is left out).
    """
    if not num_classes or len(images) < num_classes:
        return images, nrow
    per_class = len(images) // num_classes
    order = [k + j * num_classes for k in range(num_classes) for j in range(per_class)]
    return images[order], per_class


def log_grid(trainer: L.Trainer, grid: Tensor, *, step: int, key: str = "samples", caption: str | None = None) -> None:
    """Log a (C, H, W) image in [0, 1] to every logger of `trainer` that takes images (CSV does not)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], step=step, **({"caption": [caption]} if caption else {}))
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
