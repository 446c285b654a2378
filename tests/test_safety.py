"""Files are data and our writes lose nothing (issue 12, sections 1 and 2).

A checkpoint may only build registered network classes; a file holding pickled code is refused in one line;
no write follows a link we did not create; a refused run touches nothing; resuming another network says in one
line what differs; checkpoint writes are atomic in their own folder (kill -9, a full disk).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from diffusion.checkpoint import NET_PREFIX, read_checkpoint
from diffusion.errors import user_error_message
from diffusion.model import DiffusionModel
from diffusion.process.discrete import NoiseSchedule
from diffusion.unet import UNet
from tests.conftest import ROOT, compose_train, run_cli, run_train
from tests.test_sample_cli import sample_in_process

TINY_NET = dict(in_channels=1, image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(), norm_groups=4)  # fmt: skip


def save_ckpt(path: Path, network: torch.nn.Module | None = None, **description_changes) -> Path:
    """A checkpoint as train.py writes it (description + net. weights), with parts of the description replaced."""
    network = network or UNet(**TINY_NET)
    description = DiffusionModel(net=network, process=NoiseSchedule(num_steps=20)).describe()
    description.update(description_changes)
    state = {NET_PREFIX + k: v for k, v in network.state_dict().items()}
    torch.save({"diffusion": description, "state_dict": state, "global_step": 3}, path)
    return path


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    message = user_error_message(info.value)
    assert message is not None, f"not a user error: {info.value!r}"
    return message


def snapshot(folder: Path) -> dict[str, bytes]:
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


# 1.2 ----------------------------------------------------------------------------------------------------------


def test_checkpoint_naming_export_is_refused_by_sample_and_export(tmp_path):
    real = save_ckpt(tmp_path / "real.ckpt")
    written = tmp_path / "written_by_the_checkpoint"
    evil = save_ckpt(
        tmp_path / "evil.ckpt",
        net={"target": "diffusion.export.export", "config": {"ckpt": str(real), "out": str(written)}},
    )
    for script, args in (("sample.py", [f"out={tmp_path}/s", "n=1"]), ("export.py", [f"out={tmp_path}/e"])):
        result = run_cli(script, f"ckpt={evil}", *args)
        assert result.returncode == 1, result.stderr[-2000:]
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr[-2000:]
        assert "diffusion.export.export" in result.stderr and str(evil) in result.stderr
        assert not written.exists()


@pytest.mark.parametrize(
    "target",
    ["os.system", "torch.nn.Linear", "diffusion.unet.ResBlock", "diffusion.export.export", None, ["x"]],
)
def test_only_registered_network_classes_are_built(tmp_path, target):
    ckpt = save_ckpt(tmp_path / "x.ckpt", net={"target": target, "config": {"in_features": 1, "out_features": 1}})
    message = one_line_error(DiffusionModel.from_checkpoint, ckpt)
    assert "is not one of the network classes this project builds" in message and str(ckpt) in message


def test_init_from_refuses_a_crafted_checkpoint(tmp_path):
    written = tmp_path / "written"
    evil = save_ckpt(
        tmp_path / "evil.ckpt",
        net={"target": "diffusion.export.export", "config": {"ckpt": str(tmp_path), "out": str(written)}},
    )
    message = one_line_error(run_train, tmp_path / "run", [f"init_from={evil}"])
    assert "diffusion.export.export" in message and not written.exists()


@pytest.mark.parametrize(
    "change",
    [
        {"net": {"target": "diffusion.unet.UNet", "config": {**TINY_NET, "dropout": torch.zeros(1)}}},
        {"net": {"target": "diffusion.unet.UNet", "config": {**TINY_NET, 3: 1}}},
        {"net": {"target": "diffusion.unet.UNet", "config": {**TINY_NET, "bogus": 1}}},
        {"net": {"target": "diffusion.diffusers_unet.DiffusersUNet", "config": {"pretrained": "org/model"}}},
        {"process": {"kind": "linear", "device": "cuda"}},
        {"process": {"kind": torch.ones(2)}},
        {"format": 99},
    ],
)
def test_description_is_validated_data(tmp_path, change):
    ckpt = save_ckpt(tmp_path / "x.ckpt", **change)
    message = one_line_error(DiffusionModel.from_checkpoint, ckpt)
    assert str(ckpt) in message


# 1.4 ----------------------------------------------------------------------------------------------------------


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_pickled_code_is_refused_in_one_plain_line(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"diffusion": RunsCode(), "state_dict": {}}, path)
    message = one_line_error(read_checkpoint, path)
    assert message.startswith(f"{path} holds Python code or objects (it names ")
    assert "system" in message and "never loads" in message
    assert "\x1b" not in message and "weights_only" not in message and "trusted source" not in message


# 1.3 ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_bytes(b"precious bytes")
    return path


def test_sample_writes_never_follow_planted_links(tmp_path, victim):
    ckpt = save_ckpt(tmp_path / "tiny.ckpt")
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    for name in (".write_test", "grid.png", "samples.npz", "images/000000.png"):
        (out / name).symlink_to(victim)
    sample_in_process(out, f"ckpt={ckpt}", "n=2", "sampler.steps=2", "npz=true", "overwrite=true")
    assert victim.read_bytes() == b"precious bytes"
    for name in ("grid.png", "samples.npz", "images/000000.png", "images/000001.png"):
        assert (out / name).is_file() and not (out / name).is_symlink()


def test_sample_replaces_a_linked_images_folder(tmp_path, victim):
    ckpt = save_ckpt(tmp_path / "tiny.ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "000000.png").write_bytes(b"not ours")
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match="images \\(a link\\)"):
        sample_in_process(out, f"ckpt={ckpt}", "n=1", "sampler.steps=2")
    sample_in_process(out, f"ckpt={ckpt}", "n=1", "sampler.steps=2", "overwrite=true")
    assert snapshot(elsewhere) == {"000000.png": b"not ours"}
    assert (out / "images" / "000000.png").is_file() and not (out / "images").is_symlink()


@pytest.mark.parametrize("format", ["safetensors", "diffusers"])
def test_export_writes_never_follow_planted_links(tmp_path, victim, format):
    from diffusion.diffusers_unet import DiffusersUNet
    from diffusion.export import export

    net = None
    planted = ["model.safetensors", "config.json"]
    if format == "diffusers":
        unet = dict(block_out_channels=[8, 16], down_block_types=["DownBlock2D"] * 2,
                    up_block_types=["UpBlock2D"] * 2, layers_per_block=1, norm_num_groups=4)  # fmt: skip
        net = DiffusersUNet(image_size=16, in_channels=1, unet=unet)
        planted = ["model_index.json", "unet/config.json", "scheduler"]
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    for name in planted:
        (out / name).symlink_to(victim if name != "scheduler" else tmp_path)
    before = snapshot(tmp_path)
    export(save_ckpt(tmp_path / "tiny.ckpt", network=net), out, format=format, overwrite=True)
    assert victim.read_bytes() == b"precious bytes"
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(("out/", "tiny.ckpt"))} == before
    for name in planted:
        assert not (out / name).is_symlink()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


# 2.1 ----------------------------------------------------------------------------------------------------------


def test_refused_run_leaves_the_folder_byte_identical(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    save_ckpt(run / "checkpoints" / "last.ckpt")
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"# the first run's {name}\n")
    (run / "train.log").write_text("the first run's log\n")
    before = snapshot(run)
    result = run_cli("train.py", f"hydra.run.dir={run}", "model=unet_tiny", "trainer=cpu")
    assert result.returncode == 1, result.stderr[-2000:]
    assert snapshot(run) == before
    assert result.stderr.strip() == (
        f"error: run folder {run} already holds checkpoints; resume with ckpt_path={run} or choose another "
        "hydra.run.dir"
    )
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == sorted([".hydra", "checkpoints", *before])


def test_guard_works_with_the_default_run_dir(tmp_path, monkeypatch):
    """The default hydra.run.dir reaches ${hydra:runtime.cwd} (paths.runs_dir) before Hydra has set its config:
    the guard used to fail there with a UserWarning (InterpolationResolutionError) and let Hydra write .hydra/
    into a folder with checkpoints. SLURM_JOB_ID names the default folder, so it can already exist."""
    run = tmp_path / "outputs" / "train" / "4242"
    (run / "checkpoints").mkdir(parents=True)
    save_ckpt(run / "checkpoints" / "last.ckpt")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    result = run_cli("train.py", "model=unet_tiny", "trainer=cpu", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Warning" not in result.stderr and "InterpolationResolutionError" not in result.stderr
    assert result.stderr.strip().startswith(f"error: run folder {run} already holds checkpoints")
    assert not (run / ".hydra").exists()  # refused before Hydra wrote anything


# 2.2 ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "run"
    run_train(run, ["trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0"])
    return run


def test_resume_with_another_network_says_what_differs(tmp_path, tiny_run):
    message = one_line_error(run_train, tmp_path / "b", [f"ckpt_path={tiny_run}", "model.base_channels=16"])
    assert message.startswith(
        f"ckpt_path={tiny_run / 'checkpoints' / 'last.ckpt'} was trained with model.base_channels=8 where the "
        "config has 16;"
    ), message
    message = one_line_error(
        run_train, tmp_path / "c", [f"ckpt_path={tiny_run}", "model.base_channels=16", "model.num_res_blocks=2"]
    )
    assert "(and 1 more: model.num_res_blocks)" in message


def test_checkpoint_whose_description_disagrees_with_its_weights(tmp_path):
    wider = UNet(**{**TINY_NET, "base_channels": 16})
    ckpt = save_ckpt(tmp_path / "x.ckpt", network=wider)
    data = torch.load(ckpt, weights_only=True)
    data["diffusion"]["net"]["config"]["base_channels"] = 8
    torch.save(data, ckpt)
    message = one_line_error(DiffusionModel.from_checkpoint, ckpt)
    assert message.startswith(f"checkpoint {ckpt}: its weights do not match its own network description: ")
    assert "shapes differ" in message
    result = run_cli("export.py", f"ckpt={ckpt}", f"out={tmp_path}/e", "format=safetensors")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]


# 2.3 and 2.5 --------------------------------------------------------------------------------------------------


def configured_checkpoint_io(tmp_path):
    """The CheckpointIO the Trainer of the real config writes with."""
    cfg = compose_train(tmp_path / "run")
    return instantiate(cfg.trainer, logger=False).strategy.checkpoint_io


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = configured_checkpoint_io(tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, last)
    before = last.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    message = one_line_error(io.save_checkpoint, {"step": 2, "w": torch.zeros(1000)}, last)
    assert message == (
        f"could not save checkpoint {last} (No space left on device); the previous checkpoint there is intact"
    )
    assert last.read_bytes() == before
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


def size(path: Path) -> int:
    """The size of `path`, -1 if it is gone (renamed away meanwhile)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


