"""Generate images from a trained checkpoint: python sample.py ckpt=PATH [sampler=unipc sampler.steps=10 n=64 ...].

Loads the model (`DiffusionModel.from_checkpoint`: EMA weights when present) and the sampler chosen in
conf/sample.yaml, draws `n` images in batches on the GPU when there is one, and writes `grid.png`, one
PNG per image under `images/` and optionally `samples.npz` into `out`. Image i depends only on seed + i (its
starting noise and any fresh noise a stochastic sampler draws come from its own generator), so `n=8` reproduces
the first 8 images of `n=64` with any `batch_size`. Class-conditional checkpoints take `label=`, text-conditional
ones `prompt="..."` or `prompts=FILE` (one prompt per line, one grid row each) and `negative_prompt=`; both take
`guidance=`. Every model edits images too (docs/editing.md): `init=` an image or a folder with `strength=`
(image-to-image, SDEdit) and `mask=` (inpainting: white is repainted, black kept).
"""

from __future__ import annotations

import json
import logging
import math
import re
from functools import partial
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.errors import BadFileError, ConfigError, PathError, PathExistsError, exit_on_user_error, not_utf8

log = logging.getLogger(__name__)

IMAGE_NAME = re.compile(r"^\d{6}\.png$")
CAPTIONS_FILE = "metadata.jsonl"  # images/ of a text model: each image's prompt, so images/ is a captioned folder


def parse_prompts(prompt, prompts_file) -> list[str] | None:
    """The prompt of each grid row: `prompt` (a string or a list) or the lines of `prompts_file`; None for neither."""
    if prompt is not None and prompts_file is not None:
        raise ConfigError("prompt= and prompts= exclude each other: give one prompt, or a file of prompts")
    if prompts_file is not None:
        path = Path(str(prompts_file)).expanduser()
        if not path.is_file():
            raise PathError(f"prompts={path} is not a file (one prompt per line)")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the first prompt
        except UnicodeDecodeError as e:
            raise BadFileError(f"prompts={path} is not UTF-8 text ({not_utf8(e)}); save it as UTF-8") from None
        values = [line.strip() for line in text.splitlines() if line.strip()]
        if not values:
            raise ConfigError(f"prompts={path} holds no prompts (one per line)")
        return values
    if prompt is None:
        return None
    values = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    if not values or not all(isinstance(v, str) for v in values):
        raise ConfigError(f'prompt={prompt} must be a string (quote it: prompt="a handwritten seven") or a list')
    return values


def prepare_out(out: Path, *, overwrite: bool) -> None:
    """Create `out`, check it can be written, and refuse to replace earlier results unless `overwrite`."""
    from diffusion.files import check_writable, real_folder

    try:
        out.mkdir(parents=True, exist_ok=True)
        check_writable(out)
    except OSError as e:
        raise PathError(f"out={out} cannot be written ({e.strerror or e})") from e
    images = out / "images"
    existing = [p.name for p in (out / "grid.png", out / "samples.npz") if p.exists() or p.is_symlink()]
    linked = images.is_symlink()  # never list, delete or write through a link we did not make
    old_images = [p for p in images.iterdir() if IMAGE_NAME.match(p.name)] if images.is_dir() and not linked else []
    if old_images or linked:
        existing.append("images (a link)" if linked else f"images/ ({len(old_images)} PNGs)")
    old_captions = images / CAPTIONS_FILE
    if not linked and (old_captions.exists() or old_captions.is_symlink()):
        existing.append(f"images/{CAPTIONS_FILE}")
        old_images.append(old_captions)
    if existing and not overwrite:
        raise PathExistsError(
            f"out={out} already holds {', '.join(existing)}; pass overwrite=true to replace them or choose another out"
        )
    for p in old_images:  # overwrite=true: no stale images from a larger earlier run
        p.unlink()
    real_folder(images)


