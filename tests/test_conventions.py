"""The Lightning-Hydra-Template habits: debug= options, tags, extras, conf/local, validate_only, and sweeps.

Two real `python train.py -m` sweeps run every `experiment=` option and every `debug=` option to the end, one job
each, in one process per sweep (the template's sweep tests). The options are listed from conf/ when the test runs,
so a new experiment or debug option is covered without editing this file. An option that needs more than the
shared tiny overrides gets them from EXPERIMENT_EXTRAS / DEBUG_EXTRAS: each job selects its option through a
small config generated here (`+job=<name>`: the option, then its extra values), found through --config-dir.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from diffusion.checkpoint import read_checkpoint
from diffusion.errors import ConfigError, UserError, user_error_message
from diffusion.extras import config_tree, run_tags
from tests import fabricate
from tests.conftest import CONF, ROOT, compose_train, run_cli, run_train, write_image
from tests.pipelines import save_tiny_flux, save_tiny_sd, save_tiny_sd3, save_tiny_sdxl
from tests.test_loggers import read_wandb_records
from tests.test_recipes import FID, SHRINK, check_run

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (CONF / "debug").glob("*.yaml") if p.stem != "default")  # default: their base

# Values (key=value) an option's job adds to the shared overrides; an option without an entry gets DEFAULT_EXTRAS.
# "{base}" is a tiny trained run folder of the shrunk unet_small (for init_from), "{data}" the fabricated datasets.
DEFAULT_EXTRAS = SHRINK  # the U-Net narrower and shallower; a recipe with another network lists its own shrink
# Stable Diffusion-class experiments: a tiny pipeline folder (tests/pipelines.py) and a captioned image folder
SD_EXTRAS = ["model.pretrained={sd}", "data.path={captioned}", "data.image_size=16", "data.val_fraction=0.25"]
EXPERIMENT_EXTRAS: dict[str, list[str]] = {
    "finetune": [*SHRINK, "init_from={base}"],
    "sd_lora": SD_EXTRAS,
    "sd_full": SD_EXTRAS,
    "dreambooth": [
        *SD_EXTRAS,
        "dreambooth.instance_prompt=a photo of sks digit",
        "dreambooth.class_prompt=a photo of a digit",
        "dreambooth.num_class_images=2",
    ],
    "sdxl_lora": [*SD_EXTRAS, "model.pretrained={sdxl}"],
    "sdxl_full": [*SD_EXTRAS, "model.pretrained={sdxl}"],
}
# SD3 / Flux: tiny pipeline folders of their own, T5 cut to 16 tokens
FLOW_EXTRAS = [
    "data.path={captioned}",
    "data.image_size=16",
    "data.val_fraction=0.25",
    "conditioning.encoder.max_length=16",
]
EXPERIMENT_EXTRAS.update({f"{kind}_{ft}": [f"model.pretrained={{{kind}}}", *FLOW_EXTRAS]
                          for kind in ("sd3", "flux") for ft in ("lora", "full")})  # fmt: skip
DEBUG_EXTRAS: dict[str, list[str]] = {
    "overfit": ["trainer.max_steps=40", "trainer.val_check_interval=20", "callbacks.sample_grid.every_n_steps=20"],
}
STEPS = 2  # of every experiment job
SHARED = [  # every job of both sweeps
    "trainer.accelerator=cpu",  # recipes that ask for a GPU train on the CPU here, in their own precision
    "trainer.devices=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "data.num_workers=0",
    "sampler.steps=2",
    "callbacks.sample_grid.num_images=4",
    "callbacks.sample_grid.nrow=2",
    "logger=csv",
]
EXPERIMENT_SHARED = [
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=2",
    "data.batch_size=8",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.sample_grid.every_n_steps=2",
    # FID's sizes and feature extractor, added (++) for jobs whose experiment has no callbacks.fid: there they
    # build nothing (an entry without a _target_)
    *(f"++{o}" for o in FID),
]
# Debug jobs keep their own step counts and FID sizes (debug/default.yaml shrinks FID); only the network is tiny.
DEBUG_SHARED = [
    "model=unet_tiny",
    "process=cosine",
    "process.num_steps=50",
    "data.batch_size=8",
    "callbacks=[default,fid]",
    FID[0],  # the random feature extractor: no Inception download
]


def sweep(tmp_path: Path, group: str, names: list[str], extras: dict, default: list[str], shared: list[str]):
    """`python train.py -m +job=<names> <shared>` from tmp_path: one job per option; {job name: its folder}."""
    conf = tmp_path / "wrappers"
    for name in names:
        places = dict(
            base=tmp_path / "base",
            data=tmp_path / "data",
            sd=tmp_path / "sd",
            sdxl=tmp_path / "sdxl",
            captioned=tmp_path / "captioned",
        )
        places.update(sd3=tmp_path / "sd3", flux=tmp_path / "flux")
        values = [v.format(**places) for v in extras.get(name, default)]
        body = OmegaConf.to_container(OmegaConf.from_dotlist(values)) if values else {}
        text = f"# @package _global_\ndefaults:\n  - override /{group}: {name}\n  - _self_\n"
        (conf / "job").mkdir(parents=True, exist_ok=True)
        (conf / "job" / f"{name}.yaml").write_text(text + (yaml.safe_dump(body) if body else ""))
    result = run_cli(
        "train.py",
        "--config-dir",
        str(conf),
        "-m",
        f"+job={','.join(names)}",
        *shared,
        f"paths.data_dir={tmp_path / 'data'}",
        f"++callbacks.fid.cache_dir={tmp_path / 'fid'}",
        "hydra.sweep.dir=" + str(tmp_path / "sweep"),
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = {}
    for overrides in (tmp_path / "sweep").glob("*/.hydra/overrides.yaml"):
        (job,) = [o.split("=", 1)[1] for o in OmegaConf.load(overrides) if o.startswith("+job=")]
        jobs[job] = overrides.parent.parent
    assert sorted(jobs) == sorted(names), result.stdout[-3000:]
    failed = {
        name: (run / train.FAILED_FILE).read_text() for name, run in jobs.items() if (run / train.FAILED_FILE).exists()
    }
    assert not failed, failed
    return jobs


@pytest.mark.slow
def test_every_experiment_runs_in_one_sweep(tmp_path):
    data = tmp_path / "data"
    fabricate.cifar10(data, per_batch=4)
    fabricate.mnist(data, train=16, test=4)
    fabricate.celeba(data, train=12, valid=4, test=2)
    save_tiny_sd(tmp_path / "sd")
    save_tiny_sdxl(tmp_path / "sdxl")
    save_tiny_sd3(tmp_path / "sd3")
    save_tiny_flux(tmp_path / "flux")
    for i in range(16):
        write_image(tmp_path / "captioned" / f"{i}.png", (20, 20), seed=i)
    (tmp_path / "captioned" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": f"a photo number {i % 3}"}) + "\n" for i in range(16))
    )
    base = [*SHRINK, "trainer=cpu", "trainer.max_steps=1", "callbacks=[model_checkpoint]", "logger=none"]
    run_train(tmp_path / "base", base, tiny=False)
    jobs = sweep(tmp_path, "experiment", EXPERIMENTS, EXPERIMENT_EXTRAS, DEFAULT_EXTRAS, SHARED + EXPERIMENT_SHARED)
    for name, run in jobs.items():
        config = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.choices
        assert config.experiment == name
        check_run(run, steps=STEPS)
        assert (run / "config_tree.log").is_file()


@pytest.mark.slow
def test_every_debug_option_runs_in_one_sweep(tmp_path):
    jobs = sweep(tmp_path, "debug", DEBUGS, DEBUG_EXTRAS, [], SHARED + DEBUG_SHARED)
    for run in jobs.values():
        assert (run / "config_tree.log").is_file() and (run / "train.log").is_file()
    # fdr: one batch each way; nothing written but the config, the log and one grid: no checkpoint, no logger
    # files, no FID; Lightning's hook calls at DEBUG level
    fdr = jobs["fdr"]
    assert sorted(p.name for p in fdr.iterdir() if p.name != ".hydra") == ["config_tree.log", "samples", "train.log"]
    assert [p.name for p in (fdr / "samples").iterdir()] == ["step_000001.png"]
    log = (fdr / "train.log").read_text()
    assert "val/fid" not in log and "calling callback hook: on_train_batch_end" in log
    # overfit: the same 2 batches for all its steps; the loss falls
    overfit = jobs["overfit"]
    assert read_checkpoint(overfit / "checkpoints" / "last.ckpt")["global_step"] == 40
    losses = [float(r["train/loss"]) for r in metrics(overfit) if r.get("train/loss")]
    assert sum(losses[-5:]) < sum(losses[:5])
    # limit: 3 epochs of 4 batches, validation after each, every periodic callback once an epoch, FID at the end
    limit = jobs["limit"]
    assert read_checkpoint(limit / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert sorted(p.name for p in (limit / "checkpoints").glob("step_*")) == [f"step_{s:06d}.ckpt" for s in (4, 8, 12)]
    assert sorted(p.name for p in (limit / "samples").iterdir()) == [f"step_{s:06d}.png" for s in (4, 8, 12)]
    rows = metrics(limit)
    assert len([r for r in rows if r.get("val/loss")]) == 3
    assert [float(r["val/fid_num_samples"]) for r in rows if r.get("val/fid")] == [64.0]  # debug's FID size
    # profiler: 50 steps, the report in the run folder
    profiler = jobs["profiler"]
    assert read_checkpoint(profiler / "checkpoints" / "last.ckpt")["global_step"] == 50
    assert "run_training_batch" in (profiler / "fit-profile.txt").read_text()


@pytest.mark.parametrize("name", DEBUGS)
def test_debug_runs_have_their_own_folder(name):
    """Under <runs_dir>/debug/<task_name>/, runs and sweeps alike (the sweep test above gives its own folder)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"debug={name}", "experiment=digits_cond"], return_hydra_config=True)
    folders = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert folders["run"]["dir"].startswith("${paths.runs_dir}/debug/${task_name}/")
    assert folders["sweep"]["dir"].startswith("${paths.runs_dir}/debug/${task_name}/multirun_")
    assert cfg.task_name == "digits_cond"