KILL_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.conftest import compose_train
from hydra.utils import instantiate
from pathlib import Path
io = instantiate(compose_train(Path({run!r})).trainer, logger=False).strategy.checkpoint_io
for step in range(10**6):
    io.save_checkpoint({{"step": step, "w": torch.full((6_000_000,), float(step))}}, {last!r})
    print(step, flush=True)
"""


def test_kill_9_during_a_large_write_leaves_last_readable(tmp_path):
    """SIGKILL a process that rewrites a 24 MB last.ckpt in a loop, in the middle of writes; it must always load.

    Each kill lands while a write is under way in the folder: last.ckpt shorter than a whole checkpoint (an
    in-place copy), or a temporary file beside it being filled. TMPDIR is put on another filesystem
    (/dev/shm), where a writer that stages files in TMPDIR copies them into place instead of renaming them.
    """
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than tmp_path")
    last = tmp_path / "checkpoints" / "last.ckpt"
    script = KILL_SCRIPT.format(root=str(ROOT), run=str(tmp_path / "run"), last=str(last))
    env = {**os.environ, "TMPDIR": "/dev/shm", "OMP_NUM_THREADS": "1"}
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline(), "the writer did not save once"
        full = last.stat().st_size
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait for a write in progress
            sizes = [size(p) for p in last.parent.iterdir()]  # last.ckpt and any temporary file
            if size(last) < full or any(0 < n < full for n in sizes):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["w"].shape == (6_000_000,) and bool((ckpt["w"] == ckpt["step"]).all())


class _Payload:
    """Pickled, it runs `touch <marker>` when loaded with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["data", "nested"])
