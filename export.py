"""Export a checkpoint: python export.py ckpt=PATH out=DIR [format=diffusers|safetensors|ckpt|lora|pipeline]
[use_ema=true] [ema.sigma_rel=0.08 | ema.sigma_rel=[0.05,0.08,0.12]]. Without format=, what the checkpoint is:
diffusers for model=diffusers_unet, lora for a LoRA run, pipeline for experiment=sd_full, safetensors otherwise.

`format=diffusers` writes a DDPMPipeline folder (for model=diffusers_unet) that loads with
`diffusers.DDPMPipeline.from_pretrained(DIR)`; `format=safetensors` writes model.safetensors + config.json for
any model; `format=ckpt` writes model.ckpt, a slim checkpoint sample.py reads; `format=lora` writes a LoRA
fine-tune of a Stable Diffusion U-Net in diffusers' LoRA format (`StableDiffusionPipeline.load_lora_weights(DIR)`)
and `format=pipeline` a full one as a StableDiffusionPipeline folder. `ema.sigma_rel` exports a post-hoc EMA (runs
trained with callbacks=[default,posthoc_ema]); a list scores each on the run's validation loss, prints the table
and exports the best. The work is done by `diffusion.export`; this file is only the command line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.errors import ConfigError, MissingPathError, exit_on_user_error

log = logging.getLogger(__name__)


def run_data(ckpt: str):
    """The validation data and settings of the run `ckpt` belongs to: (datamodule, val_seed, val_buckets).

    The run's `.hydra/config.yaml` is data from wherever the run folder came from: it may name one of this
    project's datamodules with plain values, never any other callable (a `_target_` that is not a datamodule,
    a nested one, or `_partial_` / `_args_` is refused before anything is built).
    """
    import lightning as L

    import diffusion.data as datamodules
    from diffusion.errors import BadFileError
    from diffusion.posthoc import run_folder_of
    from diffusion.state import is_plain

    run = run_folder_of(Path(ckpt))
    saved = run / ".hydra" / "config.yaml" if run is not None else None
    if saved is None or not saved.is_file():
        raise MissingPathError(
            f"ema.sigma_rel=[...] scores each EMA on the run's validation data, but {ckpt} has no run folder with "
            ".hydra/config.yaml (written by train.py); give one sigma_rel, or a checkpoint inside its run folder"
        )
    config = OmegaConf.load(saved)
    data = OmegaConf.to_container(config.get("data") or {}, resolve=True)
    target = data.pop("_target_", None) if isinstance(data, dict) else None
    module, _, name = str(target).rpartition(".")
    cls = getattr(datamodules, name, None) if module == "diffusion.data" else None
    if not (isinstance(cls, type) and issubclass(cls, L.LightningDataModule)) or not is_plain(data):
        raise BadFileError(f"{saved}: data._target_={target!r} is not one of this project's datamodules; refused")
    if any(str(k).startswith("_") for k in _keys(data)):
        raise BadFileError(f"{saved}: data holds {sorted(k for k in _keys(data) if k.startswith('_'))}; refused")
    options = OmegaConf.to_container(config.get("module") or {}, resolve=True)
    return cls(**data), int(options.get("val_seed", 0)), int(options.get("val_buckets", 10))


def _keys(value) -> list[str]:
    """Every dict key inside `value`, at any depth."""
    if isinstance(value, dict):
        return [*map(str, value), *(k for v in value.values() for k in _keys(v))]
    if isinstance(value, list):
        return [k for v in value for k in _keys(v)]
    return []


def sweep(ckpt: str, sigma_rels: list[float], snapshots: str | None) -> float:
    """Score each post-hoc EMA length (and the raw and stored EMA weights) on the run's val/loss; log the table;
    return the best sigma_rel."""
    from diffusion.callbacks.posthoc_ema import score_ema_lengths, score_table

    datamodule, val_seed, val_buckets = run_data(ckpt)
    rows = score_ema_lengths(
        ckpt,
        sigma_rels=sigma_rels,
        snapshots=snapshots,
        datamodule=datamodule,
        val_seed=val_seed,
        val_buckets=val_buckets,
    )
    best = min((r for r in rows if r.sigma_rel is not None), key=lambda r: r.val_loss)
    log.info(f"val/loss of {ckpt} (the run's validation data, fixed noise):\n{score_table(rows)}")
    log.info(f"best: ema.sigma_rel={best.sigma_rel:g} (val/loss {best.val_loss:.5f})")
    return best.sigma_rel


def run(cfg: DictConfig) -> None:
    from diffusion.checkpoint import resolve_ckpt_path
    from diffusion.export import export

    for key in ("ckpt", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(
                f"{key} is required: python export.py ckpt=PATH out=DIR "
                "[format=diffusers|safetensors|ckpt|lora|pipeline]"
            )
    if not isinstance(cfg.get("ema"), DictConfig):
        raise ConfigError(
            f"ema={cfg.get('ema')}: the choice of raw or EMA weights is use_ema=true|false; ema.sigma_rel=0.08 "
            "exports a post-hoc EMA"
        )
    ckpt = resolve_ckpt_path(cfg.ckpt, cfg.paths.runs_dir, key="ckpt")
    sigma_rel = cfg.ema.sigma_rel
    if isinstance(sigma_rel, ListConfig):
        if not sigma_rel:
            raise ConfigError("ema.sigma_rel=[] is empty: give one value or a list of them")
        sigma_rel = sweep(ckpt, list(sigma_rel), cfg.ema.snapshots)
    model, format = export(
        ckpt,
        cfg.out,
        format=cfg.format,
        use_ema=cfg.use_ema,
        overwrite=cfg.overwrite,
        sigma_rel=sigma_rel,
        snapshots=cfg.ema.snapshots,
    )
    log.info(
        f"exported {ckpt} ({type(model.net).__name__}, {model.weights} weights, step {model.global_step}) "
        f"as {format} to {cfg.out}"
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    return exit_on_user_error(run, cfg)


if __name__ == "__main__":
    main()
