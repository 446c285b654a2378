"""DreamBooth's class images and prior-preservation loss weights (Ruiz et al. 2023, "DreamBooth: Fine Tuning
Text-to-Image Diffusion Models for Subject-Driven Generation", sec. 4.2). Plain torch and Pillow.

Prior preservation: the base model draws images of the class prompt ("a photo of a dog") once, before any
fine-tuning, and every training batch holds instance images (the subject, "a photo of sks dog") and as many of
those class images, the loss being instance MSE + w * prior MSE (`prior_weights` gives each sample its share).

The class images of one prompt live in a folder keyed by what decides them (`class_key`): the base model (its
description and a checksum of its weights, adapters left out), the prompt, the sampler and its settings, the
guidance scale. Image i is drawn from seed `CLASS_SEED + i`, so it is the same whatever the count: a folder of 200
serves a run asking for 100 (its first 100), and a run asking for more tops it up. `class_images` writes them one by
one (`diffusion.files.atomic_write`), so an interrupted generation resumes at the first missing image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion.errors import ConfigError
from diffusion.files import atomic_write, remove_stale_temps, write_bytes

log = logging.getLogger(__name__)
CLASS_SEED = 1_000_000  # class image i starts from seed CLASS_SEED + i: not the noise sample.py draws by default
KEY_FILE = "key.json"  # in a class folder: what its images were drawn with (human-readable; the name holds the hash)


def image_name(i: int) -> str:
    return f"{i:06d}.png"


def weights_fingerprint(*modules: nn.Module) -> str:
    """A checksum of the modules' weights that leaves LoRA adapters out ("lora_" in the name): the same for a base
    model before and after adapters are added. Each tensor contributes its name, shape, dtype and a strided sample
    of at most 4096 of its values (exact bytes, so the checksum does not depend on a reduction order): any
    training changes nearly every value, and a multi-billion-parameter network is read in a blink."""
    h = hashlib.sha256()
    for m, module in enumerate(modules):
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if "lora_" in name:
                continue
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].cpu().contiguous()
            h.update(f"{m} {name} {list(t.shape)} {t.dtype}".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()


def sampler_settings(sampler: Callable) -> dict:
    """A sampler bound with its options (`functools.partial`, as the config builds it) as plain values."""
    func = getattr(sampler, "func", sampler)
    options = dict(getattr(sampler, "keywords", {}) or {})
    name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
    return {
        "sampler": name,
        **{k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v) for k, v in sorted(options.items())},
    }


def class_key(*, model, prompt: str, sampler: Callable, guidance: float) -> dict:
    """What decides the class images of `prompt` (plain values): the base model (description and weights), the
    sampler and its settings, the guidance scale, the seeds. The count is not part of it (see the module docstring)."""
    from diffusion.finetune import LoRANet
    from diffusion.networks import describe_net

    net = model.net.net if isinstance(model.net, LoRANet) else model.net
    net_description = model.net.config["base"] if isinstance(model.net, LoRANet) else describe_net(net)
    conditioning = model.conditioning.describe().get("config", {})
    return {
        "prompt": prompt,
        "net": net_description,
        "process": model.process.description(),
        "text_encoder": conditioning.get("encoder"),
        "codec": dict(model.codec.config),
        "weights": weights_fingerprint(net, model.conditioning),
        **sampler_settings(sampler),
        "guidance": float(guidance),
        "seed": CLASS_SEED,
    }


def class_folder(root: str | Path, key: dict) -> Path:
    """`root/<prompt as a slug>-<hash of key>`: one folder per prompt and everything else that decides the images."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "_", str(key["prompt"]).lower()).strip("_")[:48] or "empty"
    return Path(root).expanduser() / f"{slug}-{digest}"


def count_class_images(folder: Path) -> int:
    """How many class images `folder` holds: 000000.png, 000001.png, ... up to the first missing one (each was
    written whole or not at all)."""
    n = 0
    while (folder / image_name(n)).is_file():
        n += 1
    return n


def class_images(
    model,
    *,
    folder: Path,
    key: dict,
    count: int,
    sampler: Callable,
    guidance: float,
    batch_size: int = 4,
    precision: str = "fp32",
) -> int:
    """Make sure `folder` holds `count` class images of `key["prompt"]` drawn by `model` (`DiffusionModel.generate`);
    returns how many it generated (0 when the folder already had them). Image i starts from seed CLASS_SEED + i and
    is written as soon as its batch is drawn, so a generation stopped at any point resumes where it stopped."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)  # an image whose write was killed half-way: drawn again below
    if not (folder / KEY_FILE).is_file():
        write_bytes(folder / KEY_FILE, (json.dumps(key, indent=2, sort_keys=True, default=str) + "\n").encode())
    have = count_class_images(folder)
    prompt = key["prompt"]
    if have >= count:
        log.info(f"class images of {prompt!r}: using {count} of the {have} in {folder}")
        return 0
    log.info(f"class images of {prompt!r}: {have} of {count} in {folder}; drawing {count - have} with the base model")
    from PIL import Image

    for lo in range(have, count, batch_size):
        index = list(range(lo, min(lo + batch_size, count)))
        pixels = model.generate(
            [prompt] * len(index),
            seeds=[CLASS_SEED + i for i in index],
            sampler=sampler,
            guidance=guidance,
            precision=precision,
            batch_size=batch_size,
        )
        # [-1, 1] -> uint8 (N, H, W, C), rounded (as the entry points' `diffusion.generation.to_uint8`)
        unit = ((pixels.detach().float().cpu() + 1) / 2).clamp(0, 1)
        uint8 = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, img in zip(index, uint8, strict=True):
            image = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            atomic_write(folder / image_name(i), partial(image.save, format="PNG"))
        log.info(f"class images of {prompt!r}: {index[-1] + 1} of {count}")
    return count - have


def prior_weights(n_instance: int, n_prior: int, prior_loss_weight: float) -> Tensor:
    """Per-sample loss weights (n_instance + n_prior,) of a batch whose first n_instance samples are instance images
    and the rest class images: sum(weights * losses) = instance MSE + prior_loss_weight * prior MSE (the means of
    each part), DreamBooth's loss with prior preservation."""
    if n_instance < 1:
        raise ConfigError("a DreamBooth batch needs instance images")
    prior = [prior_loss_weight / n_prior] * n_prior if n_prior else []
    return torch.tensor([1.0 / n_instance] * n_instance + prior, dtype=torch.float32)
