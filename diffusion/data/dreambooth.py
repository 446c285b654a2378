"""DreamBooth as a training recipe (`experiment=dreambooth`): the instance images and the class images the base
model draws, paired in every batch (Ruiz et al. 2023; the class images and loss weights: `diffusion.dreambooth`).

`DreamBooth` holds the recipe's settings (config `dreambooth:`); train.py gives it the instance datamodule (the
`data:` folder, every image captioned with `dreambooth.instance_prompt`) and the base model, and gets back a
`DreamBoothDataModule`. That one draws the missing class images in `prepare_data`, which Lightning runs on global
rank zero only, on its device and in the trainer's precision, before any rank sets up its data (the others wait at
Lightning's barrier) and before a resumed checkpoint's weights are loaded: always the base model. Batch item i of
an epoch is instance image i mod n and class image i mod m (diffusers' DreamBooth dataset), an epoch being
max(n, m) items; a batch is (the B instance images then the B class images, their captions, `prior_weights`), and
the training loss is sum(weights * per-sample loss) = instance MSE + w * prior MSE. The order, flips and captions
are those of any of our datasets (seeded per epoch and item), so a resumed run sees the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import Dataset

from diffusion.data.base import Captioned, _EpochAware, _SplitDataModule, flip_mask
from diffusion.data.folder import ImageFiles
from diffusion.data.images import Preprocess
from diffusion.dreambooth import class_folder, class_images, class_key, count_class_images, image_name, prior_weights
from diffusion.errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)


class PriorPairs(_EpochAware):
    """Item i: instance item i mod n and class item i mod m; a batch of B items is the uint8 images (2B, C, H, W),
    instance first, their 2B captions and the loss weights `prior_weights` (2B,). Flips are drawn per (epoch, item)
    for each half, so an instance image repeated within an epoch is flipped independently each time."""

    uint8_batches = True

    def __init__(self, instance: Dataset, prior: Dataset, *, prior_loss_weight: float, flip: bool, seed: int) -> None:
        super().__init__(instance, seed)
        self.prior, self.prior_loss_weight, self.flip = prior, prior_loss_weight, flip

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.prior, "set_epoch"):
            self.prior.set_epoch(epoch)

    def __len__(self) -> int:
        return max(len(self.dataset), len(self.prior))

    def __getitems__(self, indices: list[int]):
        indices = [int(i) for i in indices]
        xi, ci = self.dataset.__getitems__([i % len(self.dataset) for i in indices])
        xp, cp = self.prior.__getitems__([i % len(self.prior) for i in indices])
        if self.flip:  # the batches are this call's own tensors
            epoch = int(self._epoch)
            for x, seed in ((xi, self.seed), (xp, self.seed + 1)):
                mask = flip_mask(seed, epoch, indices)
                x[mask] = x[mask].flip(-1)
        weights = prior_weights(len(indices), len(indices), self.prior_loss_weight)
        return torch.cat([xi, xp]), [*ci, *cp], weights


class DreamBoothDataModule(_SplitDataModule):
    """The instance datamodule's images with the class images of `class_prompts` (see the module docstring).

    Args:
        instance: a captioned datamodule of the instance images (a folder with `data.caption`).
        base: the base model (`DiffusionModel`) that draws the class images.
        sampler, guidance: what draws them.
        class_prompts: one folder of `num_class_images` images each, under `class_dir`.
        prior_loss_weight: w in instance MSE + w * prior MSE.
        sample_batch_size: images drawn per batch.
    """

    def __init__(
        self,
        *,
        instance: _SplitDataModule,
        base,
        sampler: Callable,
        guidance: float,
        class_prompts: list[str],
        num_class_images: int,
        class_dir: str,
        prior_loss_weight: float,
        sample_batch_size: int,
    ) -> None:
        super().__init__(
            image_size=instance.image_size,
            channels=instance.channels,
            batch_size=instance.batch_size,
            val_fraction=instance.val_fraction,
            seed=instance.seed,
            num_workers=instance.num_workers,
            flip=instance.flip,
        )
        self.prepare_data_per_node = False  # global rank zero draws; class_dir is shared (as a cluster's files are)
        self.instance, self.base, self.sampler, self.guidance = instance, base, sampler, guidance
        self.class_prompts, self.num_class_images = list(class_prompts), num_class_images
        self.prior_loss_weight, self.sample_batch_size = prior_loss_weight, sample_batch_size
        # keyed now, from the base as loaded (before adapters or new words are added to it)
        self.keys = [class_key(model=base, prompt=p, sampler=sampler, guidance=guidance) for p in self.class_prompts]
        self.class_folders = [class_folder(class_dir, key) for key in self.keys]

    @property
    def captioned(self) -> bool:
        return True

    def caption_corpus(self) -> list[str]:
        """The instance captions and the class prompts (without drawing a class image)."""
        return [*self.instance.caption_corpus(), *self.class_prompts]

    def prepare_data(self) -> None:
        """Draw the missing class images with the base model, on the trainer's device and in its precision."""
        from diffusion.samplers import precision_from_trainer

        self.instance.prepare_data()
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        precision = precision_from_trainer(getattr(trainer, "precision", None))
        missing = [f for f in self.class_folders if count_class_images(f) < self.num_class_images]
        if not missing:
            log.info(
                f"class images: {self.num_class_images} per prompt found in {', '.join(map(str, self.class_folders))}"
            )
            return
        was = self.base.device
        self.base.to(device)
        try:
            for folder, key in zip(self.class_folders, self.keys, strict=True):
                class_images(  # logs and skips a folder that has them
                    self.base,
                    folder=folder,
                    key=key,
                    count=self.num_class_images,
                    sampler=self.sampler,
                    guidance=self.guidance,
                    batch_size=self.sample_batch_size,
                    precision=precision,
                )
        finally:
            self.base.to(was)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.instance.setup(stage)
        files, captions = [], []
        for folder, prompt in zip(self.class_folders, self.class_prompts, strict=True):
            have = count_class_images(folder)
            if have < self.num_class_images:
                raise MissingPathError(
                    f"{folder} holds {have} of the {self.num_class_images} class images of {prompt!r}: they are drawn "
                    "on global rank zero before training; on several nodes dreambooth.class_dir must be a shared folder"
                )
            files += [folder / image_name(i) for i in range(self.num_class_images)]
            captions += [[prompt]] * self.num_class_images
        prep = Preprocess(image_size=self.image_size, channels=self.channels)
        prior = Captioned(ImageFiles(files, [-1] * len(files), prep), captions, seed=self.seed)
        instance = self.instance.train_set
        if not hasattr(instance, "__getitems__") or getattr(instance, "whole_batches", False):
            raise ConfigError("experiment=dreambooth reads instance images as pixels: set data.cache=false")
        self.train_set = PriorPairs(
            instance, prior, prior_loss_weight=self.prior_loss_weight, flip=self.flip, seed=self.seed
        )
        self.flip = False  # PriorPairs flips each half itself
        self.val_set = self.instance.val_set
        self.train_captions = [*(self.instance.train_captions or []), *captions]
        rank_zero_only(log.info)(
            f"dreambooth: {len(instance)} instance images, {len(files)} class images; each batch holds "
            f"{self.batch_size} of each (loss = instance MSE + {self.prior_loss_weight:g} * prior MSE)"
        )


