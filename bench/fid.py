"""FID / KID of generated samples against real images, outside training.

    python bench/fid.py SAMPLES REFERENCE [--features inception|random] [--weights-path FILE] [--num-real N]

SAMPLES and REFERENCE are each a folder of images (recursive), an .npz (the array `images`, else the first
one; uint8 in [0, 255] or float in [-1, 1], NHWC or NCHW), or `digits` for the built-in dataset. Images are
resized and center-cropped to --image-size (default: the samples' size). Reference features are cached in
--cache-dir keyed by the images and preprocessing, as in training. Prints one JSON line:
{"fid": ..., "kid": ..., "kid_std": ..., "num_samples": ..., "num_real": ..., "features": ...}.
`--features random` uses a small random network: fast, for smoke tests only (not comparable to Inception FIDs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.callbacks.fid import (  # noqa: E402
    InceptionFeatures,
    RandomFeatures,
    describe_dataset,
    extract_features,
    fid_kid,
    load_or_compute_real_features,
    reference_images,
)
from diffusion.data import DigitsDataModule, ImageFolderDataModule  # noqa: E402


def load_npz(path: Path) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] from an .npz of uint8 [0, 255] or float [-1, 1] images, NHWC or NCHW."""
    with np.load(path) as data:
        if not data.files:
            raise ValueError(f"{path} holds no arrays")
        arr = data["images"] if "images" in data.files else data[data.files[0]]
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"{path}: expected (N, H, W, C) or (N, C, H, W) images, got shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float().clamp(-1, 1)


def dataset_and_key(source: str, image_size: int | None, channels: int | None):
    """(dataset of (image, label) in [-1, 1], cache key, image_size, channels) for a folder, .npz or `digits`."""
    path = Path(source).expanduser()
    if source == "digits":
        dm = DigitsDataModule(image_size=image_size or 16, channels=channels or 1, val_fraction=0.0)
    elif path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        x = load_npz(path)
        st = path.stat()
        key = {"npz": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}
        return TensorDataset(x, torch.full((len(x),), -1)), key, x.shape[-1], x.shape[1]
    else:
        dm = ImageFolderDataModule(
            path=str(path),
            image_size=image_size or 32,
            channels=channels or 3,
            val_fraction=0.0,
            flip=False,
            num_workers=0,
            allow_upscale=True,
        )
    dm.setup()
    return reference_images(dm, "train"), describe_dataset(dm, "train"), dm.image_size, dm.channels


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples")
    p.add_argument("reference")
    p.add_argument("--features", choices=["inception", "random"], default="inception")
    p.add_argument("--weights-path", default=None, help="local copy of the FID Inception weights")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--num-real", type=int, default=None, help="reference images to use (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--cache-dir", default="~/.cache/diffusion/fid")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    fake_set, _, size, channels = dataset_and_key(args.samples, args.image_size, args.channels)
    real_set, key, _, _ = dataset_and_key(args.reference, args.image_size or size, args.channels or channels)
    if args.features == "inception":
        extractor = InceptionFeatures(weights_path=args.weights_path)
    else:
        extractor = RandomFeatures()
    extractor = extractor.eval().to(device)
    real, cache_file, _ = load_or_compute_real_features(
        extractor,
        real_set,
        key=key,
        cache_dir=args.cache_dir,
        num_real=args.num_real,
        batch_size=args.batch_size,
        device=device,
    )
    fake = extract_features(extractor, fake_set, batch_size=args.batch_size, device=device)
    values = fid_kid(
        real.to(device),
        fake.to(device),
        num_real=len(real),
        num_fake=len(fake),
        kid_subset_size=args.kid_subset_size,
        kid_subsets=args.kid_subsets,
    )
    result = {
        **values,
        "num_samples": len(fake),
        "num_real": len(real),
        "features": extractor.cache_key,
        "reference_cache": str(cache_file),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
