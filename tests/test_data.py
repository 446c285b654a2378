"""DataModules: the built-in digits and image folders; shapes, ranges, labels, splits and bad input."""

import threading

import pytest
import torch

from diffusion.data import DigitsDataModule, ImageFolderDataModule, split_indices
from tests.conftest import write_image


def test_digits_shapes_range_labels_split():
    dm = DigitsDataModule(image_size=16, batch_size=32, val_fraction=0.1)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == 180
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    assert y.dtype == torch.long and 0 <= y.min() and y.max() <= 9
    assert dm.num_classes == 10 and dm.channels == 1
    xs, ys = DigitsDataModule().load()
    assert set(ys.tolist()) == set(range(10))
    assert DigitsDataModule(channels=3).load()[0].shape == (1797, 3, 16, 16)


def test_split_is_fixed_and_disjoint():
    a = split_indices(100, 0.2, seed=3)
    assert a == split_indices(100, 0.2, seed=3)
    assert a != split_indices(100, 0.2, seed=4)
    train, val = a
    assert len(val) == 20 and not set(train) & set(val) and len(train) + len(val) == 100


def test_folder_scans_recursively_resizes_and_crops(image_folder):
    dm = ImageFolderDataModule(path=str(image_folder), image_size=16, batch_size=4, val_fraction=0.2, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 13
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert (y == -1).all() and dm.num_classes is None


def test_folder_grayscale_and_labels(image_folder):
    dm = ImageFolderDataModule(
        path=str(image_folder),
        image_size=8,
        channels=1,
        labels=True,
        batch_size=13,
        val_fraction=0.0,
        num_workers=0,
        flip=False,
    )
    dm.setup("fit")
    assert dm.classes == ["cats", "dogs"] and dm.num_classes == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8)
    assert sorted(y.tolist()) == [0] * 6 + [1] * 7


def test_folder_order_is_stable(image_folder):
    def files():
        dm = ImageFolderDataModule(path=str(image_folder), image_size=8, val_fraction=0.2, num_workers=0)
        dm.setup()
        return dm.train_set.files, dm.val_set.files

    assert files() == files()


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(path=str(tmp_path / "nope")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataModule(path=str(tmp_path / "empty")).setup()


def test_corrupt_file_is_named_or_skipped(image_folder):
    bad = image_folder / "cats" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolderDataModule(path=str(image_folder), image_size=16, num_workers=0).setup()
    dm = ImageFolderDataModule(path=str(image_folder), image_size=16, num_workers=0, skip_bad=True)
    dm.setup()
    assert dm.num_skipped == 1 and len(dm.train_set) + len(dm.val_set) == 13


def test_too_small_image_is_named(image_folder):
    write_image(image_folder / "cats" / "tiny.png", (8, 8))
    with pytest.raises(ValueError, match="tiny.png is 8x8"):
        ImageFolderDataModule(path=str(image_folder), image_size=16, num_workers=0).setup()
    dm = ImageFolderDataModule(path=str(image_folder), image_size=16, num_workers=0, allow_upscale=True)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 14


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(batch_size=0), "batch_size"), (dict(val_fraction=1.0), "val_fraction"), (dict(channels=2), "channels")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


