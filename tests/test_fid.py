"""FID/KID: sanity and float64 of the values, the real-feature cache and its key, DDP gathering, the callback in a
run (and its precision), the Inception preprocessing on a random-weight extractor, unsafe or missing weights."""

import functools
import os
import shutil
import sys
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate

from diffusion.callbacks.fid import (
    FID,
    INCEPTION_WEIGHTS,
    RandomFeatures,
    describe_dataset,
    extract_features,
    fid_kid,
    load_or_compute_real_features,
    reference_images,
)
from diffusion.data import DigitsDataModule
from diffusion.errors import user_error_message
from diffusion.samplers import ddim_sample
from diffusion.unet import UNet
from tests.conftest import compose_train, run_train, write_image

CPU = torch.device("cpu")


@functools.cache
def digit_features() -> torch.Tensor:
    x, _ = DigitsDataModule(image_size=16).load()
    return extract_features(RandomFeatures(num_features=16), x, batch_size=512, device=torch.device("cpu"))


def _metrics(real, fake, **kw):
    return fid_kid(real, fake, num_real=len(real), num_fake=len(fake), kid_subset_size=200, kid_subsets=20, **kw)


def test_real_halves_close_noise_far():
    feats = digit_features()
    halves = _metrics(feats[0::2], feats[1::2])
    noise = extract_features(
        RandomFeatures(num_features=16),
        torch.randn(900, 1, 16, 16).clamp(-1, 1),
        batch_size=512,
        device=torch.device("cpu"),
    )
    far = _metrics(feats[0::2], noise)
    assert 0 <= halves["fid"] < 0.05 * far["fid"]
    assert abs(halves["kid"]) < 0.05 * far["kid"] and far["kid"] > 0
    # identical sets: FID ~ 0
    assert _metrics(feats[:500], feats[:500])["fid"] == pytest.approx(0.0, abs=1e-6)


def test_fid_is_computed_in_float64():
    """FID against the closed form ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) in float64: a float32 result
    (what torchmetrics returns for float32 features) is off by ~1e-8 relative."""
    from scipy.linalg import sqrtm

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(200, 6, generator=gen)
    fake = torch.randn(150, 6, generator=gen) * 1.3 + 0.4
    r, f = real.double().numpy(), fake.double().numpy()
    s1, s2 = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    exact = ((r.mean(0) - f.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    value = fid_kid(real, fake, num_real=200, num_fake=150, kid_subset_size=50, kid_subsets=5)["fid"]
    assert value == pytest.approx(exact, rel=1e-12)


class Counting(RandomFeatures):
    calls = 0

    def forward(self, x):
        Counting.calls += 1
        return super().forward(x)


def test_real_features_cached_and_invalidated(tmp_path):
    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup()
    kw = dict(cache_dir=tmp_path, num_real=64, batch_size=32, device=torch.device("cpu"))
    fx = Counting(num_features=8)
    first, path, computed = load_or_compute_real_features(fx, dm.train_set, key=describe_dataset(dm, "train"), **kw)
    assert computed and path.is_file() and first.shape == (64, 8) and Counting.calls == 2
    mtime = path.stat().st_mtime_ns
    again, path2, computed2 = load_or_compute_real_features(fx, dm.train_set, key=describe_dataset(dm, "train"), **kw)
    assert not computed2 and path2 == path and path.stat().st_mtime_ns == mtime and Counting.calls == 2
    assert torch.equal(again, first)
    # other preprocessing (image size), split, count or extractor: another cache entry
    dm24 = DigitsDataModule(image_size=24, batch_size=32)
    dm24.setup()
    _, p24, c24 = load_or_compute_real_features(fx, dm24.train_set, key=describe_dataset(dm24, "train"), **kw)
    _, pval, cval = load_or_compute_real_features(fx, dm.val_set, key=describe_dataset(dm, "val"), **kw)
    _, pfx, cfx = load_or_compute_real_features(
        Counting(num_features=8, seed=1), dm.train_set, key=describe_dataset(dm, "train"), **kw
    )
    assert c24 and cval and cfx and len({path, p24, pval, pfx}) == 4


@pytest.mark.parametrize("damage", ["truncated", "not a dict", "other rows", "non-finite"])
def test_a_damaged_real_feature_cache_is_named_and_rebuilt(tmp_path, caplog, damage):
    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup()
    kw = dict(key=describe_dataset(dm, "train"), cache_dir=tmp_path, num_real=64, batch_size=32, device=CPU)
    first, path, _ = load_or_compute_real_features(RandomFeatures(num_features=8), dm.train_set, **kw)
    good = torch.load(path, weights_only=True)
    if damage == "truncated":  # a full disk, an interrupted copy
        path.write_bytes(path.read_bytes()[:200])
    else:
        features = {"other rows": first[:10], "non-finite": first.clone().fill_(float("nan"))}.get(damage)
        torch.save([1, 2] if features is None else {**good, "features": features}, path)
    caplog.set_level("INFO")
    again, path2, computed = load_or_compute_real_features(RandomFeatures(num_features=8), dm.train_set, **kw)
    assert f"the real-feature cache {path} is damaged" in caplog.text and "computing it again" in caplog.text
    assert computed and path2 == path and torch.equal(again, first)
    assert torch.equal(torch.load(path, weights_only=True)["features"], first)


class StopAtFirstStep(L.Callback):
    """Ends a run at its first training step: what happened before training is what the test looks at."""

    def on_train_batch_start(self, *args) -> None:
        raise RuntimeError("stopped at the first step")


def test_the_real_feature_cache_is_checked_before_training(tmp_path, caplog):
    """A run with callbacks.fid reads (or computes) its real features at start-up: a damaged cache is rebuilt
    before the first step, not found after hours of training when the first FID is due."""
    cache = tmp_path / "cache"
    overrides = [
        "callbacks=[default,fid]",
        "callbacks.fid.feature_extractor={_target_:diffusion.callbacks.fid.RandomFeatures,_partial_:true,num_features:8}",
        "callbacks.fid.num_real=40",
        "callbacks.fid.every_n_steps=0",
        f"callbacks.fid.cache_dir={cache}",
        "callbacks.sample_grid=null",
        "+callbacks.stop._target_=tests.test_fid.StopAtFirstStep",
    ]
    caplog.set_level("INFO")
    with pytest.raises(RuntimeError, match="stopped at the first step"):
        run_train(tmp_path / "run", overrides)
    (path,) = cache.glob("real_*.pt")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(RuntimeError, match="stopped at the first step"):
        run_train(tmp_path / "run2", overrides)
    assert f"the real-feature cache {path} is damaged" in caplog.text
    assert path.read_bytes() == good


def test_file_datasets_are_keyed_by_their_files(tmp_path, image_folder):
    from diffusion.data import ImageFolderDataModule

    dm = ImageFolderDataModule(path=str(image_folder), image_size=16, num_workers=0, val_fraction=0.2)
    dm.setup()
    before = describe_dataset(dm, "train")
    target = dm.train_set.files[0]
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))  # the file was edited
    assert describe_dataset(dm, "train")["items"] != before["items"]