class DreamBooth:
    """`experiment=dreambooth`: the recipe's settings (config `dreambooth:`).

    Args:
        instance_prompt: the caption of every instance image ("a photo of sks dog"; `data.caption` follows it);
            null: the instance folder's own captions (`data.captions=true`).
        class_prompt: the class prompt ("a photo of a dog"), or a list of them (each gets num_class_images).
        num_class_images: class images per class prompt (100 in the paper; 0: no prior preservation).
        prior_loss_weight: w in instance MSE + w * prior MSE.
        class_dir: where the class images are kept (a folder per prompt and base model, reused by later runs).
        sample_batch_size: class images drawn per batch.
        train_text_encoder: LoRA adapters on the pretrained text encoder too (`diffusion.finetune.LoRATextEncoder`).
        text_encoder_rank: their rank; null: finetune.rank (8 with finetune=full).
    """

    def __init__(
        self,
        *,
        instance_prompt: str | None = None,
        class_prompt: str | list[str] | None = None,
        num_class_images: int = 100,
        prior_loss_weight: float = 1.0,
        class_dir: str = "class_images",
        sample_batch_size: int = 4,
        train_text_encoder: bool = False,
        text_encoder_rank: int | None = None,
    ) -> None:
        if instance_prompt is not None and not str(instance_prompt).strip():
            raise ConfigError("dreambooth.instance_prompt is empty: give the caption of the subject's images")
        prompts = [class_prompt] if isinstance(class_prompt, str) else list(class_prompt or [])
        if num_class_images < 0:
            raise ConfigError(f"dreambooth.num_class_images={num_class_images} must be >= 0 (0: no prior)")
        if num_class_images and (not prompts or not all(str(p).strip() for p in prompts)):
            raise ConfigError('dreambooth.class_prompt is not set: e.g. dreambooth.class_prompt="a photo of a dog"')
        if prior_loss_weight < 0:
            raise ConfigError(f"dreambooth.prior_loss_weight={prior_loss_weight} must be >= 0")
        if sample_batch_size < 1:
            raise ConfigError(f"dreambooth.sample_batch_size={sample_batch_size} must be >= 1")
        if text_encoder_rank is not None and text_encoder_rank < 1:
            raise ConfigError(f"dreambooth.text_encoder_rank={text_encoder_rank} must be >= 1 (or null)")
        self.instance_prompt = instance_prompt
        self.class_prompts = [str(p) for p in prompts]
        self.num_class_images, self.prior_loss_weight = num_class_images, float(prior_loss_weight)
        self.class_dir, self.sample_batch_size = Path(str(class_dir)).expanduser(), sample_batch_size
        self.train_text_encoder, self.text_encoder_rank = train_text_encoder, text_encoder_rank

    def datamodule(self, instance: _SplitDataModule, *, base, sampler: Callable) -> _SplitDataModule:
        """The training data: `instance` with the class images `base` draws (`instance` alone without a prior)."""
        if not instance.captioned:
            raise ConfigError(
                'experiment=dreambooth needs captioned instance images: dreambooth.instance_prompt="a photo of sks '
                'dog" (or data.captions=true for captions of their own)'
            )
        if not self.num_class_images:
            return instance
        return DreamBoothDataModule(
            instance=instance,
            base=base,
            sampler=sampler,
            guidance=base.conditioning.guidance,
            class_prompts=self.class_prompts,
            num_class_images=self.num_class_images,
            class_dir=str(self.class_dir),
            prior_loss_weight=self.prior_loss_weight,
            sample_batch_size=self.sample_batch_size,
        )

    def conditioning(self, conditioning, *, finetune):
        """`conditioning` with LoRA adapters on its pretrained text encoder when `train_text_encoder`, else itself."""
        if not self.train_text_encoder:
            return conditioning
        from diffusion.finetune import with_text_adapters

        rank = self.text_encoder_rank or getattr(finetune, "rank", 8)
        alpha = getattr(finetune, "alpha", rank) if self.text_encoder_rank is None else self.text_encoder_rank
        return with_text_adapters(conditioning, rank=rank, alpha=alpha)
