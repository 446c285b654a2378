"""Datasets for training: every DataModule yields `(images, labels)` batches, images float in [-1, 1] (B, C, H, W),
labels long (-1 when unlabeled), and exposes `image_size`, `channels` and `num_classes` (None when unlabeled).

- `DigitsDataModule` (`data=digits`): scikit-learn's bundled 8x8 digits, no files needed.
- `ImageFolderDataModule` (`data=folder`): any folder tree of images, optionally cached as a uint8 memmap, in
  aspect-ratio buckets (`data.buckets=true`, `diffusion.data.buckets`).
- `CelebADataModule` (`data=celeba`): aligned CelebA, center crop then resize (the standard 64x64 recipe).
- `CIFAR10DataModule` (`data=cifar10`), `MNISTDataModule` (`data=mnist`): the standard sets, in memory.
- `ShardDataModule` (`data=shards`): tar shards streamed from a folder or a bucket, exactly once per epoch.
- `HFDataModule` (`data=hf`): a Hugging Face `datasets` dataset (saved to disk, an imagefolder, or the Hub).
"""

from diffusion.data.base import DigitsDataModule, image_loader, split_indices, to_model_range, to_unit_range
from diffusion.data.folder import CelebADataModule, ImageFolderDataModule
from diffusion.data.hf import HFDataModule
from diffusion.data.images import IMAGE_EXTENSIONS, load_image, scan_images
from diffusion.data.shards import ShardDataModule
from diffusion.data.standard import CIFAR10DataModule, MNISTDataModule

__all__ = [
    "IMAGE_EXTENSIONS",
    "CIFAR10DataModule",
    "CelebADataModule",
    "DigitsDataModule",
    "HFDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "ShardDataModule",
    "load_image",
    "scan_images",
    "image_loader",
    "split_indices",
    "to_model_range",
    "to_unit_range",
]