def _reference(tmp_path, overrides, fx, split="train"):
    """(cache file, computed now) of the real features for `python train.py <overrides>`'s datamodule."""
    cfg = compose_train(tmp_path / "run", overrides)
    dm = instantiate(cfg.data)
    dm.setup()
    _, path, computed = load_or_compute_real_features(
        fx,
        reference_images(dm, split),
        key=describe_dataset(dm, split),
        cache_dir=tmp_path / "fid",
        num_real=None,
        batch_size=8,
        device=CPU,
    )
    return path, computed


def test_cache_key_follows_every_setting_that_changes_pixels(tmp_path, image_folder):
    fx = RandomFeatures(num_features=4)
    other = shutil.copytree(image_folder, tmp_path / "other")  # the same pixels, another dataset
    base = ["data=folder", f"data.path={image_folder}", "data.image_size=16", "data.num_workers=0"]
    path, computed = _reference(tmp_path, base, fx)
    assert computed
    changed = {
        "image_size": ["data.image_size=24"],
        "channels": ["data.channels=1"],
        "crop": ["data.crop=random"],
        "crop_size": ["data.crop_size=30"],
        "val_fraction": ["data.val_fraction=0.3"],
        "seed": ["data.seed=1"],
        "path": [f"data.path={other}"],
    }
    paths = {path}
    for name, extra in changed.items():
        p, c = _reference(tmp_path, [*base, *extra], fx)
        assert c and p not in paths, name
        paths.add(p)
    p, c = _reference(tmp_path, base, fx, split="val")
    assert c and p not in paths
    neutral = {
        "batch_size": ["data.batch_size=3"],
        "num_workers": ["data.num_workers=2"],
        "flip": ["data.flip=false"],
        "verify": ["data.verify=full"],
        "labels": ["data.labels=true"],
        "cache_dir": [f"data.cache_dir={tmp_path / 'data_cache'}"],
    }
    for name, extra in neutral.items():
        assert _reference(tmp_path, [*base, *extra], fx) == (path, False), name


