"""Export a trained checkpoint for use outside this project: a diffusers pipeline folder or plain safetensors.

- `diffusers`: for diffusers-backed networks (`model=diffusers_unet`), a `DDPMPipeline` folder: unet/ (config.json
  and weights) and scheduler/, the diffusers scheduler that defines our process (`Process.diffusers_scheduler`):
  - discrete: a `DDPMScheduler` config that reproduces our schedule exactly (`trained_betas`, the prediction type,
    x0 clipping, beta-tilde posterior variance). `DDPMPipeline.from_pretrained(DIR)` run with
    `num_inference_steps` = the schedule's num_steps is our DDPM sampler (Ho et al. 2020, Algorithm 2).
  - edm: an `EDMEulerScheduler` (sigma_data, sigma_min, sigma_max, rho, "epsilon" = EDM's F preconditioning):
    the scheduler loop (x = sigma_max noise, `scale_model_input`, unet, `step`) is our `euler_sample` on the
    Karras grid. `DDPMPipeline.__call__` itself neither scales the inputs nor the starting noise, so for EDM run
    that loop with the folder's unet and scheduler (docs/sampling.md shows it).
  - flow: a `FlowMatchEulerDiscreteScheduler` (shift, num_train_timesteps = the network's time scale):
    `set_timesteps(sigmas=1 - i / steps)` and the loop are our `euler_sample`; `DDPMPipeline.__call__` runs the
    same Euler steps on diffusers' own grid, which ends at t = shift(1/1000) instead of stepping evenly to 0.
  For a DiT (`model=dit_*`, `diffusion.dit`) without cross-attention: `transformer/`, a `DiTTransformer2DModel`
  holding our weights (its outputs equal ours), and `scheduler/` as above; `DiTPipeline` needs a VAE and eps
  prediction besides, so the folder is its parts, not a pipeline (docs/dit.md shows the loop).
- `lora`: for LoRA fine-tunes of a Stable Diffusion-class U-Net (`experiment=sd_lora` / `sdxl_lora`), the adapters
  in diffusers' LoRA format (`pytorch_lora_weights.safetensors`, peft's state dict converted with diffusers'
  `convert_state_dict_to_diffusers`, written by the base pipeline class's `save_lora_weights`); it loads with
  `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`) `.from_pretrained(BASE).load_lora_weights(DIR)`.
  A LoRA alpha other than the rank is folded into the up-projection (B), since the file carries no alpha. Adapters
  on the text encoder (`dreambooth.train_text_encoder`) go in the same file under `text_encoder.`, as diffusers'
  DreamBooth script saves them.
- `pipeline`: for fine-tunes of Stable Diffusion-class U-Nets (`experiment=sd_full` / `sd_lora` / `sdxl_*`), a
  complete pipeline folder of the base's class (`save_pretrained`: StableDiffusionPipeline or
  StableDiffusionXLPipeline): our U-Net with the base pipeline's VAE, text encoders, tokenizers and scheduler (the
  base is the folder / Hub id the checkpoint's codec names). A LoRA fine-tune's adapters are merged into the base
  U-Net first (diffusers' `fuse_lora`: W + (alpha / r) B A), so the folder needs no adapter code to load.
- `lora` / `pipeline` for SD3 and Flux fine-tunes (`experiment=sd3_*` / `flux_*`): the adapters as the transformer's
  peft state dict saved by `StableDiffusion3Pipeline` / `FluxPipeline.save_lora_weights` (their
  `load_lora_weights` reads it), or the whole pipeline folder with our transformer (adapters fused).
- `safetensors`: for any network, `model.safetensors` (the EMA weights, or the raw ones when the checkpoint
  has no EMA copy) and `config.json` (the model's self-description: network class and config, process,
  conditioning, codec, which weights, step), and for a jointly trained text encoder `conditioning.safetensors`
  (its tokenizer in the metadata). `DiffusionModel.from_export` rebuilds the model from such a folder.
- `ckpt`: `model.ckpt`, a slim checkpoint of this project (description, raw weights, and the exported weights
  as its `ema_state_dict`, no optimizer state) that sample.py, init_from and export.py read like any other.
Any format can carry a post-hoc EMA (`sigma_rel`, see `diffusion.posthoc`) instead of the stored one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Literal, get_args

import torch

from diffusion.checkpoint import EMA_KEY, read_checkpoint
from diffusion.errors import ConfigError, PathExistsError
from diffusion.files import atomic_write, write_bytes, write_folder
from diffusion.model import EXPORT_CONDITIONING, EXPORT_CONFIG, EXPORT_EXTRA_STATE, EXPORT_WEIGHTS, DiffusionModel
from diffusion.state import is_plain

log = logging.getLogger(__name__)
ExportFormat = Literal["diffusers", "safetensors", "ckpt", "lora", "pipeline"]
CKPT_NAME = "model.ckpt"


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PathExistsError(f"out={out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PathExistsError(f"out={out} is not empty; choose another folder or set overwrite=true")
    out.mkdir(parents=True, exist_ok=True)


def check_diffusers_exportable(model: DiffusionModel) -> None:
    """A ValueError unless diffusers has this network's class: a diffusers U-Net without class labels (for
    DDPMPipeline), or a DiT without cross-attention (DiTTransformer2DModel)."""
    from diffusion.diffusers_unet import DiffusersUNet
    from diffusion.dit import DiT, diffusers_config

    if isinstance(model.net, DiT):
        diffusers_config(model.net)  # a ConfigError where diffusers has no class with its architecture
        return
    if not isinstance(model.net, DiffusersUNet):
        instead = default_format(model)
        raise ConfigError(
            f"format=diffusers needs a diffusers-backed model (model=diffusers_unet); this checkpoint holds "
            f"{type(model.net).__name__}: use format={instead if instead != 'diffusers' else 'safetensors'}"
        )
    if model.net.num_classes:
        raise ConfigError(
            f"format=diffusers: DDPMPipeline cannot pass class labels, and this model is class-conditional "
            f"(num_classes={model.net.num_classes}); use format=safetensors"
        )


def default_format(model: DiffusionModel) -> str:
    """What the checkpoint is, as an export format: `lora` for a LoRA fine-tune, `pipeline` for a full fine-tune of
    a pretrained Stable Diffusion pipeline, `diffusers` for an unconditional diffusers U-Net, else `safetensors`."""
    from diffusion.diffusers_unet import DiffusersCondUNet, DiffusersUNet
    from diffusion.dit import DiT, diffusers_config
    from diffusion.finetune import LoRANet

    if isinstance(model.net, LoRANet):
        return "lora"
    if isinstance(model.net, DiffusersCondUNet) and model.codec is not None and model.codec.config.get("kind") == "vae":
        return "pipeline"
    if flow_transformer(model) is not None and model.codec.config.get("kind") == "vae":
        return "pipeline"  # a full fine-tune of an SD3 / Flux transformer
    if isinstance(model.net, DiffusersUNet) and not model.net.num_classes:
        return "diffusers"
    if isinstance(model.net, DiT):
        try:
            diffusers_config(model.net)  # DiTTransformer2DModel; a text DiT (PixArt-style) has no diffusers twin
            return "diffusers"
        except ConfigError:
            return "safetensors"
    return "safetensors"


def export_diffusers(model: DiffusionModel, out: Path) -> None:
    """Write a DDPMPipeline folder for a diffusers-backed network; transformer/ + scheduler/ for a DiT."""
    from diffusion.dit import DiT, to_diffusers
    from diffusion.optional import import_diffusers

    check_diffusers_exportable(model)
    if isinstance(model.net, DiT):
        parts = {"transformer": to_diffusers(model.net), "scheduler": model.process.diffusers_scheduler()}
        write_folder(
            out, lambda folder: [part.save_pretrained(str(Path(folder) / name)) for name, part in parts.items()]
        )
        return
    pipeline = import_diffusers("format=diffusers").DDPMPipeline(
        unet=model.net.unet, scheduler=model.process.diffusers_scheduler()
    )
    write_folder(out, pipeline.save_pretrained)


def export_safetensors(model: DiffusionModel, out: Path) -> None:
    """Write model.safetensors (the loaded weights), config.json (how to rebuild the model) and, for a trained text
    encoder, conditioning.safetensors: all three or none."""
    write_folder(out, lambda folder: _safetensors_files(model, Path(folder)))


def _safetensors_files(model: DiffusionModel, out: Path) -> None:
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.net.state_dict().items()}
    write_bytes(out / EXPORT_WEIGHTS, save(state, metadata={"format": "pt", "weights": model.weights}))
    text_state = model.conditioning.state_dict()
    if text_state:  # a jointly trained text encoder (a frozen pretrained one is named in the description)
        tensors = {k: v.detach().contiguous().cpu() for k, v in text_state.items() if isinstance(v, torch.Tensor)}
        extra = {k: v for k, v in text_state.items() if not isinstance(v, torch.Tensor)}  # its tokenizer (JSON)
        if not is_plain(extra):
            raise ConfigError(f"format=safetensors: the conditioning's extra state {sorted(extra)} is not plain data")
        metadata = {"format": "pt", EXPORT_EXTRA_STATE: json.dumps(extra)}
        write_bytes(out / EXPORT_CONDITIONING, save(tensors, metadata=metadata))
    config = {**model.describe(), "weights": model.weights, "global_step": model.global_step}
    write_bytes(out / EXPORT_CONFIG, (json.dumps(config, indent=2) + "\n").encode())


def export_ckpt(model: DiffusionModel, out: Path, ckpt: dict) -> None:
    """Write model.ckpt: `ckpt`'s description and raw weights, with `model`'s weights as its EMA (unless raw)."""
    slim = {
        "diffusion": ckpt["diffusion"],
        "state_dict": ckpt["state_dict"],
        "global_step": model.global_step,
        "exported_weights": model.weights,
    }
    if model.weights != "raw":
        slim[EMA_KEY] = {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}
    atomic_write(out / CKPT_NAME, lambda f: torch.save(slim, f))


def sd_unet(model: DiffusionModel, format: str):
    """The (LoRANet or not) network's UNet2DConditionModel wrapper, or a ConfigError naming `format`."""
    from diffusion.diffusers_unet import DiffusersCondUNet
    from diffusion.finetune import LoRANet

    net = model.net.net if isinstance(model.net, LoRANet) else model.net
    if not isinstance(net, DiffusersCondUNet):
        raise ConfigError(
            f"format={format} needs a Stable Diffusion-class U-Net (experiment=sd_lora / sd_full); this checkpoint "
            f"holds {type(net).__name__}: use format=safetensors"
        )
    return net


