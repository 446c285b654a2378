"""sample.py end to end on checkpoints written by tiny train.py runs: files, sizes, seeds, labels, bad input."""

from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from diffusion.errors import user_error_message
from tests.conftest import CONF, ROOT, run_cli, run_train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uncond") / "run"
    run_train(run, ["callbacks.sample_grid.every_n_steps=0"])
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cond") / "run"
    run_train(
        run,
        [
            "model.num_classes=10",
            "conditioning.guidance=2.5",  # the run's recommended guidance: sample.py's default for this checkpoint
            "trainer.max_steps=2",
            "callbacks.sample_grid.every_n_steps=0",
        ],
    )
    return run / "checkpoints" / "last.ckpt"


def sample_in_process(out: Path, *overrides: str):
    """sample.sample on the real conf/sample.yaml, composed as `python sample.py <overrides>` would be."""
    import sample

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("sample", overrides=["progress=false", f"out={out}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(ROOT)
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig().set_config(cfg)
    return sample.sample(cfg)


def read_images(out: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))])


def test_cli_writes_files_and_reproduces_seeds(tmp_path, ckpt):
    # stochastic DDIM (eta=1): fresh noise every step must also come from each image's own seed
    common = [f"ckpt={ckpt}", "sampler=ddim", "sampler.steps=3", "sampler.eta=1.0", "seed=5", "progress=false"]
    a = run_cli("sample.py", *common, "n=8", "batch_size=3", "npz=true", f"out={tmp_path}/a")
    assert a.returncode == 0, a.stderr[-3000:]
    assert f"to {tmp_path}/a" in a.stdout
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert names == [f"{k:06d}.png" for k in range(8)]
    images = read_images(tmp_path / "a")
    assert images.shape == (8, 16, 16) and images.dtype == np.uint8 and images.std() > 0
    with Image.open(tmp_path / "a" / "grid.png") as grid:
        assert grid.size == (3 * 66 + 2, 3 * 66 + 2)  # 8 images, 3 per row, 16 px enlarged 4x, 2-pixel padding
    npz = np.load(tmp_path / "a" / "samples.npz")
    assert npz["arr_0"].shape == (8, 16, 16, 1) and np.array_equal(npz["arr_0"][..., 0], images)
    assert not (tmp_path / "a" / ".hydra").exists()

    # n=4 with another batch size reproduces the first 4 exactly (in-process: no second interpreter start-up)
    sample_in_process(tmp_path / "b", *common[:-1], "n=4", "batch_size=4")
    assert np.array_equal(read_images(tmp_path / "b"), images[:4])
    sample_in_process(tmp_path / "c", *common[:-1], "seed=6", "n=4", "batch_size=4")
    assert np.array_equal(read_images(tmp_path / "c")[:3], images[1:4])  # image i is seed + i


def test_never_overwrites_without_asking(tmp_path, ckpt):
    args = [f"ckpt={ckpt}", "sampler.steps=2", "n=2"]
    sample_in_process(tmp_path, *args, "seed=0")
    before = (tmp_path / "images" / "000000.png").read_bytes()
    with pytest.raises(FileExistsError, match="pass overwrite=true"):
        sample_in_process(tmp_path, *args, "seed=1")
    assert (tmp_path / "images" / "000000.png").read_bytes() == before
    sample_in_process(tmp_path, *args, "seed=1", "n=1", "overwrite=true")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000000.png"]  # no stale images left
    assert (tmp_path / "images" / "000000.png").read_bytes() != before


def test_conditional_labels_and_guidance(tmp_path, cond_ckpt):
    sample_in_process(
        tmp_path / "rows", f"ckpt={cond_ckpt}", "sampler.steps=2", "n=3", "label=[1,2]", "guidance=3.0", "npz=true"
    )
    npz = np.load(tmp_path / "rows" / "samples.npz")
    assert npz["arr_0"].shape == (6, 16, 16, 1) and npz["arr_1"].tolist() == [1, 1, 1, 2, 2, 2]
    with Image.open(tmp_path / "rows" / "grid.png") as grid:
        assert grid.size == (3 * 66 + 2, 2 * 66 + 2)  # one row per label
    sample_in_process(tmp_path / "all", f"ckpt={cond_ckpt}", "sampler.steps=2", "n=1", "label=all")
    assert len(list((tmp_path / "all" / "images").iterdir())) == 10
    with pytest.raises(ValueError, match="label=10 is out of range: the model has classes 0..9"):
        sample_in_process(tmp_path / "bad", f"ckpt={cond_ckpt}", "label=10")
    with pytest.raises(ValueError, match="guidance=2.0 needs a label"):
        sample_in_process(tmp_path / "bad", f"ckpt={cond_ckpt}", "guidance=2.0")