@pytest.mark.parametrize("cache", [False, True])
def test_celeba_crop_size_changes_the_cache(tmp_path, cache):
    """CelebA's crop_size 140 and 148 are other pixels, decoded per step or from the data cache; another
    data-cache folder is not."""
    for i in range(3):
        write_image(tmp_path / "celeba" / "img_align_celeba" / f"{i:06d}.jpg", (178, 218), seed=i)
    fx = RandomFeatures(num_features=4)
    base = ["data=celeba", f"data.path={tmp_path / 'celeba'}", "data.image_size=16", "data.num_workers=0"]
    base.append(f"data.cache={str(cache).lower()}")
    p140, c140 = _reference(tmp_path, [*base, "data.crop_size=140"], fx)
    p148, c148 = _reference(tmp_path, [*base, "data.crop_size=148"], fx)
    assert c140 and c148 and p140 != p148
    moved = _reference(tmp_path, [*base, "data.crop_size=140", f"data.cache_dir={tmp_path / 'elsewhere'}"], fx)
    assert moved == (p140, False)


def test_reference_images_are_never_flipped(tmp_path):
    """Flips are a training augmentation: the statistics (and their cache file) are the same with data.flip."""
    fx = RandomFeatures(num_features=8)
    flipped, p1, c1 = _digits_reference(tmp_path / "a", fx, flip=True)
    plain, p2, c2 = _digits_reference(tmp_path / "b", fx, flip=False)
    assert c1 and c2 and p1.name == p2.name and torch.equal(flipped, plain)


def _digits_reference(cache_dir, fx, *, flip):
    dm = DigitsDataModule(image_size=8, flip=flip)
    dm.setup()
    return load_or_compute_real_features(
        fx,
        reference_images(dm, "train"),
        key=describe_dataset(dm, "train"),
        cache_dir=cache_dir,
        num_real=64,
        batch_size=64,
        device=CPU,
    )


def _ddp_worker(rank: int, world: int, port: int, feats_path: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = torch.load(feats_path, weights_only=True)
        real, fake = data["real"], data["fake"]
        n = len(fake)
        share = fake[rank * n // world : (rank + 1) * n // world]  # the callback's contiguous split
        values = fid_kid(
            real if rank == 0 else None,
            share,
            num_real=len(real),
            num_fake=n,
            kid_subset_size=100,
            kid_subsets=10,
            seed=3,
        )
        torch.save(values, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_one_process(tmp_path):
    feats = digit_features()
    real, fake = feats[:300], feats[300:551] + 0.05  # an odd number of fakes: uneven shares
    torch.save({"real": real, "fake": fake}, tmp_path / "feats.pt")
    port = 29_500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "feats.pt"), str(tmp_path / "out")), nprocs=2, join=True)
    single = fid_kid(real, fake, num_real=300, num_fake=251, kid_subset_size=100, kid_subsets=10, seed=3)
    for rank in (0, 1):
        values = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert values["fid"] == pytest.approx(single["fid"], rel=1e-9)
        assert values["kid"] == pytest.approx(single["kid"], rel=1e-9, abs=1e-12)
        assert values["kid_std"] == pytest.approx(single["kid_std"], rel=1e-9, abs=1e-12)
    assert single["fid"] > 0