def check_lora_exportable(model: DiffusionModel) -> None:
    from diffusion.finetune import LoRANet

    if flow_transformer(model) is None:
        sd_unet(model, "lora")
    if not isinstance(model.net, LoRANet):
        raise ConfigError("format=lora needs a LoRA fine-tune (finetune=lora); this one is full: use format=pipeline")


def check_pipeline_exportable(model: DiffusionModel) -> None:
    from diffusion.finetune import LoRANet

    if flow_transformer(model) is None:
        sd_unet(model, "pipeline")
    if isinstance(model.net, LoRANet) and model.net.config["source"].get("kind") != "pretrained":
        raise ConfigError("format=pipeline merges LoRA adapters into a pretrained pipeline's U-Net (model.pretrained)")
    if model.codec is None or model.codec.config.get("kind") != "vae":
        raise ConfigError("format=pipeline needs the checkpoint's VAE codec (codec=vae, as in experiment=sd_full)")


CHECKS = {"diffusers": check_diffusers_exportable, "lora": check_lora_exportable, "pipeline": check_pipeline_exportable}


def lora_layers(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """The adapters as diffusers' LoRA state dict of the UNet2DConditionModel (alpha / rank folded into B)."""
    from diffusion.optional import require

    convert_state_dict_to_diffusers = require("diffusers.utils", feature="format=lora").convert_state_dict_to_diffusers
    state = model.net.adapter_state_dict()  # peft keys of the adapter wrapper: "unet.<module>.lora_A.weight"
    scale = model.net.config["alpha"] / model.net.config["rank"]
    state = {k.removeprefix("unet."): (v * scale if ".lora_B." in k else v) for k, v in state.items()}
    return convert_state_dict_to_diffusers({k: v.detach().float().contiguous().cpu() for k, v in state.items()})


def pipeline_class(model: DiffusionModel):
    """(the diffusers pipeline class of the checkpoint's base: StableDiffusionPipeline or StableDiffusionXLPipeline,
    the keyword arguments its from_pretrained needs)."""
    from diffusion.finetune import LoRANet
    from diffusion.optional import import_diffusers
    from diffusion.pipeline import PIPELINE_KINDS, pipeline_kind

    source = model.net.config["source"] if isinstance(model.net, LoRANet) else {}
    base = source.get("path") if source.get("kind") == "pretrained" else None
    base = base or (model.codec.config.get("path") if model.codec is not None else None)
    kind = pipeline_kind(str(base), key="the checkpoint's base pipeline") if base else "sd"
    if kind not in ("sd", "sdxl"):
        raise ConfigError(f"format=lora / pipeline: the base pipeline {base} is {kind}, not a U-Net pipeline")
    name = {v: k for k, v in PIPELINE_KINDS.items()}[kind]
    # SD's pipeline has a safety checker that a fine-tune's folder leaves out; SDXL's has none
    parts = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) if kind == "sd" else {}
    return getattr(import_diffusers("format=lora / format=pipeline"), name), parts