# --- real-world files: modes, formats, EXIF, crops ---------------------------------------------------------------
def _solid(path, mode, size, color, **save):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def test_load_image_handles_modes_and_formats(tmp_path):
    import numpy as np
    from PIL import Image

    from diffusion.data.images import Preprocess, load_image

    rgb, gray = Preprocess(image_size=8, channels=3), Preprocess(image_size=8, channels=1)
    # RGBA: a fully transparent pixel is composited on white, an opaque one keeps its color
    clear = _solid(tmp_path / "clear.png", "RGBA", (16, 16), (0, 0, 0, 0))
    assert (load_image(clear, rgb) == 255).all()
    opaque = _solid(tmp_path / "opaque.webp", "RGBA", (16, 16), (10, 20, 30, 255), lossless=True)
    assert load_image(opaque, rgb)[:, 0, 0].tolist() == [10, 20, 30]
    # 16-bit grayscale is scaled to 8 bits (65535 -> 255, 32896 -> 128), not clipped at 255
    arr16 = np.full((16, 16), 32896, dtype=np.uint16)
    arr16[:, 8:] = 65535
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
    out = load_image(tmp_path / "deep.png", Preprocess(image_size=16, channels=1))
    assert out.shape == (1, 16, 16) and out[0, 0, 0] == 128 and out[0, 0, 15] == 255
    # palette GIF (first frame), BMP, grayscale -> RGB
    frames = [Image.new("P", (16, 16), i) for i in (3, 7)]
    for f in frames:
        f.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 3 + [1, 2, 3] + [0] * (3 * 248))
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "anim.gif", rgb)[:, 4, 4].tolist() == [200, 100, 50]
    _solid(tmp_path / "g.bmp", "L", (16, 16), 77)
    assert load_image(tmp_path / "g.bmp", rgb)[:, 0, 0].tolist() == [77, 77, 77]
    assert load_image(tmp_path / "opaque.webp", gray).shape == (1, 8, 8)


