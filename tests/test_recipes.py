"""Every recipe runs, not only composes: each `experiment=` option, each `trainer=` option and each README command
marked `# needs: dataset` trains a few optimizer steps here, on data fabricated in the dataset's real on-disk
format (tests/fabricate.py: CIFAR-10's Python 2 pickles, MNIST's idx files, torchvision's CelebA folder).

Only the model is shrunk (width and depth; the recipe's levels, attention resolutions and dropout stay), and the
step counts, intervals and sample counts. Everything else is the recipe's own: precision, optimizer (fused),
gradient clipping, channels_last, compile, EMA, callbacks. FID runs with a small random feature extractor in
place of Inception-v3, whose weights cannot be downloaded here. A recipe that asks for a GPU trains on the CPU
(`trainer.accelerator=cpu trainer.devices=1`, same precision) where there is none; trainer options that need
CUDA are marked `gpu` and skip without one. `test_runs_change_only_what_they_shrink` keeps that honest.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoint import read_checkpoint
from tests import fabricate
from tests.conftest import CONF, TINY, compose_train, run_cli, run_train
from tests.test_readme import bash_commands, split_parts

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
STEPS = 4  # the checkpoint interval divides it, so last.ckpt is written at the end
# The model, narrower and shallower: the recipe's channel_mult, attention_resolutions and dropout are kept.
SHRINK = ["model.base_channels=8", "model.num_res_blocks=1", "model.attention_head_dim=8", "model.norm_groups=4"]
SHORT = [
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "sampler.steps=4",
    "callbacks.sample_grid.num_images=4",
    "callbacks.sample_grid.nrow=2",
    "callbacks.sample_grid.every_n_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]
FID = [
    "callbacks.fid.feature_extractor={_target_:diffusion.callbacks.fid.RandomFeatures,_partial_:true,num_features:8}",
    "callbacks.fid.num_samples=4",
    "callbacks.fid.num_real=8",
    "callbacks.fid.every_n_steps=2",
    "callbacks.fid.batch_size=4",
    "callbacks.fid.kid_subset_size=2",
    "callbacks.fid.kid_subsets=2",
]
ON_CPU = ["trainer.accelerator=cpu", "trainer.devices=1"]
# Keys a run may change against the recipe: what SHRINK, SHORT, FID and ON_CPU set, and where the data lives.
MAY_CHANGE = {*(o.split("=", 1)[0] for o in SHRINK + SHORT + FID + ON_CPU), "data.root", "data.path", "init_from"}
# Recipes that follow a paper's constant EMA decay (DDPM's TF code; DDIM's CelebA config, ema_rate 0.9999).
PAPER_EMA = {"cifar10_ddpm": 0.9999, "celeba64": 0.9999}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def trainer_param(name: str):
    """pytest.param of a trainer option; marked `gpu` (and skipped without CUDA) when it asks for a GPU."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        accelerator = compose("train", overrides=[f"trainer={name}"]).trainer.accelerator
    return pytest.param(name, marks=[pytest.mark.gpu, cuda]) if accelerator in ("gpu", "cuda") else name


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    """One folder as `data.root` for CIFAR-10 and MNIST, with torchvision's CelebA root `celeba/` inside."""
    root = tmp_path_factory.mktemp("datasets")
    fabricate.cifar10(root, per_batch=4)  # 20 train, 4 test images
    fabricate.mnist(root, train=16, test=4)
    fabricate.celeba(root, train=12, valid=4, test=2)
    return root


def data_overrides(cfg: DictConfig, root: Path) -> list[str]:
    """Point the data group the config picked at the fabricated files."""
    group = cfg.hydra.runtime.choices["data"]
    where = {"digits": [], "cifar10": [f"data.root={root}"], "mnist": [f"data.root={root}"]}
    where["celeba"] = [f"data.path={root / 'celeba'}"]
    if group not in where:
        raise AssertionError(f"data={group}: teach tests/test_recipes.py (and tests/fabricate.py) to fabricate it")
    return where[group]


