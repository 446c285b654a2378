"""Stable Diffusion-class pipeline folders: load their parts as the project's seams.

A `StableDiffusionPipeline` folder (written by `save_pretrained`, or a Hub id such as
`stable-diffusion-v1-5/stable-diffusion-v1-5`) holds unet/, vae/, text_encoder/, tokenizer/ and scheduler/.
`model.pretrained=<folder or id>` (e.g. `experiment=sd_lora`) takes each part where it goes:
the UNet2DConditionModel is the network (`diffusion.diffusers_unet.DiffusersCondUNet`), the VAE is the codec
(`diffusion.codec.VAECodec`), and the scheduler's config is the noise schedule (`schedule_from_pipeline`: its
num_train_timesteps, beta schedule and endpoints, and prediction type, so training matches the base model).
`load_component` is the one loader of a part: a local folder (the part's own folder, or a pipeline folder with
the part in its subfolder) or a Hub id, with one-line errors. SD3 / Flux pipelines (a FlowMatchEulerDiscreteScheduler)
give the flow process instead (`flow_from_pipeline`, `process=pretrained_flow`): its time scale and shift.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from diffusion.errors import BadFileError, ConfigError, MissingPathError, PathError
from diffusion.optional import import_diffusers
from diffusion.process.discrete import NoiseSchedule

# diffusers' beta_schedule -> ours; prediction_type -> ours
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _diffusers_class(name: str):
    # a pipeline's parts need transformers too (its text encoders): the "text" extra installs both
    return getattr(import_diffusers("a diffusers pipeline (model.pretrained, codec=vae)", extra="text"), name)


def load_component(
    cls: Any, pretrained: str, *, subfolder: str, key: str, config_name: str = "config.json", **kwargs: Any
):
    """`cls.from_pretrained(..., **kwargs)` (a diffusers or transformers class, or a diffusers class name) on a local
    folder (the part's folder, or a pipeline folder holding it in `subfolder`) or a Hub id; one-line errors name
    `key`."""
    cls = _diffusers_class(cls) if isinstance(cls, str) else cls
    extra = {"low_cpu_mem_usage": False, **kwargs} if cls.__module__.startswith("diffusers") else kwargs
    path = Path(pretrained).expanduser()
    if path.is_dir():
        for folder in (path, path / subfolder):
            if (folder / config_name).is_file():
                return cls.from_pretrained(str(folder), **extra)
        raise MissingPathError(
            f"{key}={pretrained} holds no {config_name} (nor {subfolder}/{config_name}): "
            "not a folder written by save_pretrained"
        )
    if path.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise MissingPathError(f"{key}={pretrained} is not a folder written by save_pretrained")
    offline = _offline()
    errors = []
    for sub in (None, subfolder):  # model repos keep the part at the root, pipeline repos in its subfolder
        try:
            return cls.from_pretrained(pretrained, subfolder=sub, local_files_only=offline, **extra)
        except Exception as e:  # noqa: BLE001 - report the Hub's reason in one line below
            errors.append(" ".join(str(e).split())[:200] or type(e).__name__)
    where = "offline (HF_HUB_OFFLINE is set) and not in the local Hugging Face cache" if offline else errors[0]
    raise PathError(
        f"{key}={pretrained}: could not load it from the Hugging Face Hub ({where}); download it once "
        "while online, or pass a local folder written by save_pretrained"
    )


# model_index.json's _class_name -> the pipeline kind; each kind's parts go through the same seams
PIPELINE_KINDS = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
PipelineKind = Literal["sd", "sdxl", "sd3", "flux"]


def read_model_index(pretrained: str, *, key: str = "model.pretrained") -> dict:
    """A pipeline folder's or Hub id's model_index.json (its class and parts: `{"unet": ["diffusers", "UNet..."]}`);
    {} for a part's own folder (no model_index.json)."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return {}
        try:
            config = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise BadFileError(f"{index} is not a JSON object ({e})") from e
        if not isinstance(config, dict):
            raise BadFileError(f"{index} is not a JSON object")
        return config
    try:
        return dict(_diffusers_class("DiffusionPipeline").load_config(pretrained, local_files_only=_offline()))
    except Exception as e:  # noqa: BLE001 - report the Hub's reason in one line
        reason = " ".join(str(e).split())[:200]
        raise PathError(f"{key}={pretrained}: could not read its model_index.json ({reason})") from e


def pipeline_kind(pretrained: str, *, key: str = "model.pretrained", index: dict | None = None) -> PipelineKind:
    """Which pipeline a folder or Hub id holds, from its model_index.json (`_class_name`; `index`: that file, when
    read already); "sd" for a part's own folder (no model_index.json). A one-line error for a pipeline class this
    project does not fine-tune."""
    index = read_model_index(pretrained, key=key) if index is None else index
    if not index:
        return "sd"
    name = index.get("_class_name")
    if name not in PIPELINE_KINDS:
        raise ConfigError(f"{key}={pretrained} is a {name}; this project fine-tunes {', '.join(PIPELINE_KINDS)}")
    return PIPELINE_KINDS[name]


def read_scheduler_config(pretrained: str, *, key: str = "process.path") -> dict:
    """The scheduler config of a pipeline folder (scheduler/scheduler_config.json), a scheduler folder or a Hub id."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        for file in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
            if file.is_file():
                try:
                    return json.loads(file.read_text())
                except json.JSONDecodeError as e:
                    raise BadFileError(f"{file} is not JSON ({e})") from e
        raise MissingPathError(f"{key}={pretrained} holds no scheduler/scheduler_config.json")
    if path.exists() or pretrained.startswith((".", "/", "~")):
        raise MissingPathError(f"{key}={pretrained} is not a pipeline folder")
    try:
        return dict(_diffusers_class("DDPMScheduler").load_config(pretrained, subfolder="scheduler"))
    except Exception as e:  # noqa: BLE001
        reason = " ".join(str(e).split())[:200]
        raise PathError(f"{key}={pretrained}: could not read its scheduler config ({reason})") from e


def schedule_kwargs(config: dict, *, key: str = "process.path") -> dict:
    """NoiseSchedule arguments equal to a diffusers scheduler config (DDPM, DDIM, PNDM, Euler, ... share them)."""
    if config.get("trained_betas") is not None:
        raise ConfigError(f"{key}: the scheduler has trained_betas, which process=pretrained does not read")
    if config.get("rescale_betas_zero_snr"):
        raise ConfigError(f"{key}: rescale_betas_zero_snr=true is not supported")
    beta_schedule = config.get("beta_schedule", "linear")
    prediction_type = config.get("prediction_type", "epsilon")
    if beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"{key}: beta_schedule={beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
    if prediction_type not in PREDICTIONS:
        raise ConfigError(f"{key}: prediction_type={prediction_type!r} is not one of {', '.join(PREDICTIONS)}")
    num_steps = int(config.get("num_train_timesteps", 1000))
    kind = BETA_SCHEDULES[beta_schedule]
    scale = num_steps / 1000.0 if kind == "linear" else 1.0  # our linear betas are rescaled by 1000 / T
    return dict(
        kind=kind,
        num_steps=num_steps,
        prediction=PREDICTIONS[prediction_type],
        beta_start=float(config.get("beta_start", 0.0001)) * scale,
        beta_end=float(config.get("beta_end", 0.02)) * scale,
    )


def schedule_from_pipeline(*, path: str, min_snr_gamma: float | None = None) -> NoiseSchedule:
    """The noise schedule a pipeline was trained with (`process=pretrained`, path: usually ${model.pretrained})."""
    if path in (None, "", "???"):
        raise ConfigError("process=pretrained needs schedule.path (or model.pretrained) = a pipeline folder or Hub id")
    config = read_scheduler_config(str(path))
    if config.get("_class_name") == FLOW_SCHEDULER:
        raise ConfigError(
            f"process=pretrained: {path} is a flow-matching pipeline ({FLOW_SCHEDULER}); use process=pretrained_flow "
            "(experiment=sd3_lora / flux_lora set it)"
        )
    return NoiseSchedule(**schedule_kwargs(config), min_snr_gamma=min_snr_gamma)


# --- flow-matching pipelines (SD3, Flux) ----------------------------------------------------------------------------
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# options of FlowMatchEulerDiscreteScheduler that change its sigmas in ways the Flow process does not model
_FLOW_UNSUPPORTED = dict(invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
                         use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=False)  # fmt: skip


def read_part_config(path: Path, part: str, key: str) -> dict:
    """The config.json of a pipeline's part (a local folder or a Hub id)."""
    if not path.is_dir():
        try:
            return dict(_diffusers_class("DiffusionPipeline").load_config(str(path), subfolder=part))
        except Exception as e:  # noqa: BLE001 - report the Hub's reason in one line
            raise PathError(
                f"{key}={path}: could not read {part}/config.json ({' '.join(str(e).split())[:200]})"
            ) from None
    file = path / part / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError as e:
        raise MissingPathError(f"{key}={path} holds no {part}/config.json") from e
    except json.JSONDecodeError as e:
        raise BadFileError(f"{file} is not JSON ({e})") from e


def resolution_shift(config: dict, *, image_seq_len: int) -> float:
    """Flux's resolution-dependent shift: exp(mu), mu linear in the image's token count from (base_image_seq_len,
    base_shift) to (max_image_seq_len, max_shift), as FluxPipeline computes it; exp(mu) / (exp(mu) + 1 / t - 1),
    the scheduler's exponential time shift, is `shift_time(t, exp(mu))`."""
    lo, hi = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
    base, top = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    mu = base + (top - base) * (image_seq_len - lo) / (hi - lo)
    return math.exp(mu)


def flow_from_pipeline(
    *,
    path: str,
    image_size: int | None = None,
    t_sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    weighting: str = "none",
):
    """The flow process an SD3 / Flux pipeline was trained with (`process=pretrained_flow`), from its scheduler
    config (FlowMatchEulerDiscreteScheduler): the time scale (num_train_timesteps: the network is given 1000 t),
    the shift and whether training levels are shifted too (SD3: `shift`, applied to the scheduler's training grid;
    Flux, `use_dynamic_shifting`: training levels unshifted, sampling shifted by exp(mu) at `image_size`'s token
    count). The training distribution and loss weight are this run's choice (diffusers' weighting schemes)."""
    from diffusion.process.flow import Flow

    if path in (None, "", "???"):
        raise ConfigError("process=pretrained_flow needs process.path (or model.pretrained) = a pipeline folder")
    config = read_scheduler_config(str(path))
    if config.get("_class_name") != FLOW_SCHEDULER:
        raise ConfigError(
            f"process=pretrained_flow: {path}'s scheduler is a {config.get('_class_name')}, not a {FLOW_SCHEDULER}; "
            "use process=pretrained"
        )
    for name, default in _FLOW_UNSUPPORTED.items():
        if config.get(name, default) not in (default, None):
            raise ConfigError(f"process.path={path}: its scheduler sets {name}={config[name]}, which is not supported")
    if config.get("time_shift_type", "exponential") != "exponential":
        raise ConfigError(f"process.path={path}: time_shift_type={config['time_shift_type']!r} is not supported")
    if config.get("use_dynamic_shifting"):
        if not image_size:
            raise ConfigError("process=pretrained_flow: a resolution-shifted (Flux) scheduler needs process.image_size")
        blocks = read_part_config(Path(str(path)).expanduser(), "vae", "process.path")["block_out_channels"]
        factor = 2 ** (len(blocks) - 1) * 2  # the VAE's downsampling, then Flux's 2x2 patches
        shift, train_shift = resolution_shift(config, image_seq_len=(int(image_size) // factor) ** 2), False
    else:
        shift, train_shift = float(config.get("shift", 1.0)), True
    return Flow(
        t_sampling=t_sampling,
        logit_mean=logit_mean,
        logit_std=logit_std,
        shift=shift,
        time_scale=float(config.get("num_train_timesteps", 1000)),
        mode_scale=mode_scale,
        weighting=weighting,
        train_shift=train_shift,
    )
