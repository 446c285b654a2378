"""Aspect-ratio buckets (`data.buckets=true`) and crop geometry (`data.geometry=true`) of image folders: buckets and
crops against hand-computed cases, one bucket per batch, once per epoch (one process and two DDP ranks), exact
resume through train.py, per-bucket caches, and one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from diffusion.data import ImageFolderDataModule
from diffusion.data.base import flip_mask
from diffusion.data.buckets import BucketSampler, Crops, bucket_sizes, nearest_bucket
from diffusion.errors import ConfigError
from tests.conftest import TINY, run_cli, run_train, write_image

NO_GRIDS = ["callbacks.sample_grid.every_n_steps=0"]
# (width, height) of the fabricated images: wide, tall and square ones, none smaller than its bucket
SIZES = [(50, 24), (24, 50), (30, 30), (40, 22), (26, 40), (33, 28), (64, 30), (28, 60), (25, 25), (45, 20)]
# image_size 24 (area 576), step 8: the buckets (h, w) are (32, 16), (24, 24), (16, 32) (see the first test)
BUCKETS = dict(image_size=24, buckets=True, bucket_step=8)


def bucket_folder(root: Path, n: int) -> Path:
    """n RGB images of the SIZES in turn, each with a `.txt` caption naming it ("image 7")."""
    for i in range(n):
        path = write_image(root / f"{i:03d}.png", SIZES[i % len(SIZES)], seed=i)
        path.with_suffix(".txt").write_text(f"image {i}")
    return root


def folder_dm(root: Path, **kwargs) -> ImageFolderDataModule:
    kw = dict(path=str(root), batch_size=2, val_fraction=0.1, num_workers=0, captions=True, **BUCKETS)
    dm = ImageFolderDataModule(**{**kw, **kwargs})
    dm.setup("fit")
    return dm


def test_buckets_and_nearest_bucket_by_hand():
    # area 64^2, step 16: h=16 -> w=256 (ratio 16, out), h=32 -> w=128 (4), h=48 -> w=4096//48=85 -> 80 (5/3),
    # h=64 -> 64; with their portrait twins, sorted tall to wide
    buckets = bucket_sizes(area=64 * 64, step=16, min_ratio=0.25, max_ratio=4.0)
    assert buckets == [(128, 32), (80, 48), (64, 64), (48, 80), (32, 128)]
    assert bucket_sizes(area=64 * 64, step=16, min_ratio=0.5, max_ratio=2.0) == [(80, 48), (64, 64), (48, 80)]
    # a 100x50 image (ratio 2): |log 2 - log 5/3| = 0.18 beats |log 2 - log 4| = 0.69
    assert buckets[nearest_bucket((50, 100), buckets)] == (48, 80)
    assert buckets[nearest_bucket((100, 50), buckets)] == (80, 48)  # the portrait twin
    assert buckets[nearest_bucket((77, 77), buckets)] == (64, 64)
    assert buckets[nearest_bucket((10, 100), buckets)] == (32, 128)  # beyond the widest: the widest
    # ratio 2.582 = sqrt(5/3 * 4) is the log midpoint of 5/3 and 4: just below goes to 48x80, just above to 32x128
    assert buckets[nearest_bucket((1000, 2581), buckets)] == (48, 80)
    assert buckets[nearest_bucket((1000, 2583), buckets)] == (32, 128)
    assert bucket_sizes(area=24 * 24, step=8, min_ratio=0.25, max_ratio=4.0) == [(32, 16), (24, 24), (16, 32)]


def test_crop_geometry_of_known_crops():
    # a 100x50 (w x h) file into a 64x32 bucket: scale max(32/50, 64/100) = 0.64 covers it exactly, no crop;
    # 100x60 at 0.64 is 64x38.4 -> 64x38, cut 3 rows from the top; 155x50 is 99x32, 17 columns cut from the left
    # (its mirror image's: 99 - 64 - 17 = 18)
    sizes = [(50, 100), (60, 100), (50, 155)]
    crops = Crops(sizes=sizes, targets=[(32, 64)] * 3, square=False)
    g = crops.geometry([0, 1, 2], epoch=0)
    assert g["original_size"].tolist() == [[50, 100], [60, 100], [50, 155]]
    assert g["crop_top_left"].tolist() == [[0, 0], [3, 0], [0, 17]]
    assert g["target_size"].tolist() == [[32, 64]] * 3 and g["crop_top_left"].dtype == torch.long
    assert crops.crop(1, 0)[0].box == pytest.approx((0, 3 * 60 / 38, 100, 35 * 60 / 38))
    flipped = Crops(sizes=sizes, targets=[(32, 64)] * 3, square=False, flip=True, seed=7)
    assert flip_mask(7, 0, [0, 1, 2]).tolist() == [False, False, True]  # seed 7 mirrors item 2 in epoch 0
    assert flipped.geometry([0, 1, 2], 0)["crop_top_left"].tolist() == [[0, 0], [3, 0], [0, 18]]
    # random: every place from 0 to 7 rows down over epochs, each a function of (seed, epoch, item)
    rand = Crops(sizes=sizes, targets=[(32, 64)] * 3, square=False, random=True, seed=1)
    tops = {int(rand.geometry([1], e)["crop_top_left"][0, 0]) for e in range(60)}
    assert tops == set(range(7)) and rand.geometry([1], 3)["crop_top_left"].equal(
        rand.geometry([1], 3)["crop_top_left"]
    )
    # the square crop of plain folders: a 100x40 file, the 40x40 square at x = 30, resized to 16 (scale 0.4)
    square = Crops(sizes=[(40, 100)], targets=[(16, 16)], square=True)
    assert square.geometry([0], 0)["crop_top_left"].tolist() == [[0, 12]]
    assert square.crop(0, 0)[0].box == (30, 0, 70, 40)


def test_loaded_pixels_are_the_crop_and_batches_carry_its_geometry(tmp_path):
    """Through the datamodule: a 100x60 gradient into the 32x64 bucket of image_size=48 (step 16) is the resized
    image's rows 3..35, and its conditions hold that geometry."""
    from PIL import Image

    root = tmp_path / "one"
    root.mkdir()
    ramp = np.add.outer(np.arange(60) * 4, np.arange(100) * 2).astype(np.uint8)  # (h, w): smooth both ways
    Image.fromarray(np.stack([ramp] * 3, -1)).save(root / "a.png")
    (root / "a.txt").write_text("a ramp")
    kw = dict(image_size=48, bucket_step=16, batch_size=1, val_fraction=0.0, flip=False, geometry=True)
    dm = folder_dm(root, **kw)
    assert dm.buckets == [(64, 32), (48, 48), (32, 64)]
    x, conditions = next(iter(dm.train_dataloader()))
    assert x.shape == (1, 3, 32, 64)
    assert conditions["caption"] == ["a ramp"]
    assert conditions["original_size"].tolist() == [[60, 100]] and conditions["crop_top_left"].tolist() == [[3, 0]]
    assert conditions["target_size"].tolist() == [[32, 64]]
    expected = np.asarray(Image.open(root / "a.png").resize((64, 38), Image.Resampling.BICUBIC))[3:35]
    got = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().numpy()
    assert np.abs(got - expected).mean() < 1.5  # one resize with a box vs resize then cut: nearly the same
    off = np.asarray(Image.open(root / "a.png").resize((64, 38), Image.Resampling.BICUBIC))[0:32]
    assert np.abs(got - off).mean() > 5  # and the comparison can tell a crop 3 rows off