def test_callback_logs_fid_in_a_run(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    overrides = [
        "callbacks=[default,fid]",
        "callbacks.ema.decay=0.9",
        "callbacks.fid.feature_extractor={_target_:diffusion.callbacks.fid.RandomFeatures,_partial_:true,num_features:8}",
        "callbacks.fid.num_samples=6",
        "callbacks.fid.num_real=40",
        "callbacks.fid.every_n_steps=2",
        "callbacks.fid.batch_size=16",
        "callbacks.fid.kid_subset_size=5",
        f"callbacks.fid.cache_dir={cache}",
        "callbacks.sample_grid=null",
        "trainer.max_steps=3",
        "trainer.val_check_interval=100",
        "logger=csv",
    ]
    run_train(run, overrides)
    import csv

    rows = [r for r in csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")) if r.get("val/fid")]
    assert [int(r["step"]) for r in rows] == [2, 3]  # every 2 steps, and at the end
    assert all(float(r["val/fid"]) > 0 and float(r["val/fid_num_samples"]) == 6 for r in rows)
    assert float(rows[0]["val/fid_num_real"]) == 40
    assert len(list(cache.glob("real_*.pt"))) == 1


def _trainer(precision: str, datamodule) -> SimpleNamespace:
    """What FID.evaluate reads of a single-process Trainer."""
    return SimpleNamespace(
        precision=precision,
        datamodule=datamodule,
        is_global_zero=True,
        global_rank=0,
        world_size=1,
        global_step=1,
        strategy=SimpleNamespace(barrier=lambda name: None),
        callback_metrics={},
        loggers=[],
    )


@pytest.mark.parametrize(("precision", "net_dtype"), [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_fid_samples_in_the_trainers_precision(tmp_path, precision, net_dtype):
    """Under a bf16 trainer the network runs in bf16 during FID sampling; the sampler's output stays fp32."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1, 2], norm_groups=4)
    net_dtypes, sample_dtypes = set(), set()
    net.register_forward_hook(lambda module, args, out: net_dtypes.add(out.dtype))

    def sampler(model, schedule, noise, generator=None):
        x = ddim_sample(model, schedule, noise, generator=generator, steps=2)
        sample_dtypes.add(x.dtype)
        return x

    from diffusion.model import DiffusionModel
    from diffusion.process.discrete import NoiseSchedule

    module = SimpleNamespace(model=DiffusionModel(net=net, process=NoiseSchedule(num_steps=20)), device=CPU)
    dm = DigitsDataModule(image_size=8)
    dm.setup()
    fid = FID(
        sampler=sampler,
        feature_extractor=RandomFeatures(num_features=4),
        num_samples=4,
        num_real=20,
        batch_size=4,
        kid_subset_size=2,
        cache_dir=str(tmp_path),
        use_ema=False,
    )
    trainer = _trainer(precision, dm)
    fid.setup(trainer, module, "fit")
    metrics = fid.evaluate(trainer, module)
    assert net_dtypes == {net_dtype} and sample_dtypes == {torch.float32}
    assert np.isfinite(metrics["val/fid"])


# --- the Inception extractor, built from random weights in torch-fidelity's on-disk format ------------------
@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-weight state dict of torch-fidelity's FeatureExtractorInceptionV3, saved as its weights file is."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(cls, "load_state_dict", lambda self, state, strict=True: None),
    ):
        state = cls("inception-v3-compat", ["2048"]).state_dict()
    gen = torch.Generator().manual_seed(0)
    for name, value in state.items():
        if name.endswith("conv.weight"):  # He init, so activations keep their scale through the 94 layers
            value.copy_(torch.randn(value.shape, generator=gen) * (2 / value[0].numel()) ** 0.5)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS
    torch.save(state, path)
    return path


def _fid_callback(tmp_path, overrides):
    """The FID callback as `python train.py 'callbacks=[default,fid]' <overrides>` builds it."""
    cfg = compose_train(tmp_path / "run", ["callbacks=[default,fid]", *overrides])
    return instantiate(cfg.callbacks.fid)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_inception_features_of_a_file_equal_those_of_its_pixels_as_a_sample(tmp_path, inception_weights, mode):
    """Real image files and generated samples in [-1, 1] reach Inception as the same uint8 pixels, at their own
    size (grayscale repeated to RGB), and torch-fidelity's TF-compatible resize to 299 is the only resize."""
    from PIL import Image
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from diffusion.data import ImageFolderDataModule

    for i in range(3):
        write_image(tmp_path / "images" / f"{i}.png", (20, 20), mode, seed=i)
    extractor = _fid_callback(tmp_path, [f"callbacks.fid.weights_path={inception_weights}"]).extractor
    channels = 3 if mode == "RGB" else 1
    dm = ImageFolderDataModule(path=str(tmp_path / "images"), image_size=20, channels=channels, val_fraction=0.0)
    dm.setup()
    real, _, _ = load_or_compute_real_features(
        extractor,
        reference_images(dm, "train"),
        key=describe_dataset(dm, "train"),
        cache_dir=tmp_path / "fid",
        num_real=None,
        batch_size=2,
        device=CPU,
    )
    pixels = (
        torch.stack([torch.from_numpy(np.array(Image.open(f))).reshape(20, 20, channels) for f in dm.train_set.files])
        .permute(0, 3, 1, 2)
        .contiguous()
    )  # (N, C, 20, 20) uint8, straight from the files
    sample = pixels.double() / 127.5 - 1  # a generated sample with these pixels, in [-1, 1]
    jitter = (torch.rand(sample.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * (1.9 / 255)
    for x in (sample, sample + jitter):  # within half a level of each pixel: the same uint8 image
        assert torch.equal(extract_features(extractor, x.float(), batch_size=2, device=CPU), real)
    standard = FeatureExtractorInceptionV3(  # torch-fidelity on uint8 RGB, as its own FID does (our own file)
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_weights)
    )
    assert torch.equal(standard(pixels.expand(-1, 3, -1, -1))[0], real)
    assert real.shape == (3, 2048) and real.std(0).mean() > 0


class _RunsCode:
    """Unpickling this creates `marker`: what a crafted weights file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _no_training(run) -> bool:
    return not (run / "checkpoints").exists() and not list(run.rglob("metrics.csv"))


def test_weights_that_would_run_code_are_refused_before_training(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / INCEPTION_WEIGHTS
    torch.save({"fc.weight": _RunsCode(marker)}, evil)
    torch.load(evil, weights_only=False)  # the file really runs code when unpickled
    assert marker.exists()
    marker.unlink()
    run = tmp_path / "run"
    with pytest.raises(Exception) as info:
        run_train(run, ["callbacks=[default,fid]", f"callbacks.fid.weights_path={evil}"])
    message = user_error_message(info.value)
    assert message and "\n" not in message and str(evil) in message and "refused to unpickle" in message
    assert not marker.exists() and _no_training(run)


def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # and no way to download them, even if online
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    return []


def _not_weights(tmp_path, monkeypatch):
    (tmp_path / "notes.pth").write_text("not a weights file")
    return [f"callbacks.fid.weights_path={tmp_path / 'notes.pth'}"]


def _other_tensors(tmp_path, monkeypatch):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    return [f"callbacks.fid.weights_path={tmp_path / 'other.pth'}"]


def _unreadable(tmp_path, monkeypatch):
    from pathlib import Path

    locked = tmp_path / "locked.pth"
    locked.write_bytes(b"")
    read_bytes = Path.read_bytes

    def denied(self):  # as for a file without read permission (the tests may run as root, which reads anything)
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    return [f"callbacks.fid.weights_path={locked}"]


def _missing(tmp_path, monkeypatch):
    return [f"callbacks.fid.weights_path={tmp_path / 'missing.pth'}"]


def _no_torch_fidelity(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)  # import fails
    return []


@pytest.mark.parametrize(
    ("setup", "error", "words"),
    [
        (_offline, OSError, ["cannot download", "callbacks.fid.weights_path"]),
        (_not_weights, ValueError, ["notes.pth", "not a plain file of tensors"]),
        (_other_tensors, ValueError, ["other.pth", "not the FID Inception-v3 weights"]),
        (_unreadable, OSError, ["locked.pth", "cannot be read"]),
        (_missing, FileNotFoundError, ["missing.pth", "does not exist"]),
        (_no_torch_fidelity, ImportError, ["pip install"]),
    ],
)
def test_a_fid_that_cannot_run_stops_the_run_before_training(tmp_path, monkeypatch, setup, error, words):
    overrides = setup(tmp_path, monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(Exception) as info:
        run_train(run, ["callbacks=[default,fid]", *overrides])
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__
    found = next((e for e in chain if isinstance(e, error)), None)
    assert found is not None, chain
    message = " ".join(str(found).split())
    assert all(w in message for w in words), message
    if error is not ImportError:
        assert user_error_message(info.value) == message  # train.py prints it as one line
    assert _no_training(run)


def test_bench_fid_on_npz_and_folder(tmp_path, capsys):
    import importlib.util

    import numpy as np

    from tests.conftest import ROOT, write_image

    spec = importlib.util.spec_from_file_location("bench_fid", ROOT / "bench" / "fid.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x, _ = DigitsDataModule(image_size=16).load()
    digits = ((x[:300] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()  # NHWC uint8
    np.savez(tmp_path / "digits.npz", images=digits)
    np.savez(tmp_path / "noise.npz", np.random.default_rng(0).integers(0, 256, (300, 16, 16, 1), dtype=np.uint8))
    common = ["--features", "random", "--cache-dir", str(tmp_path / "cache"), "--kid-subset-size", "100"]
    close = bench.main([str(tmp_path / "digits.npz"), "digits", "--num-real", "600", *common])
    far = bench.main([str(tmp_path / "noise.npz"), "digits", "--num-real", "600", *common])
    assert close["num_samples"] == 300 and close["num_real"] == 600
    assert close["fid"] < 0.1 * far["fid"] and close["reference_cache"] == far["reference_cache"]
    for i in range(4):
        write_image(tmp_path / "folder" / f"{i}.png", (20, 20), "RGB", seed=i)
    folder = bench.main([str(tmp_path / "folder"), str(tmp_path / "folder"), "--image-size", "16", *common])
    assert folder["fid"] == pytest.approx(0.0, abs=1e-6) and folder["num_samples"] == 4
    assert '"fid"' in capsys.readouterr().out