def recipe_overrides(run: Path, recipe: list[str], root: Path) -> tuple[DictConfig, list[str]]:
    """The recipe as composed (untouched), and the overrides that make it a few-step CPU-sized run."""
    cfg = compose_train(run, recipe, tiny=False)
    overrides = [*recipe, *data_overrides(cfg, root), *SHRINK, *SHORT]
    if "fid" in (cfg.get("callbacks") or {}):
        overrides += FID
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        overrides += ON_CPU
    return cfg, overrides


def flat(cfg: DictConfig) -> dict[str, object]:
    """Dotted key -> value as set (interpolations unresolved) of a composed train config, Hydra's section left out."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    out: dict[str, object] = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(tree, "")
    return out


def changed_keys(recipe: DictConfig, run: DictConfig) -> set[str]:
    """Keys whose values differ, other than those in MAY_CHANGE (or below one of them)."""
    a, b = flat(recipe), flat(run)
    changed = {k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")}
    return {k for k in changed if not any(k == m or k.startswith(f"{m}.") for m in MAY_CHANGE)}


def check_run(run: Path, steps: int = STEPS) -> list[dict]:
    """The run trained `steps` optimizer steps with finite losses and wrote its checkpoints; its metric rows."""
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == steps
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if torch.is_tensor(v) and v.is_floating_point()
    )  # extra state (a tokenizer) is data
    rows = list(csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == steps and all(math.isfinite(x) and x > 0 for x in losses)
    return rows


# Stable Diffusion-class recipes need a pipeline folder: tests/test_sd.py, test_sdxl.py and test_dreambooth.py train,
# sample and export them on a tiny fabricated one, and tests/test_conventions.py runs them in the sweep over every
# experiment.
PIPELINE_RECIPES = {"sd_lora", "sd_full", "sdxl_lora", "sdxl_full", "dreambooth"}
PIPELINE_RECIPES |= {"sd3_lora", "sd3_full", "flux_lora", "flux_full"}  # trained in tests/test_sd3_flux.py


@pytest.mark.parametrize("name", sorted(set(EXPERIMENTS) - PIPELINE_RECIPES))
def test_experiment_trains(tmp_path, datasets, name):
    recipe = [f"experiment={name}"]
    run = tmp_path / "run"
    cfg, overrides = recipe_overrides(run, recipe, datasets)
    if cfg.get("init", {}).get("required"):  # fine-tuning: from a run of the same (shrunk) network
        base = tmp_path / "base"
        run_train(base, [*SHRINK, *SHORT, *data_overrides(cfg, datasets)], tiny=False)
        overrides.append(f"init_from={base}")
    run_cfg, _ = run_train(run, overrides, tiny=False)
    assert not changed_keys(cfg, run_cfg), "the run differs from the recipe in more than its size"
    rows = check_run(run)
    assert list((run / "samples").glob("step_*.png"))
    if "fid" in cfg.callbacks:
        assert [int(r["step"]) for r in rows if r.get("val/fid")] == [2, 4]  # every 2 steps (the last one is the end)
    if name in PAPER_EMA:  # the first update copies the weights, every later one averages at the paper's decay
        decays = [float(r["train/ema_decay"]) for r in rows if r.get("train/ema_decay")]
        assert decays == pytest.approx([0.0] + [PAPER_EMA[name]] * (STEPS - 1))


def test_runs_change_only_what_they_shrink(tmp_path, datasets):
    """The comparison above catches a run that is not the recipe (here: fp32 instead of bf16-mixed)."""
    cfg, overrides = recipe_overrides(tmp_path / "run", ["experiment=cifar10_ddpm"], datasets)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.optim.optimizer.fused is True
    assert not changed_keys(cfg, compose_train(tmp_path / "run", overrides, tiny=False))
    cheat = compose_train(tmp_path / "run", [*overrides, "trainer.precision=32-true"], tiny=False)
    assert changed_keys(cfg, cheat) == {"trainer.precision"}


@pytest.mark.parametrize("name", [trainer_param(name) for name in TRAINERS])
def test_trainer_option_trains(tmp_path, name):
    run = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("trainer=")] + [f"trainer={name}", f"trainer.max_steps={STEPS}"]
    if name.startswith("fsdp"):  # a sharded network cannot draw grids on rank 0 alone (the callback says so)
        overrides.append("callbacks.sample_grid=null")
    cfg = compose_train(run, overrides, tiny=False)
    if cfg.trainer.get("strategy") in (None, "auto"):
        run_train(run, overrides, tiny=False)
    else:  # DDP re-launches the command once per process: only a real command line works
        result = run_cli("train.py", *overrides, f"hydra.run.dir={run}", timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    check_run(run)


DATASET_COMMANDS = [c for c, mark in bash_commands() if mark == "dataset"]


@pytest.mark.parametrize("command", DATASET_COMMANDS)
def test_readme_dataset_command_trains(tmp_path, datasets, command):
    """The README's `# needs: dataset` commands, with /path/to/datasets made real and tiny overrides appended."""
    (argv,) = split_parts(command)
    assert argv[:2] == ["python", "train.py"], command
    args = [a.replace("/path/to/datasets", str(datasets)) for a in argv[2:]]
    run = tmp_path / "run"
    run_train(run, [*args, f"trainer.max_steps={STEPS}"])
    check_run(run)