def metrics(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")))


def test_config_tree_reads_like_the_config():
    tree = {"seed": 0, "trainer": {"max_steps": 4, "plugins": [{"_target_": "a.B"}]}, "tags": ["x", "y"], "e": {}}
    assert config_tree(tree).splitlines() == [
        "config",
        "|-- seed: 0",
        "|-- trainer",
        "|   |-- max_steps: 4",
        "|   `-- plugins: [{_target_: a.B}]",
        "|-- tags: [x, y]",
        "`-- e: {}",
    ]


def test_run_tags():
    assert run_tags(["a", "b", "a", " c "]) == ["a", "b", "c"] and run_tags("solo") == ["solo"] and run_tags(None) == []
    for bad in (["a,b"], [""], ["x" * 65], [{"k": 1}]):
        with pytest.raises(ConfigError, match="tags"):
            run_tags(bad)


@pytest.mark.slow
def test_tags_reach_every_logger_and_the_run_folder(tmp_path, monkeypatch, caplog):
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    caplog.set_level("INFO")
    run = tmp_path / "run"
    cfg = compose_train(run, ["logger=many_loggers", "trainer.max_steps=2", "tags=[baseline,cosine]"])
    try:
        train.run_job(cfg)
    finally:
        wandb.finish()
    assert (run / "tags.log").read_text() == "baseline\ncosine\n"
    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    runs = [r.run for r in read_wandb_records(wandb_file) if r.WhichOneof("record_type") == "run"]
    assert list(runs[0].tags) == ["baseline", "cosine"]
    for hparams in (run / "csv" / "version_0" / "hparams.yaml", run / "tensorboard" / "hparams.yaml"):
        assert yaml.safe_load(hparams.read_text())["tags"] == ["baseline", "cosine"], hparams
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert "tags/text_summary" in acc.Tags()["tensors"]
    # extras: the config tree, in the log and in the run folder
    tree = (run / "config_tree.log").read_text()
    assert "|   |-- max_steps: 2" in tree and "|-- tags: [baseline, cosine]" in tree
    assert any(m.startswith(f"config ({run / 'config_tree.log'})") for m in caplog.messages)


def test_enforce_tags_refuses_a_run_without_tags(tmp_path):
    cfg = compose_train(tmp_path / "run", ["extras.enforce_tags=true"])
    with pytest.raises(ConfigError, match=r"extras.enforce_tags=true: give the run tags, e.g. tags=\[baseline"):
        train.run_job(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything is written
    cfg = compose_train(tmp_path / "run", ["extras.enforce_tags=true", "tags=[a]", "extras.print_config=false"])
    train.extras(cfg)
    assert (tmp_path / "run" / "tags.log").read_text() == "a\n" and not (tmp_path / "run" / "config_tree.log").exists()


@pytest.mark.slow
def test_enforce_tags_stops_a_whole_sweep(tmp_path):
    result = run_cli("train.py", "-m", "seed=0,1", "extras.enforce_tags=true", cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: extras.enforce_tags=true: give the run tags, e.g. tags=[baseline,cosine]"]
    assert not list(tmp_path.rglob("checkpoints"))
    # the sweep found its default folder (outputs/train/multirun_<date>), which needs HydraConfig before any job
    assert [p.name for p in tmp_path.glob("outputs/train/multirun_*/*") if p.is_dir()] == ["0"]


@pytest.mark.parametrize("ignore", [False, True])
def test_ignore_warnings(tmp_path, ignore):
    import warnings

    train.extras(compose_train(tmp_path / "run", [f"extras.ignore_warnings={ignore}", "extras.print_config=false"]))
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters extras left (pytest restores them)
        warnings.warn("a hint", UserWarning, stacklevel=1)
    assert len(caught) == (0 if ignore else 1)


def test_local_settings_merge_and_stay_out_of_git(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "default.yaml").write_text("# @package _global_\npaths:\n  data_dir: /mnt/datasets\ndata:\n  seed: 7\n")
    cfg = compose_train(tmp_path / "run", [f"hydra.searchpath=[file://{tmp_path}]", "experiment=digits_cond"])
    assert cfg.paths.data_dir == "/mnt/datasets" and cfg.data.seed == 7 and cfg.model.num_classes == 10
    assert compose_train(tmp_path / "run", ["data.seed=3"]).data.seed == 3  # without a local file: nothing merged
    # the command line still wins over it; debug= comes after it
    cfg = compose_train(tmp_path / "run", [f"hydra.searchpath=[file://{tmp_path}]", "data.seed=3", "debug=fdr"])
    assert cfg.data.seed == 3 and cfg.trainer.fast_dev_run is True
    assert compose_train(tmp_path / "run", ["local=example"]).paths.data_dir == "/data/datasets"  # the example composes

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("conf/local/default.yaml") and ignored("conf/local/cluster.yaml")
    assert not ignored("conf/local/example.yaml") and not ignored("conf/local/README.md")


@pytest.mark.slow
def test_validate_only_matches_the_runs_own_validation(tmp_path):
    """val/loss (EMA weights, fixed noise) and FID of the checkpoint equal what training logged at that step."""
    fid = ["callbacks=[default,fid]", *FID, f"callbacks.fid.cache_dir={tmp_path / 'fid'}"]
    run = tmp_path / "run"
    run_train(run, fid)
    logged = {k: float(v) for r in metrics(run) if r["step"] in ("3", "4") for k, v in r.items() if v and "/" in k}
    result = tmp_path / "validate"
    value = train.run_job(compose_train(result, [*fid, "validate_only=true", f"ckpt_path={run}"]))
    report = json.loads((result / train.VALIDATE_FILE).read_text())
    assert report["ckpt_path"] == str(run / "checkpoints" / "last.ckpt")
    assert report["global_step"] == 4 and report["weights"] == "ema"
    got = report["metrics"]
    assert value == got["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    for key in ("val/loss_t0-4", "val/loss_t45-49", "val/fid", "val/kid"):
        assert got[key] == pytest.approx(logged[key], rel=1e-5), key
    assert not (result / "checkpoints").exists() and not (result / "csv").exists()


def latent_run(tmp_path: Path) -> list[str]:
    """Overrides of a latent run (codec=vae, a tiny VAE saved in tmp_path) on a folder of 6 images, latents cached."""
    from tests.test_latent import latent_overrides, save_vae

    save_vae(tmp_path / "vae")
    for i in range(6):
        write_image(tmp_path / "images" / f"{i}.png", (16, 16), seed=i)
    return latent_overrides(tmp_path / "images", tmp_path / "vae")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "latent"])
def test_validate_only_matches_training_on_text_and_latent_runs(tmp_path, kind):
    """The same assembly as training: a text run's conditioning (its tokenizer from the checkpoint) and a latent
    run's codec (the cached latents) are there, and val/loss equals what training logged at that step."""
    from tests.test_conditioning import TEXT

    overrides = TEXT if kind == "text" else latent_run(tmp_path)
    run = tmp_path / "run"
    run_train(run, [*overrides, "callbacks.sample_grid.every_n_steps=0"])
    logged = {k: float(v) for r in metrics(run) if r["step"] in ("3", "4") for k, v in r.items() if v and "/" in k}
    result = tmp_path / "validate"
    value = train.run_job(compose_train(result, [*overrides, "validate_only=true", f"ckpt_path={run}"]))
    report = json.loads((result / train.VALIDATE_FILE).read_text())
    assert report["global_step"] == 4 and report["weights"] == "ema"
    assert value == report["metrics"]["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    buckets = [k for k in report["metrics"] if k.startswith("val/loss_")]
    assert buckets and all(report["metrics"][k] == pytest.approx(logged[k], rel=1e-5) for k in buckets)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "validate_only=true evaluates a checkpoint: ckpt_path=PATH"),
        (["ckpt_path={tmp}/nope.ckpt"], "nope.ckpt does not exist"),
        (["ckpt_path={tmp}/foreign.ckpt"], "foreign.ckpt is not a readable checkpoint"),
        (["ckpt_path=last"], "ckpt_path=last: no checkpoints/last.ckpt under"),
    ],
)
def test_validate_only_refuses_what_it_cannot_read(tmp_path, overrides, message):
    (tmp_path / "foreign.ckpt").write_text("hello")
    cfg = compose_train(tmp_path / "run", ["validate_only=true", *(o.format(tmp=tmp_path) for o in overrides)])
    with pytest.raises(UserError) as raised:
        train.run_job(cfg)
    assert message in user_error_message(raised.value)


def test_validate_only_names_the_config_that_does_not_fit(tmp_path):
    run = tmp_path / "run"
    run_train(run, ["trainer.max_steps=1", "logger=none"])
    cfg = compose_train(tmp_path / "v", ["validate_only=true", f"ckpt_path={run}", "model.base_channels=16"])
    with pytest.raises(ConfigError, match="model.base_channels=8 where the config has 16; validate with that run's"):
        train.run_job(cfg)
