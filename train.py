"""Train a diffusion model: python train.py [model=... data=... process=... trainer.max_steps=...].

Composes the Hydra config in conf/, assembles the model (network, process, conditioning, codec: `assemble`) and
the datamodule, wraps them in the LightningModule with its callbacks, loggers and Trainer, and fits. Every run
writes into its own folder (the resolved config in .hydra/, checkpoints/, samples/, logs). Returns the metric
named by `optimized_metric` for sweepers. Each run starts with `extras` (the config tree, tags);
`validate_only=true` evaluates the checkpoint `ckpt_path` instead of training (`validate`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoint import resolve_ckpt_path
from diffusion.errors import (
    ConfigError,
    PathExistsError,
    config_error,
    exit_on_user_error,
    user_error_message,
)
from diffusion.extras import config_tree, run_tags, write_json, write_text

log = logging.getLogger(__name__)
FAILED_FILE = "failed.txt"  # in a sweep job's folder: the one-line reason the job failed
CONFIG_TREE_FILE = "config_tree.log"  # in the run folder: the composed config as printed at the start
TAGS_FILE = "tags.log"  # in the run folder: the run's tags, one per line
VALIDATE_FILE = "validate.json"  # in the run folder of a validate_only=true run: the checkpoint's metrics


def occupied(output_dir: Path) -> str | None:
    """Why a NEW run may not start in `output_dir` (it already holds checkpoints), or None.

    The advice names a checkpoint that exists: the run folder (its last.ckpt), or, when a run was killed before
    its first last.ckpt, the newest checkpoint there."""
    found = sorted((output_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    resume = output_dir if (output_dir / "checkpoints" / "last.ckpt").is_file() else found[-1]
    return (
        f"run folder {output_dir} already holds checkpoints; resume with ckpt_path={resume} or choose another "
        "hydra.run.dir"
    )


def refuse(message: str) -> None:
    """End the command with `error: message` on stderr and exit code 1, from a Hydra callback (whose exceptions
    Hydra turns into warnings)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def refuse_secrets(config: DictConfig) -> None:
    """Refuse credentials anywhere in the composed config or the command line (a sweep's values included) before
    Hydra writes them into .hydra/, multirun.yaml or train.log; the message never repeats them."""
    from diffusion.data.shards import check_config_secrets

    try:
        check_config_secrets(OmegaConf.to_container(config, resolve=False))
        data = config.get("data")
        try:  # an interpolation (${oc.env:...}) ends up resolved in config_tree.log
            resolved = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else None
        except Exception:  # one that cannot resolve yet (${hydra:...}): building the data names it
            resolved = None
        check_config_secrets({"data": resolved} if resolved else {})
    except ConfigError as e:
        refuse(str(e))


