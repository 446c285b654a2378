"""SampleGrid: draw a grid of samples from fixed noise every N steps and at the end of training.

The noise comes from fixed seeds (image i from seed + i), so grids from different steps, and from different
runs with the same seed, show the same starting points and can be compared by eye. Grids are saved as
`samples/step_XXXXXX.png` in the run folder and logged to each logger that takes images. Rank zero only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from diffusion.data import to_unit_range
from diffusion.samplers import fixed_noise


class SampleGrid(L.Callback):
    """Saves a grid of `num_images` samples every `every_n_steps` optimizer steps and when training ends.

    Args:
        dirpath: where the PNGs go (the configs use `<run folder>/samples`).
        sampler: a sampler function with its options bound, called as sampler(model, schedule, noise,
            generator=...); e.g. `functools.partial(diffusion.samplers.ddim_sample, steps=50)`.
        num_images: images in the grid; `nrow` per row (default: a square-ish grid).
        every_n_steps: period in optimizer steps; 0 or null for only the end of training.
        seed: the noise seed; image i uses seed + i.
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
    ) -> None:
        if num_images < 1:
            raise ValueError(f"callbacks.sample_grid.num_images={num_images} must be >= 1")
        self.dirpath = Path(dirpath)
        self.sampler = sampler
        self.num_images = num_images
        self.nrow = nrow or math.ceil(math.sqrt(num_images))
        self.every_n_steps = every_n_steps or 0
        self.seed = seed
        self.last_saved_step: int | None = None

    @torch.no_grad()
    def sample(self, pl_module: L.LightningModule) -> Tensor:
        """(num_images, C, H, W) samples in [-1, 1] from the module's current network."""
        net, schedule = pl_module.net, pl_module.schedule
        cfg = getattr(net, "config", {})
        channels = cfg.get("in_channels", 3)
        size = cfg.get("image_size", 32)
        noise = fixed_noise(self.num_images, (channels, size, size), self.seed).to(pl_module.device)
        was_training = net.training
        net.eval()
        try:
            generator = torch.Generator().manual_seed(self.seed)
            return self.sampler(lambda x, t: net(x, t), schedule, noise, generator=generator)
        finally:
            net.train(was_training)

    @rank_zero_only
    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        from torchvision.utils import make_grid, save_image

        step = trainer.global_step
        images = to_unit_range(self.sample(pl_module).float().cpu())
        grid = make_grid(images, nrow=self.nrow, padding=1, pad_value=1.0)  # (C, H', W') in [0, 1]
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"step_{step:06d}.png"
        save_image(grid, path)
        self.last_saved_step = step
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if log_image is not None:  # W&B
                log_image(key="samples", images=[grid], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("samples", grid, global_step=step)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_saved_step:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_saved_step:
            self.save(trainer, pl_module)