def test_a_run_folders_config_names_no_callable(tmp_path, where):
    """export.py's post-hoc EMA sweep builds the run's validation data from <run>/.hydra/config.yaml: a run folder
    someone sent is data, so a `_target_` there other than one of our datamodules (or any nested one) is refused
    before anything is built, and a pickle it names never runs."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_ckpt(run / "checkpoints" / "last.ckpt")
    marker, evil = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save(_Payload(marker), evil)
    load = {"_target_": "torch.load", "f": str(evil), "weights_only": False}
    cfg = OmegaConf.to_container(compose_train(run, ["callbacks=[default,posthoc_ema]"]), resolve=True)
    cfg.pop("hydra")
    cfg["data"] = load if where == "data" else {**cfg["data"], "image_size": load}
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    result = run_cli("export.py", f"ckpt={run}", f"out={tmp_path / 'out'}", "format=ckpt", "ema.sigma_rel=[0.05,0.08]")
    assert not marker.exists(), "the pickle named by the run folder's config ran"
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "config.yaml" in result.stderr and "refused" in result.stderr
    assert not (tmp_path / "out").exists()


# issue 24, smaller ones: crafted weights-only checkpoints ------------------------------------------------------


def _text_ckpt(path: Path, encoder_config: dict) -> Path:
    """A text-conditional checkpoint whose text encoder config is replaced by `encoder_config`."""
    from diffusion.conditioning import TextConditioning
    from diffusion.text_encoders import TransformerTextEncoder

    encoder = TransformerTextEncoder(dim=16, depth=1, heads=2, max_length=8, vocab_size=64)
    encoder.fit(["a seven", "a one"])
    model = DiffusionModel(
        net=UNet(**TINY_NET, context_dim=16),
        process=NoiseSchedule(num_steps=20),
        conditioning=TextConditioning(encoder=encoder),
    )
    description = model.describe()
    description["conditioning"]["config"]["encoder"]["config"] = encoder_config
    state = {"model." + k: v for k, v in model.state_dict().items() if not k.startswith("codec.")}
    torch.save({"diffusion": description, "state_dict": state, "global_step": 3}, path)
    return path


def _profiles(**changes) -> dict:
    profile = UNet(**TINY_NET).state_dict()
    return {
        "posthoc_ema": {"format": 1, "sigma_rels": [0.05, 0.1], "step": 3, "profiles": [profile, profile], **changes}
    }


CRAFTED = {
    "negative size": {"net": {"target": "diffusion.unet.UNet", "config": {**TINY_NET, "base_channels": -8}}},
    "negative image size": {"net": {"target": "diffusion.unet.UNet", "config": {**TINY_NET, "image_size": -16}}},
    "global_step not an int": {"global_step": "abc"},
    "state_dict with int keys": {"state_dict": {3: torch.zeros(1)}},
    "ema_state_dict not a dict": {"ema_state_dict": [1, 2]},
    "unknown text encoder key": {"text": {"dim": 16, "heads": 2, "bogus": 1}},
    "profiles and sigma_rels differ": _profiles(sigma_rels=[0.05]),
    "profile sigma_rel not a number": _profiles(sigma_rels=["x", 0.1]),
    "profiles not dicts": _profiles(profiles=[1, 2]),
}


def crafted_ckpt(path: Path, case: str) -> Path:
    change = dict(CRAFTED[case])
    if "text" in change:
        return _text_ckpt(path, change["text"])
    description = {k: change.pop(k) for k in ("net",) if k in change}
    save_ckpt(path, **description)
    data = torch.load(path, weights_only=True)
    data.update(change)
    torch.save(data, path)
    return path


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_weights_only_checkpoints_are_one_line(tmp_path, case):
    """Each crafted checkpoint is one BadFileError line naming the file, for sample.py and export.py (post-hoc EMA
    asked for, so that the profiles are read too), never a traceback."""
    from diffusion.errors import BadFileError
    from diffusion.export import export

    ckpt = crafted_ckpt(tmp_path / "crafted.ckpt", case)
    (tmp_path / "snaps").mkdir()
    ema = ["ema.sigma_rel=0.08", f"ema.snapshots={tmp_path / 'snaps'}"]
    for attempt in (
        lambda: sample_in_process(tmp_path / "s", f"ckpt={ckpt}", "n=1", "sampler.steps=2", *ema),
        lambda: export(ckpt, tmp_path / "e", format="safetensors", sigma_rel=0.08, snapshots=tmp_path / "snaps"),
    ):
        with pytest.raises(BadFileError) as info:
            attempt()
        message = user_error_message(info.value)
        assert str(ckpt) in message and "\n" not in message, message


def test_crafted_checkpoint_is_one_line_from_the_command_line(tmp_path):
    ckpt = crafted_ckpt(tmp_path / "crafted.ckpt", "unknown text encoder key")
    for script, args in (("sample.py", [f"out={tmp_path}/s", "n=1"]), ("export.py", [f"out={tmp_path}/e"])):
        result = run_cli(script, f"ckpt={ckpt}", *args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
        assert result.stderr.startswith(f"error: checkpoint {ckpt}: text encoder ") and "bogus" in result.stderr


def test_advice_names_only_checkpoints_that_exist(tmp_path):
    """A run killed (kill -9) after step_000002.ckpt but before its first last.ckpt: the refusal of a new run in
    its folder names that checkpoint, not the folder (whose last.ckpt does not exist); a run that diverges before
    any save says so instead of advising a resume."""
    from diffusion.guard import NonFiniteLossError

    run = tmp_path / "run"
    run_train(run, ["trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0"])
    (run / "checkpoints" / "last.ckpt").unlink()  # killed between the step checkpoint and last.ckpt
    step = run / "checkpoints" / "step_000002.ckpt"
    message = one_line_error(run_train, run, [])
    assert f"resume with ckpt_path={step} or" in message, message
    run_train(
        tmp_path / "resumed", [f"ckpt_path={step}", "trainer.max_steps=3", "callbacks.sample_grid.every_n_steps=0"]
    )

    from tests.test_scale import _poison

    diverged = tmp_path / "diverged"  # the first step is not finite (what optim.lr=1e8 does to a real run)
    with pytest.raises(NonFiniteLossError) as info:
        run_train(diverged, [*_poison(diverged, at_step=0), "callbacks.sample_grid.every_n_steps=0"])
    message = user_error_message(info.value)
    assert not list(diverged.rglob("*.ckpt"))
    assert message.startswith(
        "non-finite loss at step 1; stopped before updating the weights. No checkpoint was saved before it: start "
        "again with a lower optim.lr"
    ), message
    assert "Resume" not in message and "ckpt_path" not in message, message
    with pytest.raises(NonFiniteLossError) as info:  # after a save: that checkpoint, by its path
        run_train(
            tmp_path / "later", [*_poison(tmp_path / "later", at_step=2), "callbacks.sample_grid.every_n_steps=0"]
        )
    assert f"Resume with ckpt_path={tmp_path / 'later' / 'checkpoints'}" in user_error_message(info.value)