def export_lora(model: DiffusionModel, out: Path) -> None:
    """Write the adapters as a diffusers LoRA folder (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`
    `.load_lora_weights(out)`; SD3 / Flux: `export_flow_lora`)."""
    if flow_transformer(model) is not None:
        return export_flow_lora(model, out)
    layers = lora_layers(model)
    text = {f"{name}_lora_layers": state for name, state in text_lora_layers(model).items()}
    pipeline, _ = pipeline_class(model)
    write_folder(
        out,
        lambda folder: pipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True, **text),
    )


def text_lora_layers(model: DiffusionModel) -> dict[str, dict[str, torch.Tensor]]:
    """The text encoder's LoRA adapters (dreambooth.train_text_encoder) in diffusers' format, by the text model's
    name in the pipeline ("text_encoder"); {} when the text encoder has none."""
    from diffusion.finetune import LoRATextEncoder

    encoder = getattr(model.conditioning, "encoder", None)
    return encoder.adapter_layers() if isinstance(encoder, LoRATextEncoder) else {}


def export_pipeline(model: DiffusionModel, out: Path) -> None:
    """Write a complete StableDiffusionPipeline (or StableDiffusionXLPipeline) folder: our U-Net and the base
    pipeline's other parts."""
    from diffusion.finetune import LoRANet

    if flow_transformer(model) is not None:
        return export_flow_pipeline(model, out)
    net = sd_unet(model, "pipeline")
    pipeline, parts = pipeline_class(model)
    if isinstance(model.net, LoRANet):  # the base U-Net with the adapters merged in
        base = model.net.config["source"]["path"]
        pipe = pipeline.from_pretrained(base, **parts)
        text = {f"{name}.{k}": v for name, state in text_lora_layers(model).items() for k, v in state.items()}
        pipe.load_lora_weights({**{f"unet.{k}": v for k, v in lora_layers(model).items()}, **text})  # as in a file
        if "unet" not in pipe.get_list_adapters():  # diffusers only warns when no key matched
            raise ConfigError(f"format=pipeline: diffusers took none of the adapters into the U-Net of {base}")
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # after fuse_lora: drops the adapter modules and keeps the merged weights
        merged = dict(unet=pipe.unet, text_encoder=pipe.text_encoder)  # the text encoder: its adapters merged too
        pipe = pipeline.from_pretrained(model.codec.config["path"], **merged, **parts)
    else:
        if text_lora_layers(model):
            raise ConfigError("format=pipeline of a full fine-tune with text encoder adapters: use format=lora")
        pipe = pipeline.from_pretrained(model.codec.config["path"], unet=net.unet, **parts)
    write_folder(out, lambda folder: pipe.save_pretrained(folder, safe_serialization=True))


