"""Export a checkpoint: python export.py ckpt=PATH out=DIR [format=diffusers|safetensors|ckpt|lora|pipeline]
[use_ema=true] [ema.sigma_rel=0.08 | ema.sigma_rel=[0.05,0.08,0.12]].

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
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.errors import ConfigError, MissingPathError, exit_on_user_error

log = logging.getLogger(__name__)


def run_config(ckpt: str) -> DictConfig:
    """The training config of the run `ckpt` belongs to (its `.hydra/config.yaml`, written by train.py)."""
    from diffusion.posthoc import run_folder_of

    run = run_folder_of(Path(ckpt))
    saved = run / ".hydra" / "config.yaml" if run is not None else None
    if saved is None or not saved.is_file():
        raise MissingPathError(
            f"ema.sigma_rel=[...] scores each EMA on the run's validation data, but {ckpt} has no run folder with "
            ".hydra/config.yaml (written by train.py); give one sigma_rel, or a checkpoint inside its run folder"
        )
    return OmegaConf.load(saved)


def sweep(ckpt: str, sigma_rels: list[float], snapshots: str | None) -> float:
    """Score each post-hoc EMA length (and the raw and stored EMA weights) on the run's val/loss; log the table;
    return the best sigma_rel."""
    from diffusion.callbacks.posthoc_ema import score_ema_lengths, score_table

    train_cfg = run_config(ckpt)
    rows = score_ema_lengths(
        ckpt,
        sigma_rels=sigma_rels,
        snapshots=snapshots,
        datamodule=instantiate(train_cfg.data),
        build_module=lambda **built: instantiate(train_cfg.module, **built, optimizer=None),
    )
    best = min((r for r in rows if r.sigma_rel is not None), key=lambda r: r.val_loss)
    log.info(f"val/loss of {ckpt} (the run's validation data, fixed noise):\n{score_table(rows)}")
    log.info(f"best: ema.sigma_rel={best.sigma_rel:g} (val/loss {best.val_loss:.5f})")
    return best.sigma_rel


def run(cfg: DictConfig) -> None:
    from diffusion.export import export
    from train import resolve_ckpt_path

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
    model = export(
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
        f"as {cfg.format} to {cfg.out}"
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    return exit_on_user_error(run, cfg)


if __name__ == "__main__":
    main()