def test_exif_orientation_is_applied(tmp_path):
    import numpy as np
    from PIL import Image

    from diffusion.data.images import Preprocess, load_image

    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high; left half red
    arr[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": displayed 20 wide, 40 high, red on top
    Image.fromarray(arr).save(tmp_path / "rot.png", exif=exif)
    Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    prep = Preprocess(image_size=20, channels=3)  # 20x20 center crop of the 20x40 upright image
    np.testing.assert_array_equal(load_image(tmp_path / "rot.png", prep), load_image(tmp_path / "upright.png", prep))
    # the center crop straddles the red/black boundary horizontally (upper half red) only if rotated
    out = load_image(tmp_path / "rot.png", prep)
    assert out[0, 2].min() == 255 and out[0, 17].max() == 0


def test_center_and_random_crop(tmp_path):
    import numpy as np
    from PIL import Image

    from diffusion.data.images import Preprocess, load_image

    arr = np.zeros((16, 64, 3), dtype=np.uint8)
    arr[:, :16] = 255  # only the leftmost 16x16 square is white
    Image.fromarray(arr).save(tmp_path / "wide.png")
    center = load_image(tmp_path / "wide.png", Preprocess(image_size=16, channels=3))
    assert center.max() == 0
    rand = Preprocess(image_size=16, channels=3, crop="random")
    crops = [load_image(tmp_path / "wide.png", rand, torch.Generator().manual_seed(s)).mean() for s in range(12)]
    assert len({round(float(c), 3) for c in crops}) > 3 and max(crops) > 0
    with pytest.raises(ValueError, match="data.crop='diagonal'"):
        ImageFolderDataModule(path=str(tmp_path), crop="diagonal")
    with pytest.raises(ValueError, match="data.crop=random cannot be used with data.cache=true"):
        ImageFolderDataModule(path=str(tmp_path), crop="random", cache=True)


def test_scan_skips_hidden_and_non_images_and_sorts(tmp_path):
    from diffusion.data import scan_images

    for name in ["b/2.png", "a/10.jpg", "a/9.gif", "c.webp", ".hidden/x.png", "b/._1.png", "notes.txt", "A.JPEG"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    names = [str(p.relative_to(tmp_path)) for p in scan_images(tmp_path)]
    assert names == ["A.JPEG", "a/10.jpg", "a/9.gif", "b/2.png", "c.webp"]


def _truncated_jpeg(path, seed=0):
    write_image(path, (64, 64), seed=seed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_file_found_by_full_verify_or_at_read(image_folder):
    _truncated_jpeg(image_folder / "cats" / "cut.jpg")
    kw = dict(path=str(image_folder), image_size=16, num_workers=0, val_fraction=0.0, flip=False)
    dm = ImageFolderDataModule(**kw)  # the header is intact: setup passes, the read names the file
    dm.setup()
    with pytest.raises(OSError, match="cut.jpg"):
        for _ in dm.train_dataloader():
            pass
    with pytest.raises(ValueError, match="cannot decode image .*cut.jpg"):
        ImageFolderDataModule(**kw, verify="full").setup()
    dm = ImageFolderDataModule(**kw, verify="full", skip_bad=True)
    dm.setup()
    assert dm.num_skipped == 1 and len(dm.train_set) == 13


# --- the cache ---------------------------------------------------------------------------------------------------
def _all_batches(dm):
    loader = dm._loader(dm.train_set, shuffle=False)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_cache_matches_decoding_and_is_rebuilt_when_stale(image_folder, tmp_path, caplog):
    caplog.set_level("INFO")
    write_image(image_folder / "cats" / "rgba.png", (40, 30), "RGBA", seed=5)
    kw = dict(path=str(image_folder), image_size=16, num_workers=0, val_fraction=0.0, flip=False, labels=True)
    decoded = ImageFolderDataModule(**kw)
    decoded.setup()
    cached = ImageFolderDataModule(**kw, cache=True, cache_dir=str(tmp_path / "cache"))
    cached.prepare_data()
    cached.setup()
    assert "building the cache" in caplog.text
    caplog.clear()
    x0, y0 = _all_batches(decoded)
    x1, y1 = _all_batches(cached)
    assert x0.shape == (14, 3, 16, 16) and x0.dtype == torch.float32
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and sorted(y1.tolist()) == [0] * 7 + [1] * 7
    first = cached.cache_file
    assert first.exists() and first.with_suffix(".json").exists()

    # same files, same preprocessing: reused, not rebuilt
    again = ImageFolderDataModule(**kw, cache=True, cache_dir=str(tmp_path / "cache"))
    again.setup()
    assert again.cache_file == first and "building" not in caplog.text

    # a changed file: a new cache, with the new pixels; the stale one is gone
    write_image(image_folder / "cats" / "c0.png", (40, 36), "RGB", seed=1234)
    changed = ImageFolderDataModule(**kw, cache=True, cache_dir=str(tmp_path / "cache"))
    changed.setup()
    assert changed.cache_file != first and not first.exists()
    fresh = ImageFolderDataModule(**kw)
    fresh.setup()
    assert torch.equal(_all_batches(changed)[0], _all_batches(fresh)[0])
    assert not torch.equal(_all_batches(changed)[0], x1)

    # changed preprocessing: another cache, other shape; the 16px one is kept
    other = ImageFolderDataModule(**{**kw, "image_size": 8}, cache=True, cache_dir=str(tmp_path / "cache"))
    other.setup()
    assert other.cache_file != changed.cache_file and changed.cache_file.exists()
    assert _all_batches(other)[0].shape == (14, 3, 8, 8)


def test_cache_default_location_flips_and_bad_files(image_folder):
    kw = dict(path=str(image_folder), image_size=16, num_workers=0, val_fraction=0.0, cache=True)
    (image_folder / "cats" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolderDataModule(**kw).setup()
    cache_dir = image_folder / ".diffusion-cache"
    assert not list(cache_dir.glob("*.npy")) and not list(cache_dir.glob(".*tmp"))  # nothing half-written
    dm = ImageFolderDataModule(**kw, skip_bad=True)
    dm.setup()
    assert dm.num_skipped == 1 and len(dm.train_set) == 13 and dm.cache_file.parent == cache_dir
    with pytest.raises(ValueError, match="broken.png"):  # the cache remembers the bad file
        ImageFolderDataModule(**kw).setup()
    # flips happen on the batch: every image is itself or its mirror, and both occur
    torch.manual_seed(0)
    x, _ = next(iter(dm._loader(dm.train_set, shuffle=False, flip=True)))
    plain = ImageFolderDataModule(**kw, skip_bad=True, flip=False)
    plain.setup()
    ref, _ = next(iter(plain._loader(plain.train_set, shuffle=False)))
    same = (x == ref).flatten(1).all(1)
    mirrored = (x == ref.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and (~same).any() and (~mirrored).any()


def test_skip_bad_with_every_image_broken_is_one_line(tmp_path):
    """Truncated PNGs pass the header check at setup and fail when read: under skip_bad, once every file has failed
    the loader says so in one line naming the folder (it recursed until 'maximum recursion depth exceeded')."""
    from diffusion.errors import BadFileError, user_error_message

    root = tmp_path / "broken"
    for i in range(3):
        path = write_image(root / f"{i}.png", (64, 64), seed=i)
        path.write_bytes(path.read_bytes()[:200])  # the header and the start of the pixels
    kw = dict(path=str(root), image_size=16, batch_size=2, num_workers=0, val_fraction=0.0)
    dm = ImageFolderDataModule(**kw, skip_bad=True)
    dm.setup()
    raised: list[BaseException] = []

    def first_batch() -> None:
        try:
            next(iter(dm.train_dataloader()))
        except BaseException as e:
            raised.append(e)

    worker = threading.Thread(target=first_batch, daemon=True)  # the old loader retried for minutes
    worker.start()
    worker.join(timeout=60)
    assert raised, "the loader still retries broken images after 60 s"
    assert isinstance(raised[0], BadFileError), raised[0]
    message = user_error_message(raised[0])
    assert message.startswith(f"data.skip_bad=true but no readable image was found in {root}: all 3 images failed")


def test_loader_defaults(image_folder):
    from diffusion.data.base import ResumableSampler

    dm = ImageFolderDataModule(path=str(image_folder), image_size=16, batch_size=4)
    assert 1 <= dm.num_workers <= 8
    dm.num_workers = 0
    dm.setup()
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last and isinstance(train.sampler, ResumableSampler)  # a DistributedSampler: one shard per rank
    assert not val.drop_last and val.pin_memory == torch.cuda.is_available()
    dm = ImageFolderDataModule(path=str(image_folder), image_size=16, num_workers=2)
    dm.setup()
    assert dm.train_dataloader().persistent_workers


# --- standard datasets in their real on-disk formats -------------------------------------------------------------
def _fake_cifar10(root, per_batch=6):
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": name,
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"{i}.png" for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {
                "label_names": [
                    "airplane",
                    "automobile",
                    "bird",
                    "cat",
                    "deer",
                    "dog",
                    "frog",
                    "horse",
                    "ship",
                    "truck",
                ],
                "num_vis": 3072,
                "num_cases_per_batch": per_batch,
            },
            f,
        )
    return folder


def test_cifar10_reads_python_batches(tmp_path):
    import pickle

    from diffusion.data import CIFAR10DataModule

    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py lacks data_batch_1.*cifar-10-python.tar.gz"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup()
    folder = _fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=30, num_workers=0, flip=False)
    dm.setup()
    assert len(dm.train_set) == 30 and len(dm.val_set) == 6 and dm.num_classes == 10 and dm.classes[3] == "cat"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (30, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    with open(folder / "data_batch_1", "rb") as f:
        b1 = pickle.load(f)
    # the first image, pixel (row 0, col 1): R, G, B planes of 1024 bytes each
    want = torch.tensor([b1["data"][0][1], b1["data"][0][1025], b1["data"][0][2049]]).float() / 127.5 - 1
    torch.testing.assert_close(dm.train_set[0][0][:, 0, 1].float() / 127.5 - 1, want)
    assert y.dtype == torch.long and dm.train_set.labels[:6].tolist() == b1["labels"]
    small = CIFAR10DataModule(root=str(tmp_path), image_size=16, channels=1, num_workers=0)
    small.setup()
    assert small.val_set[0][0].shape == (1, 16, 16)


def _idx(path, array, gz):
    import gzip
    import struct

    import numpy as np

    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_mnist_reads_idx_files(tmp_path):
    import numpy as np

    from diffusion.data import MNISTDataModule

    with pytest.raises(FileNotFoundError, match=r"MNIST/raw lacks train-images-idx3-ubyte"):
        MNISTDataModule(root=str(tmp_path), num_workers=0).setup()
    raw = tmp_path / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    _idx(raw / "train-images-idx3-ubyte", images, gz=True)
    _idx(raw / "train-labels-idx1-ubyte", np.arange(7, dtype=np.uint8), gz=True)
    _idx(raw / "t10k-images-idx3-ubyte", images[:3], gz=False)
    _idx(raw / "t10k-labels-idx1-ubyte", np.array([9, 8, 7], dtype=np.uint8), gz=False)
    dm = MNISTDataModule(root=str(tmp_path), image_size=28, batch_size=7, num_workers=0)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (7, 1, 28, 28) and sorted(y.tolist()) == list(range(7))
    assert torch.equal(dm.train_set[2][0][0], torch.from_numpy(images[2]))
    assert dm.val_set.labels.tolist() == [9, 8, 7] and dm.num_classes == 10
    resized = MNISTDataModule(root=str(tmp_path), num_workers=0)
    resized.setup()
    assert resized.val_set[0][0].shape == (1, 32, 32)


def _fake_celeba(folder, n=5):
    """178x218 images: a 150x150 centered square of one color, a different color outside it."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (178, 218), (250, 0, 0))
        img.paste((0, 40 * i, 200), (14, 34, 164, 184))
        img.save(folder / f"{i + 1:06d}.jpg", quality=100, subsampling=0)


def test_celeba_crop_resize_and_split(tmp_path):
    from diffusion.data import CelebADataModule

    with pytest.raises(FileNotFoundError, match="no img_align_celeba folder"):
        CelebADataModule(path=str(tmp_path))
    _fake_celeba(tmp_path / "celeba" / "img_align_celeba")
    dm = CelebADataModule(path=str(tmp_path), batch_size=2, num_workers=0, val_fraction=0.2, cache=False, flip=False)
    assert dm.path == tmp_path / "celeba" / "img_align_celeba"
    dm.setup()
    assert len(dm.train_set) == 4 and len(dm.val_set) == 1 and dm.num_classes is None
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 64, 64) and (y == -1).all()
    # the 140 crop lies inside the 150 square: no red from outside it
    red = ((x[:, 0] + 1) * 127.5).amax()
    assert red < 40
    wide = CelebADataModule(path=str(tmp_path), crop_size=178, num_workers=0, cache=False, flip=False)
    wide.setup()
    assert (wide.train_set[0][0][0].float()).amax() > 200  # a 178 crop reaches the red border
    # torchvision's official partition file: 0 = train, 1 = valid, 2 = test
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n000005.jpg 0\n"
    )
    official = CelebADataModule(path=str(tmp_path / "celeba"), num_workers=0, cache=True)
    official.setup()
    assert len(official.train_set) == 3 and len(official.val_set) == 1


def test_standard_sets_train_through_the_config(tmp_path):
    from tests.conftest import run_train

    _fake_cifar10(tmp_path / "data", per_batch=4)
    run = tmp_path / "run"
    cfg, _ = run_train(
        run,
        [
            "data=cifar10",
            f"data.root={tmp_path / 'data'}",
            "data.batch_size=4",
            "data.num_workers=0",
            "model.num_classes=10",
            "trainer.max_steps=2",
            "callbacks.sample_grid.every_n_steps=0",
        ],
    )
    assert cfg.model.in_channels == 3 and cfg.model.image_size == 32
    assert (run / "checkpoints" / "last.ckpt").exists()
