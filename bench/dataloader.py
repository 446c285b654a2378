"""Images per second: decoding JPEGs per step (data.cache=false), the uint8 memmap cache (data.cache=true) and
streaming the same JPEGs from local tar shards (data=shards, written by `python -m diffusion.data.shards write`).

Generates N random-ish JPEGs (smooth gradients plus noise, so they compress like photos) in a temp folder, then
times full passes over the training loader of each path, side by side in one run, after one warm-up pass each
(the cache build and the shard write are timed separately). Run:

    python bench/dataloader.py --num-images 3000 --source-size 64 --image-size 64 --workers 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.data import ImageFolderDataModule, ShardDataModule  # noqa: E402
from diffusion.data.shards import write_shards  # noqa: E402


def make_jpegs(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size)
    for i in range(n):
        base = (ramp[None, :, None] * rng.random(3) + ramp[:, None, None] * rng.random(3)) / 2
        arr = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=90)


def images_per_second(dm, passes: int) -> float:
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up: workers started, page cache filled
        pass
    start, count = time.perf_counter(), 0
    for _ in range(passes):
        for x, _ in loader:
            count += x.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--source-size", type=int, default=64, help="side of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=64, help="data.image_size")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers for both paths")
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_jpegs(folder, args.num_images, args.source_size)
        kw = dict(
            path=str(folder),
            image_size=args.image_size,
            batch_size=args.batch_size,
            val_fraction=0.0,
            num_workers=args.workers,
        )
        decode = ImageFolderDataModule(**kw)
        start = time.perf_counter()
        decode.setup()
        setup_s = time.perf_counter() - start
        cached = ImageFolderDataModule(**kw, cache=True)
        start = time.perf_counter()
        cached.setup()
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        ImageFolderDataModule(**kw, cache=True).setup()
        reuse_s = time.perf_counter() - start
        start = time.perf_counter()
        write_shards(folder, Path(tmp) / "shards", val_fraction=0.0)
        write_s = time.perf_counter() - start
        streamed = ShardDataModule(
            path=str(Path(tmp) / "shards"),
            image_size=args.image_size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            labels=False,
        )
        folder_ips = images_per_second(decode, args.passes)
        cache_ips = images_per_second(cached, args.passes)
        shards_ips = images_per_second(streamed, args.passes)

    print(
        f"{args.num_images} JPEGs {args.source_size}px -> {args.image_size}px, batch {args.batch_size}, "
        f"{args.workers} workers"
    )
    print(
        f"setup: header check {setup_s:.2f} s; cache build {build_s:.2f} s; cache reuse {reuse_s:.2f} s; "
        f"shard write {write_s:.2f} s"
    )
    print(f"folder (decode per step): {folder_ips:9.0f} images/s")
    print(f"cache  (uint8 memmap):    {cache_ips:9.0f} images/s")
    print(f"shards (tar stream):      {shards_ips:9.0f} images/s")
    print(f"ratio cache/folder:       {cache_ips / folder_ips:9.1f}x")
    print(f"ratio shards/folder:      {shards_ips / folder_ips:9.1f}x")


if __name__ == "__main__":
    main()
