"""DataModules: the built-in digits and image folders; shapes, ranges, labels, splits and bad input."""

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
