"""What the generating entry points share (`sample.py`, `demo.py`): the device, the model loaded from a checkpoint,
images to edit and masks read at the model's size, and pixels turned into 8-bit images. Plain torch and Pillow.

Images to edit are preprocessed as training data is (`diffusion.data.images`: mode, EXIF orientation, a center
square, one antialiased resize), so an image of the training set comes back as the model saw it. A mask is read
the same way as grayscale and thresholded at half: white (>= 128) is repainted, black kept (diffusers' convention).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusion.data.images import IMAGE_EXTENSIONS, Preprocess, image_array, load_image, scan_images
from diffusion.errors import BadFileError, ConfigError, MissingPathError, PathError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`device` ("auto": CUDA when present) as a torch device; a ConfigError for a name torch does not know or a
    GPU that is not there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA GPU is available (use device=auto or device=cpu)")
    return resolved


def load_model(
    ckpt: str,
    *,
    runs_dir: str,
    device: torch.device,
    use_ema: bool = True,
    text_encoder: str | None = None,
    sigma_rel: float | None = None,
    snapshots: str | None = None,
):
    """(model, checkpoint path): the `DiffusionModel` of `ckpt` (a .ckpt file, a run folder, or "last": the newest
    under `runs_dir`) on `device`, with its EMA weights (or the post-hoc EMA of `sigma_rel`)."""
    from diffusion.checkpoint import resolve_ckpt_path
    from diffusion.model import DiffusionModel
    from diffusion.posthoc import with_posthoc_ema

    if ckpt in (None, ""):
        raise ConfigError("ckpt=PATH is required: a .ckpt file, a training run folder, or ckpt=last")
    path = Path(str(ckpt)).expanduser()
    if str(ckpt) == "last" or path.is_dir():
        path = Path(resolve_ckpt_path(str(ckpt), runs_dir, key="ckpt"))
    model = DiffusionModel.from_checkpoint(path, use_ema=use_ema, map_location=device, text_encoder=text_encoder)
    model = with_posthoc_ema(model, path, sigma_rel=sigma_rel, snapshots=snapshots, use_ema=use_ema)
    return model, path


def image_shape(model) -> tuple[int, int]:
    """(channels, side) of the pixel images `model` generates (through its codec)."""
    channels, side, _ = model.spec.sample_shape
    return model.codec.image_shape(channels, side)


def image_files(path: str | Path, *, key: str) -> list[Path]:
    """The image file `path`, or the images in the folder `path` (sorted, recursively); one-line errors for a
    missing path or a folder without images."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        files = scan_images(path)
        if not files:
            raise MissingPathError(f"{key}={path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return files
    if not path.exists():
        raise MissingPathError(f"{key}={path} does not exist (an image file or a folder of images)")
    return [path]


def read_images(path: str | Path, *, channels: int, size: int, key: str = "init") -> Tensor:
    """(k, channels, size, size) pixels in [-1, 1] from an image file or a folder of them."""
    prep = Preprocess(image_size=size, channels=channels)
    return torch.stack([_pixels(_load(f, prep, key)) for f in image_files(path, key=key)])


def read_masks(path: str | Path, *, size: int, key: str = "mask") -> Tensor:
    """(k, 1, size, size) masks in {0, 1} (white = 1 = repaint) from an image file or a folder of them."""
    prep = Preprocess(image_size=size, channels=1)
    return torch.stack([_mask(_load(f, prep, key)) for f in image_files(path, key=key)])


def image_tensor(img, *, channels: int, size: int) -> Tensor:
    """(channels, size, size) pixels in [-1, 1] from an opened PIL image (one a web page sent)."""
    return _pixels(image_array(img, Preprocess(image_size=size, channels=channels)))


def mask_tensor(img, *, size: int) -> Tensor:
    """(1, size, size) mask in {0, 1} from an opened PIL image: white (or painted) = 1 = repaint."""
    return _mask(image_array(img, Preprocess(image_size=size, channels=1)))


def _load(path: Path, prep: Preprocess, key: str) -> np.ndarray:
    try:
        return load_image(path, prep)
    except PathError as e:
        raise BadFileError(f"{key}={path} is not an image Pillow can read ({e.__cause__ or e})") from None


def _pixels(arr: np.ndarray) -> Tensor:
    return torch.from_numpy(arr).float() / 127.5 - 1  # uint8 (C, S, S) -> [-1, 1]


def _mask(arr: np.ndarray) -> Tensor:
    return (torch.from_numpy(arr) >= 128).float()  # (1, S, S)


def per_item(images: Tensor | None, columns: Sequence[int]) -> Tensor | None:
    """The image of each item from `images` (k, ...): one image for every item, or image j % k for column j."""
    if images is None:
        return None
    return images[torch.tensor([j % len(images) for j in columns])]


def check_edit_options(*, init: bool, mask: bool, strength: float) -> None:
    """One-line errors for editing options that do not go together (checked before a model is loaded)."""
    if mask and not init:
        raise ConfigError("mask= needs init=: the image whose black (unmasked) region is kept")
    if not init and strength != 1.0:
        raise ConfigError(f"strength={strength} needs init=: the image (or folder of images) to start from")
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength={strength} must be in [0, 1]: the share of the sampling steps that is run")


def edit_inputs(
    init: Tensor | None, mask: Tensor | None, columns: Sequence[int], *, strength: float
) -> tuple[Tensor | None, Tensor | None]:
    """(init, mask) per item for `DiffusionModel.generate`, from k init images and 1 or k masks; item i is in
    column `columns[i]` and edits image columns[i] % k."""
    check_edit_options(init=init is not None, mask=mask is not None, strength=strength)
    if mask is not None and len(mask) not in (1, len(init)):
        raise ConfigError(f"mask= gives {len(mask)} masks for {len(init)} init images: give one mask or one per image")
    return per_item(init, columns), per_item(mask, columns)


def to_uint8(pixels: Tensor) -> np.ndarray:
    """Pixels (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), rounded."""
    from diffusion.data import to_unit_range

    unit = to_unit_range(pixels.detach().float().cpu()).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def nonfinite_warning(pixels: Tensor, model, source) -> str | None:
    """A warning line when some images are not finite (NaN / inf weights draw black images), else None."""
    bad = int((~torch.isfinite(pixels.flatten(1))).any(1).sum())
    if not bad:
        return None
    nonfinite = not all(torch.isfinite(p).all() for p in model.net.parameters())
    why = f"the checkpoint's {model.weights} weights hold NaN or inf values" if nonfinite else "they overflowed"
    return f"{bad} of {len(pixels)} images are not finite and are written black: {why} ({source})"
