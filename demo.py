"""A local web page to try a checkpoint: python demo.py ckpt=PATH [port=7860 sampler=ddim sampler.steps=30 ...].

Loads the model once (`diffusion.generation.load_model`, as sample.py does), offers every sampler of
conf/sampler/ with its configured options, and serves the page of `diffusion.demo_page` (Gradio, the extra
`demo`: pip install -e ".[demo]") until interrupted. See docs/editing.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.errors import exit_on_user_error

log = logging.getLogger(__name__)
SAMPLER_CONFS = Path(__file__).resolve().parent / "conf" / "sampler"


def samplers(chosen: DictConfig | None = None) -> tuple[dict, str]:
    """(name -> sampler with its options bound, the chosen one's name): every conf/sampler/*.yaml, the one whose
    target `chosen` names replaced by `chosen` (the config's sampler, with its command-line options)."""
    options = {p.stem: OmegaConf.load(p) for p in sorted(SAMPLER_CONFS.glob("*.yaml"))}
    name = None
    if chosen is not None:
        name = next((k for k, c in options.items() if c.get("_target_") == chosen.get("_target_")), "configured")
        options[name] = chosen
    return {k: instantiate(c) for k, c in options.items()}, name


def build(cfg: DictConfig):
    """(page, model): the checked options, the model loaded once, the page laid out for it."""
    from diffusion.demo_page import build_page, import_gradio
    from diffusion.generation import load_model, resolve_device
    from diffusion.samplers import check_precision

    import_gradio()  # the missing extra is the first thing said
    options, chosen = samplers(cfg.sampler)
    device = resolve_device(str(cfg.device))
    precision = check_precision(str(cfg.precision))
    model, ckpt = load_model(
        cfg.ckpt,
        runs_dir=cfg.paths.runs_dir,
        device=device,
        use_ema=cfg.use_ema,
        text_encoder=cfg.get("text_encoder"),
        **cfg.ema,
    )
    title = f"{ckpt} (step {model.global_step}, {model.weights} weights)"
    page = build_page(
        model, options, sampler=chosen, steps=cfg.sampler.get("steps") or 20, title=title,
        guidance=cfg.guidance, seed=cfg.seed, batch=cfg.batch, precision=precision,
    )  # fmt: skip
    return page, model


def serve(cfg: DictConfig) -> None:
    page, model = build(cfg)
    log.info(f"serving the page on http://{cfg.host}:{cfg.port or 7860} (Ctrl+C stops it); model on {model.device}")
    page.queue().launch(server_name=str(cfg.host), server_port=cfg.port, show_error=False, footer_links=[])


@hydra.main(version_base="1.3", config_path="conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(serve, cfg)


if __name__ == "__main__":
    main()
