"""Image files: a fast recursive scan, a cheap header check, and one decode-and-preprocess function.

`load_image` is the single place pixels come from, for the decoding loader and for the cache build alike, so
the two give identical tensors. It handles what real folders hold: EXIF orientation, GIF (first frame),
palette and grayscale images, transparency (composited on white), 16-bit images (scaled, not clipped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusion.errors import PathError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def scan_images(root: Path) -> list[Path]:
    """All image files below `root`, recursively, sorted by relative path; hidden files and folders are skipped.

    os.scandir reads the file type from the directory entry, so a scan costs no stat() per file (100k files
    take well under a second on a local disk). Hidden entries are skipped: macOS `._name.jpg` resource forks
    are not images, and the cache lives in a hidden folder. Symlinked folders are followed once.
    """
    found: list[str] = []
    seen: set[str] = set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:  # a symbolic link loop (ELOOP): listed, so the file check names or skips it
                    found.append(entry.path)
                    continue
                if is_dir:
                    stack.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    found.append(entry.path)
    prefix = len(str(root).rstrip(os.sep)) + 1
    found.sort(key=lambda p: p[prefix:].split(os.sep))
    return [Path(p) for p in found]


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header only (no decode); raises for files PIL cannot identify."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size


# EXIF orientations that turn the picture a quarter (exif_transpose swaps its width and height)
_QUARTER_TURNS = (5, 6, 7, 8)


def _oriented(img, size: tuple[int, int]) -> tuple[int, int]:
    """`size` (width, height) of the opened, not yet decoded `img` as shown: swapped when its EXIF orientation
    turns it a quarter. Reads the EXIF block that opening found (img.getexif() would decode a PNG to look for a
    later one; a PNG whose eXIf chunk follows its pixels is taken as upright here)."""
    from PIL import Image

    raw = img.info.get("exif")
    if not raw:
        return size
    exif = Image.Exif()
    exif.load(raw)
    return size[::-1] if exif.get(0x0112) in _QUARTER_TURNS else size


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is shown (after its EXIF orientation), from the header only."""
    from PIL import Image

    with Image.open(path) as img:
        return _oriented(img, img.size)


@dataclass(frozen=True)
class Crop:
    """Where an image is cut: `box` (left, top, right, bottom) in the pixels of the image as shown (EXIF-oriented,
    at full size; fractions allowed), resized to `out` (height, width) in the same pass."""

    box: tuple[float, float, float, float]
    out: tuple[int, int]


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes a (C, S, S) uint8 array: a square crop (side `crop_size`, or the short side when None),
    centered or at a random position, resized to `image_size` with antialiasing."""

    image_size: int
    channels: int
    crop: str = "center"
    crop_size: int | None = None

    def key(self) -> dict:
        return dict(image_size=self.image_size, channels=self.channels, crop=self.crop, crop_size=self.crop_size)


def _to_mode(img, channels: int):
    """RGB ("RGB") or grayscale ("L") with 8 bits per channel."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale: scale 0..65535 to 0..255 (Pillow's convert("L") would clip at 255 instead).
        arr = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB" if channels == 3 else "L")


def load_image(
    path: Path, prep: Preprocess, generator: torch.Generator | None = None, *, crop: Crop | None = None
) -> np.ndarray:
    """Decode `path` and preprocess it to uint8 (C, S, S), or with `crop` to that crop: (C, *crop.out). Raises
    OSError naming the file if it cannot be decoded.

    1. open; for JPEGs larger than twice the target, let libjpeg decode at 1/2, 1/4 or 1/8 scale (draft mode),
       which keeps at least 2x the output resolution for the antialiased resize and makes big photos cheap;
    2. apply the EXIF orientation;
    3. convert to 8-bit RGB or L (16-bit scaled, transparency composited on white, first frame of a GIF);
    4. crop a square (center or random) and resize it to `image_size` in one antialiased bicubic pass; with
       `crop`, cut its box and resize it to its `out` size instead (buckets, `diffusion.data.buckets.Crops`).
    """
    from PIL import Image, ImageOps

    S = prep.image_size if crop is None else max(crop.out)
    try:
        with Image.open(path) as img:
            raw = img.size
            if img.format == "JPEG" and prep.crop_size is None:
                w, h = img.size
                scale = 1
                while scale < 8 and min(w, h) // (scale * 2) >= 2 * S:
                    scale *= 2
                if scale > 1:
                    img.draft(img.mode, (-(-w // scale), -(-h // scale)))
            drafted = img.size != raw
            full = _oriented(img, raw)  # the size as shown at full size: the crop's box is in these pixels
            img = ImageOps.exif_transpose(img)
            full = full if drafted else img.size  # (a JPEG's EXIF is in its header: draft only JPEGs)
            img = _to_mode(img, prep.channels)
            img.load()
    except Exception as e:  # PIL raises many kinds for bad files; name the file in one line
        raise PathError(f"cannot decode image {path}: {e}") from e
    if crop is None:
        return crop_resize(img, prep, generator)
    sx, sy = img.width / full[0], img.height / full[1]  # 1, or the draft's scale
    left, top, right, bottom = crop.box
    img = img.resize(crop.out[::-1], Image.Resampling.BICUBIC, box=(left * sx, top * sy, right * sx, bottom * sy))
    return _channels_first(img)


def image_array(img, prep: Preprocess) -> np.ndarray:
    """An opened PIL image (one a web page sent, say) preprocessed as `load_image` does a file: uint8 (C, S, S)."""
    return crop_resize(_to_mode(img, prep.channels), prep)


def crop_resize(img, prep: Preprocess, generator: torch.Generator | None = None) -> np.ndarray:
    """`load_image`'s step 4 on an image already in the right mode: uint8 (C, S, S)."""
    from PIL import Image

    S = prep.image_size
    w, h = img.size
    side = min(w, h) if prep.crop_size is None else min(prep.crop_size, w, h)
    if prep.crop == "random":
        left = int(torch.randint(0, w - side + 1, (), generator=generator))
        top = int(torch.randint(0, h - side + 1, (), generator=generator))
    else:
        left, top = (w - side) // 2, (h - side) // 2
    img = img.resize((S, S), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return _channels_first(img)


def _channels_first(img) -> np.ndarray:
    """A PIL image as uint8 (C, H, W)."""
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))  # (C, S, S)