def test_every_batch_is_one_bucket_and_each_image_once_per_epoch(tmp_path):
    dm = folder_dm(bucket_folder(tmp_path / "img", 30), flip=True, crop="random", geometry=True)
    # 27 training images: the bucket of each is its nearest, 16x32 (w x h) buckets hold the tall ones
    counts = {b: dm.train_buckets.count(k) for k, b in enumerate(dm.buckets)}
    assert sum(counts.values()) == 27 and all(counts.values())
    expected = sum(n - n % 2 for n in counts.values())  # each bucket's incomplete batch is left out
    loader = dm.train_dataloader()
    epochs = []
    for epoch in range(2):
        dm._sampler.set_epoch(epoch)
        seen = []
        for x, conditions in loader:
            shapes = {tuple(s) for s in conditions["target_size"].tolist()}
            assert len(shapes) == 1 and tuple(x.shape[-2:]) == shapes.pop()
            seen += conditions["caption"]
        assert len(seen) == len(set(seen)) == expected
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled, within and across buckets


def test_bucket_sampler_deals_distinct_batches_to_ranks():
    buckets = [0] * 7 + [1] * 5 + [2] * 9  # full batches of 2: 3 + 2 + 4 = 9, 8 of them dealt to 2 ranks
    ranks = [BucketSampler(range(21), buckets=buckets, batch_size=2, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        order = []
        for s in ranks:
            s.set_epoch(epoch)
            order.append(list(s))
        assert len(order[0]) == len(order[1]) == len(ranks[0]) == 8
        assert not set(order[0]) & set(order[1])
        for o in order:  # consecutive pairs share a bucket
            assert all(buckets[o[k]] == buckets[o[k + 1]] for k in range(0, 8, 2))


class RecordBatches(L.Callback):
    """Test-only: appends each trained batch's (epoch, step, captions, shape, pixel sum, crop corners) to
    `<dirpath>/rank<r>.jsonl`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x, conditions = batch
        row = [
            trainer.current_epoch,
            trainer.global_step,
            conditions["caption"],
            list(x.shape),
            float(x.double().sum()),
            conditions["crop_top_left"].tolist(),
        ]
        with open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _record(log: Path) -> list[str]:
    log.mkdir(exist_ok=True)
    return ["+callbacks.record._target_=tests.test_buckets.RecordBatches", f"+callbacks.record.dirpath={log}"]


def _rows(log: Path, rank: int = 0) -> list[list]:
    return [json.loads(line) for line in (log / f"rank{rank}.jsonl").read_text().splitlines()]


def _folder_run(root: Path) -> list[str]:
    return [
        "data=folder",
        f"data.path={root}",
        "data.image_size=24",
        "data.buckets=true",
        "data.bucket_step=8",
        "data.captions=true",
        "data.geometry=true",
        "data.num_workers=0",
        "data.batch_size=2",
        "conditioning=text",
        *NO_GRIDS,
    ]


def test_resumed_mid_epoch_continues_the_batch_order(tmp_path):
    """Random crops and flips on: a run stopped at step 5 (mid-epoch: 27 images in buckets of 8, 9 and 10 make 13
    batches of 2) and resumed to step 15 trains on the batches, pixels and crops the uninterrupted run trained on."""
    root = bucket_folder(tmp_path / "img", 30)
    run = [*_folder_run(root), "data.crop=random", "data.flip=true", "trainer.max_steps=15"]
    run_train(tmp_path / "straight", [*run, *_record(tmp_path / "a")])
    split = tmp_path / "split"
    every = "callbacks.model_checkpoint.every_n_train_steps=5"
    run_train(split, [*run, every, "trainer.max_steps=5", *_record(tmp_path / "b")])
    run_train(split, [*run, every, f"ckpt_path={split}", *_record(tmp_path / "b")])
    straight, resumed = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r[1] for r in resumed] == list(range(1, 16)) and [r[0] for r in resumed].count(1) == 2
    assert resumed == straight
    # the crops moved (random) and buckets alternate: the comparison sees places and shapes
    assert len({tuple(r[3]) for r in straight}) > 1 and any(r[5] != [[0, 0], [0, 0]] for r in straight)


@pytest.mark.slow
def test_ddp_two_processes_see_every_image_once_per_epoch(tmp_path):
    """A real 2-process gloo run through train.py: each rank its own batches (bucket by bucket), none twice."""
    root = bucket_folder(tmp_path / "img", 30)
    dm = folder_dm(root)
    sampler = BucketSampler(range(27), buckets=dm.train_buckets, batch_size=2, seed=0, num_replicas=2)
    steps = sampler.steps  # per rank and epoch
    log = tmp_path / "log"
    tiny = [o for o in TINY if not o.startswith(("trainer=", "data.batch_size"))]
    result = run_cli(
        "train.py",
        *tiny,
        "trainer=ddp_cpu",
        f"trainer.max_steps={2 * steps}",
        *_folder_run(root),
        *_record(log),
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    by_epoch: dict[int, list[str]] = {0: [], 1: []}
    for rank in (0, 1):
        rows = _rows(log, rank)
        assert len(rows) == 2 * steps
        for epoch, _, captions, *_ in rows:
            by_epoch[epoch] += captions
    for seen in by_epoch.values():
        assert len(seen) == len(set(seen)) == 2 * steps * 2  # 2 ranks x steps x batch 2, none twice
    assert by_epoch[0] != by_epoch[1]


def test_cache_per_bucket_matches_decoding_and_is_reused(tmp_path, caplog):
    root = bucket_folder(tmp_path / "img", 20)
    caplog.set_level(logging.INFO, logger="diffusion.data.folder")
    cached = folder_dm(root, cache=True, geometry=True, flip=False)
    assert "building the cache" in caplog.text and "training images in 3 buckets" in caplog.text
    files = sorted(p.name for p in (root / ".diffusion-cache").glob("*.npy"))
    assert len(files) == 3 and [f.rsplit("-b", 1)[1] for f in files] == ["16x32.npy", "24x24.npy", "32x16.npy"]
    decoded = folder_dm(root, geometry=True, flip=False)
    for a, b in zip(cached.val_dataloader(), decoded.val_dataloader(), strict=True):
        assert torch.equal(a[0], b[0]) and a[1]["caption"] == b[1]["caption"]
        for key in ("original_size", "crop_top_left", "target_size"):
            assert torch.equal(a[1][key], b[1][key])
    caplog.clear()
    again = folder_dm(root, cache=True, geometry=True, flip=False)
    assert "building the cache" not in caplog.text
    assert again.cache_files == cached.cache_files
    x, conditions = next(iter(again.train_dataloader()))
    assert tuple(x.shape[-2:]) == tuple(conditions["target_size"][0].tolist())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bucket_min_ratio=2.0, bucket_max_ratio=0.5), r"data.bucket_min_ratio=2.0 and data.bucket_max_ratio=0.5"),
        (dict(bucket_step=0), r"data.bucket_step=0 must be >= 1"),
        (dict(bucket_step=32), r"data.image_size=24 is smaller than data.bucket_step=32"),
        (dict(crop_size=20), r"data.crop_size cuts squares"),
        (dict(captions=False, geometry=True), r"data.geometry=true .* needs data.captions or data.caption"),
    ],
)
def test_bad_bucket_settings_are_one_line_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        ImageFolderDataModule(**{**dict(path=str(tmp_path), captions=True, **BUCKETS), **kwargs})
    assert "\n" not in str(info.value)


def test_too_large_a_batch_for_every_bucket_is_named(tmp_path):
    root = bucket_folder(tmp_path / "img", 10)
    with pytest.raises(ConfigError, match=r"no bucket holds data.batch_size=8 training images; lower"):
        folder_dm(root, batch_size=8)


def test_latent_cache_per_bucket_holds_each_image_and_its_mirror(tmp_path):
    """codec=vae with data.cache=true: one latent cache per bucket; a training item reads its own moments, or its
    mirror image's when the epoch's flip says so (and its geometry then gives the mirror's left edge)."""
    from diffusion.codec import VAECodec
    from tests.test_latent import save_vae

    save_vae(tmp_path / "vae")
    codec = VAECodec(path=str(tmp_path / "vae"))
    root = bucket_folder(tmp_path / "img", 12)
    dm = folder_dm(root, cache=True, codec=codec, geometry=True, flip=True, val_fraction=0.0, seed=2)
    assert len(dm.latent_files) == len(dm.cache_files) == 3 and dm.latent_file is None
    dm._sampler = None
    loader = dm.train_dataloader()
    dm._sampler.set_epoch(0)
    flipped = set()
    for x, conditions in loader:
        h, w = conditions["target_size"][0].tolist()
        assert x.shape == (2, 8, h // 2, w // 2)  # (mean, log-variance) of 4 channels at the codec's factor 2
        for moments, caption in zip(x, conditions["caption"], strict=True):
            k = dm.train_captions.index([caption])
            pixels = dm.train_pixels.__getitems__([k])[0].float() * (2 / 255) - 1
            mirror = bool(flip_mask(2, 0, [k])[0])
            flipped.add(mirror)
            with torch.no_grad():
                expected = codec.moments(pixels.flip(-1) if mirror else pixels)[0]
            torch.testing.assert_close(moments, expected, rtol=1e-5, atol=1e-5)
    assert flipped == {True, False}


@pytest.mark.parametrize("cache", [False, True])
def test_square_folders_report_their_crop_cached_or_not(tmp_path, cache):
    """Without buckets: a 100x40 (w x h) file's center square is x = 30..70, resized by 16 / 40 = 0.4: its corner is
    (0, 12) in the 40x16 resized image; the flipped one's is 40 - 16 - 12 = 12 as well; a 40x100 file's is (12, 0)."""
    root = tmp_path / "img"
    for name, size in (("wide", (100, 40)), ("tall", (40, 100))):
        write_image(root / f"{name}.png", size, seed=len(name)).with_suffix(".txt").write_text(name)
    dm = folder_dm(root, buckets=False, image_size=16, geometry=True, val_fraction=0.0, cache=cache)
    x, conditions = next(iter(dm.train_dataloader()))
    corners = dict(zip(conditions["caption"], conditions["crop_top_left"].tolist(), strict=True))
    assert corners == {"wide": [0, 12], "tall": [12, 0]} and x.shape == (2, 3, 16, 16)
    assert conditions["target_size"].tolist() == [[16, 16]] * 2
    sizes = dict(zip(conditions["caption"], conditions["original_size"].tolist(), strict=True))
    assert sizes == {"wide": [40, 100], "tall": [100, 40]}


def test_fid_with_buckets_stops_at_start_up_in_one_line(tmp_path):
    """FID's reference and generated images need one shape; buckets give several: a ConfigError before any step."""
    root = bucket_folder(tmp_path / "img", 12)
    fid = [
        "callbacks=[default,fid]",
        "callbacks.fid.feature_extractor={_target_:diffusion.callbacks.fid.RandomFeatures,_partial_:true,num_features:8}",
        f"callbacks.fid.cache_dir={tmp_path / 'fid'}",
    ]
    with pytest.raises(ConfigError, match="callbacks.fid needs images of one shape"):
        run_train(tmp_path / "run", [*_folder_run(root), *fid, "trainer.max_steps=2"])
    assert not (tmp_path / "run" / "checkpoints").exists()
