"""Tiny Stable Diffusion (and SDXL: `save_tiny_sdxl`) pipeline folders built from configs, for tests without downloads.

`save_tiny_sd(folder)` writes what `StableDiffusionPipeline.save_pretrained` writes for a real one (unet/, vae/,
text_encoder/, tokenizer/, scheduler/, model_index.json), with a few-thousand-parameter UNet2DConditionModel,
AutoencoderKL (one 2x downsampling, 4 latent channels) and CLIPTextModel, a CLIP tokenizer whose byte-level
vocabulary and merges are written here, and SD's scheduler config (scaled_linear, 0.00085 to 0.012, 1000 steps).
The folder is then loaded exactly as a user's pipeline folder is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LATENT_CHANNELS = 4
VAE_FACTOR = 2
CONTEXT_DIM = 32
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    set_alpha_to_one=False,
    steps_offset=1,
    skip_prk_steps=True,
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's printable stand-in for each of the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json (every byte alone and word-final, a few merged words, the two specials) and merges.txt."""
    chars = _bytes_to_unicode()
    words = ["a", "red", "blue", "digit", "photo", "of"]
    merges = ["r e", "re d</w>", "b l", "bl u", "blu e</w>", "o f</w>", "d i", "di g", "dig i", "digi t</w>"]
    tokens = [*chars, *(c + "</w>" for c in chars)]
    tokens += [m.replace(" ", "") for m in merges if m.replace(" ", "") not in tokens]
    tokens += [w + "</w>" for w in words if w + "</w>" not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def tiny_vae(**config):
    """A tiny AutoencoderKL: one 2x downsampling, 4 latent channels; `config` sets the rest (scaling_factor, ...)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=16,
        **config,
    )


def tiny_clip_config(tokenizer, width: int, *, layers: int, **extra):
    """A tiny CLIPTextConfig for `tokenizer`: `width` wide, `layers` deep, 16 positions."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_sd_parts(seed: int = 0, *, prediction_type: str = "epsilon") -> dict:
    """The parts of a tiny StableDiffusionPipeline, weights drawn from `seed`."""
    import tempfile

    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = tiny_vae(scaling_factor=0.18215)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, CONTEXT_DIM, layers=2))
    scheduler = PNDMScheduler(**{**SCHEDULER, "prediction_type": prediction_type})
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_tiny_sd(folder: Path, seed: int = 0, *, prediction_type: str = "epsilon") -> Path:
    """Write a tiny StableDiffusionPipeline folder (as `save_pretrained` does) and return it."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **tiny_sd_parts(seed, prediction_type=prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


# SDXL: two text encoders of different widths (so a wrong concatenation or pooled source shows), pooled projection
SDXL_WIDTHS = (32, 48)
SDXL_POOLED_DIM = 24
SDXL_TIME_EMBED_DIM = 8
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
)


def tiny_sdxl_parts(seed: int = 0) -> dict:
    """The parts of a tiny StableDiffusionXLPipeline, weights drawn from `seed`: a U-Net with SDXL's added
    embedding (addition_embed_type="text_time": the pooled text embedding and 6 time ids), CLIPTextModel and
    CLIPTextModelWithProjection with their tokenizers (the second pads with "!", as SDXL's does), a VAE with SDXL's
    scaling_factor and force_upcast, and SDXL's EulerDiscreteScheduler config."""
    import tempfile

    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(SDXL_WIDTHS),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_POOLED_DIM,
        norm_num_groups=8,
    )
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        files = (str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
        tokenizer = CLIPTokenizer(*files, model_max_length=16)
        tokenizer_2 = CLIPTokenizer(*files, model_max_length=16, pad_token="!")

    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, SDXL_WIDTHS[0], layers=3))
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_clip_config(tokenizer_2, SDXL_WIDTHS[1], layers=3, projection_dim=SDXL_POOLED_DIM)
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )


def save_tiny_sdxl(folder: Path, seed: int = 0, *, force_zeros_for_empty_prompt: bool = True) -> Path:
    """Write a tiny StableDiffusionXLPipeline folder (as `save_pretrained` does) and return it."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        **tiny_sdxl_parts(seed), force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