# --- SD3 and Flux (diffusion.diffusers_transformer) -----------------------------------------------------------------
def flow_transformer(model: DiffusionModel):
    """The (LoRANet or not) network's SD3 / Flux transformer adapter, or None for any other network."""
    from diffusion.diffusers_transformer import FluxTransformer, SD3Transformer
    from diffusion.finetune import LoRANet

    net = model.net.net if isinstance(model.net, LoRANet) else model.net
    return net if isinstance(net, (SD3Transformer, FluxTransformer)) else None


def _flow_pipeline_class(model: DiffusionModel):
    from diffusion.diffusers_transformer import SD3Transformer
    from diffusion.optional import import_diffusers

    name = "StableDiffusion3Pipeline" if isinstance(flow_transformer(model), SD3Transformer) else "FluxPipeline"
    return getattr(import_diffusers("format=lora / format=pipeline"), name)


def flow_lora_layers(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """The adapters as the transformer's peft state dict (what diffusers' SD3 / Flux LoRA files hold under
    "transformer."), alpha / rank folded into B."""
    state = model.net.adapter_state_dict()  # "transformer.<module>.lora_A.weight"
    scale = model.net.config["alpha"] / model.net.config["rank"]
    state = {k.removeprefix("transformer."): (v * scale if ".lora_B." in k else v) for k, v in state.items()}
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def export_flow_lora(model: DiffusionModel, out: Path) -> None:
    """Write the adapters as a diffusers LoRA folder: `StableDiffusion3Pipeline` / `FluxPipeline`
    `.load_lora_weights(out)` reads it."""
    layers, pipeline = flow_lora_layers(model), _flow_pipeline_class(model)
    write_folder(
        out, lambda folder: pipeline.save_lora_weights(folder, transformer_lora_layers=layers, safe_serialization=True)
    )


def export_flow_pipeline(model: DiffusionModel, out: Path) -> None:
    """Write a complete StableDiffusion3Pipeline / FluxPipeline folder: our transformer (a LoRA fine-tune's adapters
    merged into the base's, W + (alpha / r) B A) with the base pipeline's VAE, text encoders, tokenizers and
    scheduler (the base is the folder / Hub id the checkpoint's codec names)."""
    from diffusion.finetune import LoRANet

    net, pipeline = flow_transformer(model), _flow_pipeline_class(model)
    if isinstance(model.net, LoRANet):  # the base transformer with the adapters merged in, as for SD
        base = model.net.config["source"]["path"]
        pipe = pipeline.from_pretrained(base, **_absent_parts(base))
        pipe.load_lora_weights({f"transformer.{k}": v for k, v in flow_lora_layers(model).items()})
        if "transformer" not in pipe.get_list_adapters():  # diffusers only warns when no key matched
            raise ConfigError("format=pipeline: diffusers took none of the adapters into the base transformer")
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # after fuse_lora: drops the adapter modules and keeps the merged weights
        transformer = pipe.transformer
    else:
        transformer = net.transformer
    base = model.codec.config["path"]
    pipe = pipeline.from_pretrained(base, transformer=transformer, **_absent_parts(base))
    write_folder(out, lambda folder: pipe.save_pretrained(folder, safe_serialization=True))


def _absent_parts(base: str) -> dict[str, None]:
    """SD3's optional T5 as None where a local pipeline folder was saved without it (from_pretrained needs it named)."""
    folder = Path(base).expanduser()
    if not folder.is_dir():
        return {}
    return {name: None for name in ("text_encoder_3", "tokenizer_3") if not (folder / name).is_dir()}


def export(
    ckpt: str | Path,
    out: str | Path,
    *,
    format: ExportFormat | None = None,
    use_ema: bool = True,
    overwrite: bool = False,
    sigma_rel: float | None = None,
    snapshots: str | Path | None = None,
) -> tuple[DiffusionModel, ExportFormat]:
    """Export checkpoint `ckpt` into folder `out` in `format` (None: `default_format`, what the checkpoint is);
    returns the model that was written and the format it was written in.

    `sigma_rel`: export the post-hoc EMA of that length, rebuilt from the run's snapshots (`snapshots`, default
    `<run>/ema_snapshots`) at the checkpoint's step, instead of the stored EMA. Each format's files are written
    into a fresh folder inside `out` and renamed into place at the end (`files.write_folder`): an export that fails
    leaves nothing behind (and `out` itself is removed again when this call created it).
    """
    from diffusion.posthoc import with_posthoc_ema

    if format is not None and format not in get_args(ExportFormat):
        raise ConfigError(f"format={format!r} is not one of {', '.join(map(repr, get_args(ExportFormat)))}")
    out = Path(out).expanduser()
    model = DiffusionModel.from_checkpoint(ckpt, use_ema=use_ema)
    model = with_posthoc_ema(model, ckpt, sigma_rel=sigma_rel, snapshots=snapshots, use_ema=use_ema)
    if format is None:
        format = default_format(model)
        log.info(f"format={format}: what this checkpoint is (another: format=safetensors|ckpt|...)")
    writer = {
        "diffusers": export_diffusers,
        "safetensors": export_safetensors,
        "ckpt": lambda model, out: export_ckpt(model, out, read_checkpoint(ckpt)),
        "lora": export_lora,
        "pipeline": export_pipeline,
    }[format]
    CHECKS.get(format, lambda model: None)(model)  # before touching `out`
    if out.exists() and not out.is_dir():
        raise PathExistsError(f"out={out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PathExistsError(f"out={out} is not empty; choose another folder or set overwrite=true")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        writer(model, out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # this call made it: nothing of the user's is in it
        raise
    return model, format