def sample(cfg: DictConfig) -> Path:
    import numpy as np
    from PIL import Image

    from diffusion.data import to_unit_range
    from diffusion.files import atomic_write
    from diffusion.generation import (
        check_edit_options,
        edit_inputs,
        image_shape,
        load_model,
        nonfinite_warning,
        read_images,
        read_masks,
        resolve_device,
        to_uint8,
    )
    from diffusion.grid import save_grid
    from diffusion.samplers import check_precision, check_sampler

    # 1. check the plain options before touching the checkpoint
    if cfg.ckpt in (None, ""):
        raise ConfigError("ckpt=PATH is required: a .ckpt file, a training run folder, or ckpt=last")
    if cfg.n < 1:
        raise ConfigError(f"n={cfg.n} must be >= 1")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    if cfg.nrow is not None and cfg.nrow < 1:
        raise ConfigError(f"nrow={cfg.nrow} must be >= 1")
    device = resolve_device(str(cfg.device))
    precision = check_precision(str(cfg.precision))
    strength = float(cfg.strength)
    check_edit_options(init=cfg.init is not None, mask=cfg.mask is not None, strength=strength)

    # 2. the model, the condition of each grid row (labels, prompts, or the null condition), the sampler, the
    #    images to edit (read at the model's size)
    model, ckpt = load_model(
        cfg.ckpt,
        runs_dir=cfg.paths.runs_dir,
        device=device,
        use_ema=cfg.use_ema,
        text_encoder=cfg.get("text_encoder"),
        **cfg.ema,  # ema.sigma_rel: post-hoc EMA
    )
    negative = cfg.get("negative_prompt")
    rows = model.conditioning.conditions_from(
        label=plain(cfg.label),
        prompts=parse_prompts(plain(cfg.get("prompt")), cfg.get("prompts")),
        negative=negative,
        guidance=cfg.guidance,
    )
    sampler = instantiate(cfg.sampler)
    check_sampler(sampler, model.process)  # a bad option or sampler / process pair fails now, not after a batch
    channels, size = image_shape(model)
    init = None if cfg.init is None else read_images(cfg.init, channels=channels, size=size)
    mask = None if cfg.mask is None else read_masks(cfg.mask, size=size)

    # 3. the output folder, checked before any sampling
    out = Path(str(cfg.out)).expanduser()
    prepare_out(out, overwrite=cfg.overwrite)

    # 4. sample: item k is (row condition, column j) and starts from seed + j
    items = [(row, j) for row in rows for j in range(cfg.n)]
    init, mask = edit_inputs(init, mask, [j for _, j in items], strength=strength)  # column j edits image j % k
    log.info(
        f"sampling {len(items)} images with {cfg.sampler._target_.rsplit('.', 1)[-1]} from {ckpt} "
        f"(step {model.global_step}, {model.weights} weights) on {device} in {cfg.precision}",
    )
    pixels = model.generate(
        [row for row, _ in items],
        seeds=[cfg.seed + j for _, j in items],
        sampler=sampler,
        guidance=model.conditioning.guidance if cfg.guidance is None else float(cfg.guidance),
        negative=negative,
        precision=precision,
        batch_size=cfg.batch_size,
        progress=bool(cfg.progress),
        init=init,
        strength=strength,
        mask=mask,
    )
    warning = nonfinite_warning(pixels, model, ckpt)
    if warning:  # NaN / inf weights (a diverged run's checkpoint) draw black images: say so, they are still written
        log.warning(warning)
    uint8 = to_uint8(pixels)  # (N, H, W, C)
    pixels = to_unit_range(pixels.cpu()).clamp(0, 1)  # (N, C, H, W) in [0, 1]

    # 5. write: per-image PNGs, the grid, the npz (each atomically, replacing rather than following any link)
    for k, img in enumerate(uint8):
        image = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        atomic_write(out / "images" / f"{k:06d}.png", partial(image.save, format="PNG"), fsync=False)
    nrow = cfg.nrow or (cfg.n if len(rows) > 1 else math.ceil(math.sqrt(len(items))))
    save_grid(pixels, out / "grid.png", nrow=nrow)  # small images enlarged (diffusion/grid.py)
    written = ["grid.png", f"images/ ({len(items)} PNGs)"]
    prompts = rows != [None] and all(isinstance(row, str) for row in rows)
    if prompts:  # each image's prompt (Hugging Face imagefolder metadata): a captioned folder
        lines = [json.dumps({"file_name": f"{k:06d}.png", "text": p}) + "\n" for k, (p, _) in enumerate(items)]
        atomic_write(out / "images" / CAPTIONS_FILE, lambda f: f.write("".join(lines).encode("utf-8")))
        written[-1] = f"images/ ({len(items)} PNGs and their prompts in {CAPTIONS_FILE})"
    if cfg.npz:
        arrays = {"arr_0": uint8}
        if rows != [None]:
            arrays["arr_1"] = np.array([row for row, _ in items], dtype=str if prompts else np.int64)
        atomic_write(out / "samples.npz", lambda f: np.savez(f, **arrays))
        written.append("samples.npz")
    log.info(f"wrote {', '.join(written)} to {out}")
    return out


def plain(value):
    """A config value as plain Python (ListConfig -> list)."""
    return OmegaConf.to_object(value) if isinstance(value, ListConfig) else value


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(sample, cfg)


if __name__ == "__main__":
    main()