def test_recommended_guidance_travels_with_the_checkpoint(tmp_path, cond_ckpt, monkeypatch):
    """conditioning.guidance is saved in the checkpoint's description; sample.py's guidance=null and the sample
    grids (and FID, through the same generate) sample with it; an explicit guidance= still wins."""
    from diffusion.callbacks.sample_grid import generate
    from diffusion.checkpoint import read_checkpoint
    from diffusion.model import DiffusionModel
    from diffusion.samplers import ddim_sample

    assert read_checkpoint(cond_ckpt)["diffusion"]["conditioning"]["config"]["guidance"] == 2.5
    model = DiffusionModel.from_checkpoint(cond_ckpt)
    assert model.conditioning.guidance == 2.5
    used = []
    real_generate = DiffusionModel.generate

    def recording(self, *args, guidance=1.0, **kwargs):
        used.append(guidance)
        return real_generate(self, *args, guidance=guidance, **kwargs)

    monkeypatch.setattr(DiffusionModel, "generate", recording)
    args = [f"ckpt={cond_ckpt}", "sampler=ddim", "sampler.steps=2", "n=2", "label=3"]
    sample_in_process(tmp_path / "default", *args)
    sample_in_process(tmp_path / "plain", *args, "guidance=1.0")
    generate(model, partial(ddim_sample, steps=2), range(3), seed=0)  # the sample grid's and FID's
    assert used == [2.5, 1.0, 2.5]


def test_checkpoints_without_a_recommended_guidance_default_to_one():
    from diffusion.conditioning import build_conditioning

    old = {"target": "diffusion.conditioning.ClassConditioning", "config": {"num_classes": 10}}  # before the key
    assert build_conditioning(old).guidance == 1.0
    with pytest.raises(ValueError, match="conditioning.guidance=-1 must be a number >= 0"):
        build_conditioning({**old, "config": {"num_classes": 10, "guidance": -1}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ckpt={tmp}/nope.ckpt"], "nope.ckpt does not exist"),
        (["ckpt={tmp}/not_a_ckpt.ckpt"], "not_a_ckpt.ckpt is not a readable checkpoint"),
        (["ckpt={ckpt}", "n=0"], "n=0 must be >= 1"),
        (["ckpt={ckpt}", "sampler.steps=0"], "sampler.steps=0 must be in [1, 50]"),
        (["ckpt={ckpt}", "sampler.steps=51"], "sampler.steps=51 must be in [1, 50]"),
        (["ckpt={ckpt}", "out={tmp}/file.txt"], "file.txt cannot be written"),
        (["ckpt={ckpt}", "label=3"], "model is unconditional"),
        (["ckpt={ckpt}", "guidance=2.0"], "needs a class-conditional model"),
        (["ckpt={ckpt}", "device=tpu9"], "device='tpu9' is not a torch device"),
        ([], "ckpt=PATH is required"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, ckpt, overrides, message):
    (tmp_path / "not_a_ckpt.ckpt").write_text("hello")
    (tmp_path / "file.txt").write_text("a file, not a folder")
    overrides = [o.format(tmp=tmp_path, ckpt=ckpt) for o in overrides]
    with pytest.raises(Exception) as info:
        sample_in_process(tmp_path / "out", *overrides)
    assert message in (user_error_message(info.value) or "")
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_exits_with_one_line(tmp_path):
    result = run_cli("sample.py", f"ckpt={tmp_path}/nope.ckpt", f"out={tmp_path}/out")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path}/nope.ckpt does not exist"]


def test_prompts_file_that_is_not_utf8_is_one_line(tmp_path):
    """A prompts= file in another encoding (Latin-1 here) is one line naming the file and the problem, not a
    UnicodeDecodeError traceback; a UTF-8 BOM is not part of the first prompt."""
    from sample import parse_prompts

    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("un caf\xe9\nune cr\xeape\n".encode("latin-1"))
    with pytest.raises(Exception) as info:
        parse_prompts(None, str(latin1))
    assert user_error_message(info.value) == (
        f"prompts={latin1} is not UTF-8 text (byte 0xe9 at offset 6); save it as UTF-8"
    )
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa seven\na one\n".encode())
    assert parse_prompts(None, str(bom)) == ["a seven", "a one"]


def test_nan_weights_draw_black_images_and_say_so(tmp_path, ckpt, caplog):
    """A diverged run's checkpoint (NaN weights) draws black images: they are written, with one warning line."""
    import torch

    broken = torch.load(ckpt, weights_only=True)
    broken["ema_state_dict"] = {k: torch.full_like(v, float("nan")) for k, v in broken["ema_state_dict"].items()}
    torch.save(broken, tmp_path / "nan.ckpt")
    caplog.set_level("WARNING")
    sample_in_process(tmp_path / "out", f"ckpt={tmp_path / 'nan.ckpt'}", "n=2", "sampler.steps=2")
    assert "2 of 2 images are not finite and are written black: the checkpoint's ema weights hold NaN or inf" in (
        caplog.text
    )
    assert read_images(tmp_path / "out").max() == 0
