"""Export a checkpoint: python export.py ckpt=PATH out=DIR [format=diffusers|safetensors|lora|pipeline] [ema=true].

`format=diffusers` writes a DDPMPipeline folder (for model=diffusers_unet) that loads with
`diffusers.DDPMPipeline.from_pretrained(DIR)`; `format=safetensors` writes model.safetensors + config.json for
any model; `format=lora` writes a LoRA fine-tune of a Stable Diffusion U-Net in diffusers' LoRA format
(`StableDiffusionPipeline.load_lora_weights(DIR)`) and `format=pipeline` a full one as a StableDiffusionPipeline
folder. The work is done by `diffusion.export`; this file is only the command line.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion.errors import ConfigError, exit_on_user_error

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    from diffusion.export import export
    from train import resolve_ckpt_path

    for key in ("ckpt", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(
                f"{key} is required: python export.py ckpt=PATH out=DIR [format=diffusers|safetensors|lora|pipeline]"
            )
    ckpt = resolve_ckpt_path(cfg.ckpt, cfg.paths.runs_dir, key="ckpt")
    model = export(ckpt, cfg.out, format=cfg.format, use_ema=cfg.ema, overwrite=cfg.overwrite)
    log.info(
        f"exported {ckpt} ({type(model.net).__name__}, {model.weights} weights, step {model.global_step}) "
        f"as {cfg.format} to {cfg.out}"
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    return exit_on_user_error(run, cfg)


if __name__ == "__main__":
    main()