@pytest.mark.parametrize(
    "data",
    [["data=cifar10"], ["data=mnist"], ["data=celeba"], ["data=celeba", "data.cache=false"]],
    ids=["cifar10", "mnist", "celeba-cached", "celeba-files"],
)
def test_fid_reads_a_random_subset_of_real_images(tmp_path, datasets, data):
    """FID's real statistics come from a seed-0 random subset of the split (num_real < its size), whose indices
    the datasets in memory, memory-mapped and on file must take (they are 0-d tensors: Subset passes them on)."""
    from hydra.utils import instantiate

    from diffusion.callbacks.fid import RandomFeatures, describe_dataset, load_or_compute_real_features

    cfg = compose_train(tmp_path / "run", data, tiny=False)
    dm = instantiate(compose_train(tmp_path / "run", [*data, *data_overrides(cfg, datasets)], tiny=False).data)
    dm.setup("fit")
    n = len(dm.train_set) - 3
    features, _, computed = load_or_compute_real_features(
        RandomFeatures(num_features=8, in_channels=dm.channels),
        dm.train_set,
        key=describe_dataset(dm, "train"),
        cache_dir=tmp_path / "fid",
        num_real=n,
        batch_size=4,
        device=torch.device("cpu"),
        num_workers=dm.num_workers,
    )
    assert computed and features.shape == (n, 8) and torch.isfinite(features).all()


def test_fabricated_cifar10_is_a_python2_pickle(tmp_path):
    """Keys and file names load as bytes with encoding="bytes" (Python 2 str), as the originals do; the pixels
    need encoding="latin1" (or "bytes"), as the originals' do."""
    import pickle

    folder = fabricate.cifar10(tmp_path, per_batch=3)
    raw = (folder / "data_batch_1").read_bytes()
    batch = pickle.loads(raw, encoding="bytes")
    assert list(batch) == [b"data", b"labels", b"batch_label", b"filenames"]
    assert batch[b"data"].dtype == "uint8" and batch[b"data"].shape == (3, 3072)
    assert isinstance(batch[b"labels"], list) and all(type(y) is int for y in batch[b"labels"])
    assert all(type(f) is bytes for f in batch[b"filenames"]) and batch[b"batch_label"] == b"training batch 1 of 5"
    assert (pickle.loads(raw, encoding="latin1")["data"] == batch[b"data"]).all()
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # Python 3's default ascii decoding fails on the pixel bytes, as on the real files
    meta = pickle.loads((folder / "batches.meta").read_bytes(), encoding="latin1")
    assert meta["label_names"][3] == "cat" and meta["num_vis"] == 3072


def test_fabricated_mnist_reads_with_torchvision(tmp_path):
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    raw = fabricate.mnist(tmp_path, train=5, test=3)
    assert (raw / "train-images-idx3-ubyte").read_bytes()[:4] == (2051).to_bytes(4, "big")
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes()[:4] == (2049).to_bytes(4, "big")
    images = read_sn3_pascalvincent_tensor(str(raw / "train-images-idx3-ubyte"))
    labels = read_sn3_pascalvincent_tensor(str(raw / "t10k-labels-idx1-ubyte"))
    assert images.shape == (5, 28, 28) and images.dtype == torch.uint8 and labels.shape == (3,)