class RunFolderGuard(Callback):
    """Refuses a new run into a folder that holds checkpoints, and credentials in the config, before Hydra writes
    anything; lets a sweep resolve its folder.

    Hydra writes .hydra/config.yaml, hydra.yaml and overrides.yaml when the job starts, before `train` runs:
    `on_run_start` comes first (a sweep: `on_multirun_start`, before multirun.yaml). A callback's exceptions only
    become warnings in Hydra, so this one exits.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # The sweeper resolves hydra.sweep.dir (paths.runs_dir -> ${hydra:runtime.cwd}) before any job has set
        # HydraConfig: without this, `python train.py -m ...` without hydra.sweep.dir= fails at once.
        HydraConfig.instance().set_config(config)
        refuse_secrets(config)
        hold_run_folder(Path(str(config.hydra.sweep.dir)).absolute(), key="hydra.sweep.dir")

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        # The default hydra.run.dir reaches ${hydra:runtime.cwd} through paths.runs_dir, which resolves only once
        # HydraConfig is set (Hydra sets it after this callback): set it now, as for a sweep above.
        HydraConfig.instance().set_config(config)
        refuse_secrets(config)
        run = Path(str(config.hydra.run.dir)).absolute()
        resuming = (
            config.get("ckpt_path") not in (None, "") or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) >= 1
        )
        message = None if resuming else occupied(run)  # resuming writes into its own folder
        if message:
            refuse(message)
        hold_run_folder(run)


def hold_run_folder(run: Path, key: str = "hydra.run.dir") -> None:
    """This process holds run folder `run` (a sweep's: its hydra.sweep.dir) for its life
    (`diffusion.files.hold_folder`), or is refused in one line naming the run that holds it. DDP's other ranks
    (Lightning starts this script again in the same folder) work in the folder their rank zero holds; a requeued
    SLURM job finds it free (its first process has ended)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from diffusion.files import hold_folder

    if rank_zero_only.rank != 0:
        return
    try:
        holder = hold_folder(run)
    except OSError as e:
        refuse(f"{key}={run} cannot be written ({e.strerror or e})")
    if holder is not None:
        refuse(f"run folder {run} is in use by another run (pid {holder}); wait for it to end, or choose another {key}")


def check_resume(ckpt_path: str, ckpt: dict, model, *, verb: str = "resume") -> None:
    """A one-line ConfigError when checkpoint `ckpt` (at ckpt_path) cannot be resumed (or validated) with `model`.

    Its weights must fit the network the config builds; the message names the config keys where the
    checkpoint's own description differs from the config (or, if none does, the tensors that differ). A resume
    must also keep the objective: a changed process (another family, prediction, schedule, weighting) would train
    the restored optimizer state toward another target. Other changes that keep the weights' shapes (e.g.
    model.gradient_checkpointing) are allowed and printed. `verb` is what the run does with the checkpoint.
    """
    from diffusion.checkpoint import description_differences, net_state_dict, weights_mismatch

    differences = description_differences(ckpt["diffusion"], model.describe())
    shown = [f"{k}={saved} where the config has {now}" for k, saved, now in differences]
    mismatch = weights_mismatch(model.net, net_state_dict(ckpt, use_ema=False)[0])
    if mismatch:
        more = f" (and {len(shown) - 1} more: {', '.join(k for k, _, _ in differences[1:])})" if len(shown) > 1 else ""
        what = f"was trained with {shown[0]}{more}" if shown else f"does not fit the model: {mismatch}"
        raise ConfigError(
            f"ckpt_path={ckpt_path} {what}; {verb} with that run's config (its .hydra/overrides.yaml), or start "
            "a new run from its weights with init_from="
        )
    objective = [line for (k, _, _), line in zip(differences, shown, strict=True) if k.startswith("process.")]
    objective = [line for line in objective if line.startswith("process.family=")] or objective  # a family: its name
    if objective and verb == "resume":
        raise ConfigError(
            f"ckpt_path={ckpt_path} was trained with {'; '.join(objective)}: resuming would train its optimizer "
            "state toward another objective; resume with that run's process, or start a new run from its weights "
            "with init_from="
        )
    if shown:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        rank_zero_only(log.info)(f"{verb}: {ckpt_path} with config changes: {'; '.join(shown)}")


def slurm_requeue_path(output_dir: Path) -> str | None:
    """The checkpoint a requeued SLURM job resumes from: the newer of Lightning's hpc_ckpt_N.ckpt (written on
    the requeue signal) and checkpoints/last.ckpt in its own run folder; None when this is not a requeue."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    found = [*output_dir.glob("hpc_ckpt_*.ckpt"), *output_dir.glob("checkpoints/last.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def effective_batch(batch_size: int, trainer) -> tuple[int, str]:
    """Images per optimizer step across all processes, and how it is made up."""
    devices, nodes, accumulate = trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
    total = batch_size * devices * nodes * accumulate
    return total, f"{batch_size} per device x {devices} devices x {nodes} nodes x {accumulate} accumulation"


def build(cfg: DictConfig, key: str, **kwargs):
    """instantiate(cfg.<key>, **kwargs); an error the config caused becomes one ConfigError naming `key`."""
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        error = config_error(key, cause, target=_target_of(node), values=_values_of(node))
        if error is None:
            raise
        raise error from cause


def build_optimizer(cfg: DictConfig):
    """The optimizer factory of cfg.optim.optimizer, tried once on a dummy parameter so that a bad value
    (optim.lr=-1) is named now rather than deep inside trainer.fit."""
    import torch

    factory = build(cfg, "optim.optimizer")
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as e:
        error = config_error("optim.optimizer", e, values=_values_of(cfg.optim.optimizer))
        if error is None:
            raise
        raise error from e
    return factory


def _target_of(node):
    try:
        return get_object(str(node._target_))
    except Exception:  # no _target_, or it cannot be imported: Hydra's own error says so
        return None


def _values_of(node) -> dict:
    try:
        values = OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation that does not resolve: nothing to check types against
        return {}
    return {k: v for k, v in values.items() if not str(k).startswith("_")}


def relaunches_in_local_sweep(cfg: DictConfig) -> bool:
    """Whether cfg.trainer starts more processes by re-running this script (Lightning's DDP launches
    `sys.argv` again): inside a local `-m` sweep they would re-run the whole sweep."""
    trainer = cfg.trainer
    strategy = trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        popen = str(strategy.get("_target_", "")).endswith("DDPStrategy")
        popen = popen and strategy.get("start_method", "popen") == "popen"
    else:
        popen = str(strategy or "").startswith("ddp") and not any(w in str(strategy) for w in ("spawn", "fork"))
    devices = trainer.get("devices", 1)
    several = devices not in (1, "1") and not (isinstance(devices, list | tuple) and len(devices) == 1)
    return popen and (several or int(trainer.get("num_nodes", 1) or 1) > 1)


def run_job(cfg: DictConfig) -> float | None:
    """extras(cfg), then train(cfg); in a sweep, a job that diverges or fails on its own config logs why, leaves
    `failed.txt` in its folder and returns NaN to the sweeper (to Optuna the worst value, see failed_value), so the
    sweep goes on."""
    hydra_cfg = HydraConfig.get()
    extras(cfg)  # a refusal here (extras.enforce_tags) stops a whole sweep: every job would be refused alike
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return train(cfg)
    if hydra_cfg.launcher._target_.endswith("BasicLauncher") and relaunches_in_local_sweep(cfg):
        raise ConfigError(
            "trainer=ddp cannot run inside a local -m sweep (Lightning relaunches the script with the sweep's "
            "arguments); run each job separately, or sweep with hydra/launcher=slurm"
        )
    try:
        return train(cfg)
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        log.error(f"job {hydra_cfg.job.num} failed: {message}")
        write_text(Path(cfg.paths.output_dir) / FAILED_FILE, message)
        return failed_value(hydra_cfg.sweeper.get("direction"))


def failed_value(direction) -> float | list[float]:
    """What a failed job returns to its sweeper: NaN, or for Optuna (which has a `direction` and fails the whole
    sweep on NaN) the worst value in each direction: +inf when minimizing, -inf when maximizing."""
    if direction is None:
        return float("nan")

    def worst(d) -> float:
        return math.inf if str(d).lower().endswith("minimize") else -math.inf

    return worst(direction) if isinstance(direction, str) else [worst(d) for d in direction]


class SweepReport(Callback):
    """At the end of a sweep, lists the jobs that failed (those that left `failed.txt` in their folder)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        failed = sorted(sweep.rglob(FAILED_FILE))
        if not failed:
            return
        jobs = len(list(sweep.rglob(".hydra/overrides.yaml")))
        lines = [f"sweep: {len(failed)} of {jobs} jobs failed (each returned NaN, or to Optuna the worst value):"]
        for path in failed:
            overrides = OmegaConf.load(path.parent / ".hydra" / "overrides.yaml")
            lines.append(f"  {path.parent} ({' '.join(overrides)}): {path.read_text().strip()}")
        log.warning("\n".join(lines))


# Lightning's messages that a user of this project cannot act on, kept off the first screen (and train.log): the
# runs count steps (an epoch of the built-in digits is 12 batches, fewer than log_every_n_steps, which is fine),
# the model summary callback is ours, and a cloud-logging advertisement.
QUIET_MESSAGES = (
    "is smaller than the logging interval",
    "Trainer already configured with model summary callbacks",
    "litlogger",
    "`weights_only` was not set",
    "isinstance(treespec, LeafSpec)` is deprecated",
)


class QuietFilter(logging.Filter):
    """Drops the log records (and warnings, through logging) whose message holds one of QUIET_MESSAGES."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in QUIET_MESSAGES)


QUIET = QuietFilter()


def lightning_logging() -> None:
    """Lightning's messages through Hydra's logging only, at the level hydra.verbose asks.

    Hydra's console and train.log show them already, so Lightning's own stderr handler (it would print each
    twice) is dropped, and so are the messages in QUIET_MESSAGES; and importing Lightning sets its logger to INFO
    after Hydra configured the levels, so a `hydra.verbose` that names it (debug=fdr: each hook call, in order) is
    applied again.
    """
    if logging.getLogger().handlers:
        for handler in list(logging.getLogger("lightning").handlers):
            logging.getLogger("lightning").removeHandler(handler)
    for handler in logging.getLogger().handlers:
        if QUIET not in handler.filters:
            handler.addFilter(QUIET)
    for text in QUIET_MESSAGES:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")
    verbose = HydraConfig.get().verbose if HydraConfig.initialized() else False
    if verbose is True:  # every logger
        names = ["lightning.pytorch", "lightning.fabric"]
    else:
        names = [verbose] if isinstance(verbose, str) else list(verbose or [])
    for name in names:
        if name == "lightning" or name.startswith("lightning."):
            logging.getLogger(name).setLevel(logging.DEBUG)


def build_group(cfg: DictConfig, group: str) -> list:
    """The objects of a group of several (callbacks, logger): one per entry with a `_target_`, in config order.

    Entries without one build nothing: `callbacks.ema=null`, and keys that debug= sets for a callback the run
    does not have (its `callbacks.fid.num_samples` without callbacks.fid).
    """
    return [build(cfg, f"{group}.{k}") for k, c in (cfg.get(group) or {}).items() if c and "_target_" in c]


def extras(cfg: DictConfig) -> None:
    """What every run does first (cfg.extras): warnings off, tags checked, the config tree printed and saved.

    With extras.enforce_tags a run without tags stops with a one-line error. Never a prompt: runs start on
    clusters, in sweeps and in CI, where nobody answers one, and a refusal is the same everywhere.
    """
    options = cfg.get("extras") or {}
    tags = run_tags(cfg.get("tags"))
    if options.get("enforce_tags") and not tags:
        raise ConfigError("extras.enforce_tags=true: give the run tags, e.g. tags=[baseline,cosine]")
    if options.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    output_dir = Path(cfg.paths.output_dir)
    if tags:
        write_text(output_dir / TAGS_FILE, "\n".join(tags))
    if options.get("print_config"):
        try:
            tree = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an interpolation that does not resolve: building names it; show the config as written
            tree = OmegaConf.to_container(cfg, resolve=False)
        text = config_tree(tree, label=f"config ({output_dir / CONFIG_TREE_FILE})")
        write_text(output_dir / CONFIG_TREE_FILE, text)
        log.info(text)


def assemble(cfg: DictConfig, *, init_path: str | None = None, finetune=None):
    """The model and the data a config describes: the one assembly that training and validation share.

    Builds the codec, the datamodule (encoding its latent cache through the codec), the process, the network (in
    the codec's latent shape), the conditioning; loads init_from's weights and applies the fine-tune
    (`finetune`: LoRA adapters or a full fine-tune), and prepares the conditioning on the training data (a text
    encoder's tokenizer). Returns (DiffusionModel, datamodule).
    """
    import lightning as L

    from diffusion.finetune import LoRA, base_source, init_from_checkpoint
    from diffusion.model import DiffusionModel
    from diffusion.networks import check_registered

    init = cfg.get("init") or {}
    codec = build(cfg, "codec") if cfg.get("codec") else None
    latent_cache = codec is not None and cfg.data.get("cache") and codec.config["kind"] != "identity"
    datamodule = build(cfg, "data", **({"codec": codec} if latent_cache else {}))
    process = build(cfg, "process")
    if cfg.get("sampler") is not None:  # the sample grid's and FID's sampler must fit the process: fail now
        from diffusion.samplers import check_sampler

        check_sampler(build(cfg, "sampler"), process)
    channels, size = datamodule.channels, datamodule.image_size
    latent = codec.latent_shape(channels, size) if codec is not None else (channels, size)
    # the network sees the codec's latents: their channels and side replace the data's (pixels: the same)
    net = build(
        cfg, "model", **({} if latent == (channels, size) else dict(in_channels=latent[0], image_size=latent[1]))
    )
    check_registered(net)
    conditioning = build(cfg, "conditioning")
    if init_path is not None:  # weights only: the optimizer and the step count start fresh (reads the file once)
        report = init_from_checkpoint(
            net,
            init_path,
            ignore_keys=list(init.get("ignore_keys") or []),
            strict=init.get("strict", True),
            use_ema=init.get("use_ema", True),
            conditioning=conditioning,
        )
        L.pytorch.utilities.rank_zero_only(log.info)(report.summary())
    if cfg.get("dreambooth"):  # the instance images with class images the base model draws (diffusion/data/dreambooth)
        dreambooth = build(cfg, "dreambooth")
        base = DiffusionModel(net=net, process=process, conditioning=conditioning, codec=codec)
        datamodule = dreambooth.datamodule(datamodule, base=base, sampler=build(cfg, "sampler"))
    lora = isinstance(finetune, LoRA)
    if finetune is not None:  # LoRA adapters on the loaded base (only they train), or a full fine-tune
        if lora and init_path is not None and (init.get("ignore_keys") or not init.get("strict", True)):
            raise ConfigError("finetune=lora needs its base loaded whole: init.strict=true and no init.ignore_keys")
        source = base_source(
            init_from=init_path, use_ema=init.get("use_ema", True), pretrained=cfg.model.get("pretrained")
        )
        net = finetune.apply(net, source=source)
    conditioning.prepare(datamodule)  # e.g. a text encoder's tokenizer from the training captions
    if lora:  # the base's conditions stay as they were; a text encoder learns only the captions' new words
        conditioning.freeze_for_adapters()
    if cfg.get("dreambooth"):  # dreambooth.train_text_encoder: LoRA adapters on the text encoder too
        conditioning = dreambooth.conditioning(conditioning, finetune=finetune)
    return DiffusionModel(net=net, process=process, conditioning=conditioning, codec=codec), datamodule


def validate(cfg: DictConfig) -> float | None:
    """Evaluate checkpoint cfg.ckpt_path with cfg's data and callbacks: val/loss (and its buckets) over the
    validation set, val/fid and val/kid when callbacks.fid is configured. Uses the checkpoint's EMA weights when
    it has them (as sample.py does), else its raw ones. Logs the metrics and writes them with the checkpoint's
    path and step to `<run folder>/validate.json`; returns cfg.optimized_metric's value."""
    import lightning as L

    from diffusion.callbacks.ema import EMA
    from diffusion.checkpoint import read_checkpoint

    lightning_logging()
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.runs_dir)
    if ckpt_path is None:
        raise ConfigError("validate_only=true evaluates a checkpoint: ckpt_path=PATH (a .ckpt, a run folder or last)")
    ckpt = read_checkpoint(ckpt_path)
    init_path = resolve_ckpt_path(cfg.get("init_from"), cfg.paths.runs_dir, key="init_from")
    model, datamodule = assemble(
        cfg, init_path=init_path, finetune=build(cfg, "finetune") if cfg.get("finetune") else None
    )
    check_resume(ckpt_path, ckpt, model, verb="validate")
    model.load_checkpoint_weights(ckpt, use_ema=True, source=f"ckpt_path={ckpt_path}")
    module = build(cfg, "module", model=model, optimizer=build_optimizer(cfg))
    # The net holds the average already: an EMA callback would average it again. The others act in training only,
    # except FID, which evaluates at the end of a validate run.
    callbacks = [c for c in build_group(cfg, "callbacks") if not isinstance(c, EMA)]
    trainer = build(cfg, "trainer", callbacks=callbacks, logger=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # val/loss, its buckets in order, FID
    if trainer.is_global_zero:
        path = write_json(
            Path(cfg.paths.output_dir) / VALIDATE_FILE,
            {"ckpt_path": ckpt_path, "global_step": model.global_step, "weights": model.weights, "metrics": metrics},
        )
        lines = [f"validate: {ckpt_path} (step {model.global_step}, {model.weights} weights)"]
        lines += [f"  {k} = {v:.6g}" for k, v in metrics.items()]
        log.info("\n".join([*lines, f"metrics written to {path}"]))
    return metrics.get(cfg.get("optimized_metric"))


def train(cfg: DictConfig) -> float | None:
    """Build everything from `cfg` and fit; returns cfg.optimized_metric's last value (if logged).

    With cfg.validate_only, evaluates the checkpoint cfg.ckpt_path instead (`validate`).
    """
    if cfg.get("validate_only"):
        return validate(cfg)
    import lightning as L

    lightning_logging()
    from diffusion.checkpoint import read_checkpoint
    from diffusion.files import remove_stale_temps
    from diffusion.finetune import LoRA
    from diffusion.loggers import log_tags

    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.runs_dir)
    if ckpt_path is None:
        ckpt_path = slurm_requeue_path(output_dir)  # a preempted SLURM job continues in its own folder
    resumed = read_checkpoint(ckpt_path) if ckpt_path is not None else None  # a clear error now, not in Lightning
    if L.pytorch.utilities.rank_zero_only.rank == 0:  # this run holds its folder: no other save is under way
        stale = remove_stale_temps(output_dir / "checkpoints")
        if stale:
            log.info(f"removed {len(stale)} temporary file(s) an interrupted save left: {', '.join(stale)}")
    if resumed is None and occupied(output_dir):
        raise PathExistsError(occupied(output_dir))
    init_path = resolve_ckpt_path(cfg.get("init_from"), cfg.paths.runs_dir, key="init_from")
    init = cfg.get("init") or {}
    if init.get("required") and init_path is None:
        raise ConfigError("init_from is required (init.required=true, e.g. experiment=finetune): init_from=PATH")
    finetune = build(cfg, "finetune") if cfg.get("finetune") else None
    if init_path is not None and ckpt_path is not None and not isinstance(finetune, LoRA):  # LoRA: its base
        raise ConfigError(
            "init_from and ckpt_path exclude each other: ckpt_path resumes a run (optimizer, step), "
            "init_from starts a new one from a checkpoint's weights"
        )

    model, datamodule = assemble(cfg, init_path=init_path, finetune=finetune)
    if resumed is not None:
        check_resume(ckpt_path, resumed, model)
    module = build(cfg, "module", model=model, optimizer=build_optimizer(cfg))
    if init_path is not None and init.get("ema_from_init", True):
        module.ema_init_state = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
    callbacks = build_group(cfg, "callbacks")
    # Under fast_dev_run (debug=fdr) Lightning swaps the loggers for a dummy one: build none, so none writes files.
    loggers = [] if cfg.trainer.get("fast_dev_run") else build_group(cfg, "logger")
    trainer = build(cfg, "trainer", callbacks=callbacks, logger=loggers or False)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    batch, batch_parts = effective_batch(int(getattr(datamodule, "batch_size", cfg.data.get("batch_size", 0))), trainer)
    resolved["effective_batch_size"] = batch
    resolved["tags"] = run_tags(cfg.get("tags"))
    for logger in loggers:
        logger.log_hyperparams(resolved)
    log_tags(loggers, resolved["tags"])
    n_params = sum(p.numel() for p in model.net.parameters())
    n_trained = sum(p.numel() for p in model.net.parameters() if p.requires_grad)
    if trainer.is_global_zero:
        trained = "" if n_trained == n_params else f", {n_trained / 1e6:.3f}M trained"
        log.info(f"run folder: {output_dir}  ({type(model.net).__name__}, {n_params / 1e6:.2f}M parameters{trained})")
        log.info(f"effective batch {batch} ({batch_parts}), lr {cfg.optim.get('lr')}, precision {trainer.precision}")

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    if trainer.is_global_zero:
        log.info(f"done at step {trainer.global_step}; run folder: {output_dir}")
    metric = cfg.get("optimized_metric")
    value = trainer.callback_metrics.get(metric) if metric else None
    value = float(value) if value is not None else None
    if trainer.is_global_zero and metric:
        log.info(f"optimized_metric {metric} = {value}")
    return value


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return exit_on_user_error(run_job, cfg)


if __name__ == "__main__":
    main()
