"""Sample grids a person can see: small images (16x16 digits) are enlarged by a whole factor, nearest neighbour,
before they are tiled, so each pixel stays a sharp square and 100 digits make a ~650 px grid instead of 171 px.

Shared by the sample-grid callback, sample.py's grid.png and the README's pictures (bench scripts that draw them).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

MIN_SIDE = 64  # px per image side in a grid: a 16x16 digit is drawn 4x, 32x32 CIFAR 2x, 64x64 and up as they are


def upscale_factor(side: int, *, min_side: int = MIN_SIDE) -> int:
    """The whole factor that brings an image side of `side` px to at least `min_side` px (1 for large images)."""
    return max(1, math.ceil(min_side / max(1, side)))


def make_grid(images: Tensor, *, nrow: int, min_side: int = MIN_SIDE, padding: int = 2) -> Tensor:
    """(C, H', W') grid in [0, 1] of (N, C, H, W) images in [0, 1], each enlarged nearest-neighbour by
    `upscale_factor`, `nrow` per row, with white lines of `padding` px between them."""
    from torchvision.utils import make_grid as tile

    factor = upscale_factor(min(images.shape[-2:]), min_side=min_side)
    if factor > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=factor, mode="nearest")
    return tile(images, nrow=nrow, padding=padding, pad_value=1.0)


def save_grid(images: Tensor, path: str | Path, *, nrow: int, min_side: int = MIN_SIDE) -> Tensor:
    """Write `make_grid(images)` as a PNG at `path` (atomically, never through a link); returns the grid."""
    from torchvision.utils import save_image

    from diffusion.files import atomic_write

    grid = make_grid(images, nrow=nrow, min_side=min_side)
    atomic_write(Path(path), lambda f: save_image(grid, f, format="PNG"), fsync=False)
    return grid
