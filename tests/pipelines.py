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


# --- SD3 and Flux (flow-matching transformers, 16-channel VAEs, CLIP + T5 text encoders) ---------------------------
FLOW_LATENT_CHANNELS = 16
T5_DIM = 32
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip


def tiny_t5(seed: int = 0):
    """A tiny T5EncoderModel and a T5 tokenizer built here from a word list (a Unigram vocabulary with scores, as
    T5's sentencepiece model holds; no download), padding with <pad> and ending each caption with </s>."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    words = ["a", "red", "blue", "digit", "photo", "of", "the", "sks", "dog"]
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in words] + [(c, -5.0) for c in chars]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(seed)
    model = T5EncoderModel(
        T5Config(
            vocab_size=len(vocab),
            d_model=T5_DIM,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )  # fmt: skip
    )
    return model, tokenizer


def tiny_clip(hidden: int, *, projection: int | None, seed: int):
    """A tiny CLIP text model (with a projection head when `projection` is set) and SD's tiny CLIP tokenizer."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=16)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config), tokenizer


def tiny_flow_vae(seed: int = 0):
    """A tiny AutoencoderKL with SD3 / Flux's 16 latent channels and their shift_factor and scaling_factor."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=FLOW_LATENT_CHANNELS, norm_num_groups=8, sample_size=16, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def save_tiny_sd3(folder: Path, seed: int = 0, *, t5: bool = True) -> Path:
    """Write a tiny StableDiffusion3Pipeline folder (CLIP-L 8 wide, CLIP-G 16 wide, T5 32 wide; without T5 when
    `t5` is false) and return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_l, tokenizer = tiny_clip(8, projection=8, seed=seed + 1)
    clip_g, tokenizer_2 = tiny_clip(16, projection=12, seed=seed + 2)
    text_encoder_3, tokenizer_3 = tiny_t5(seed + 3) if t5 else (None, None)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=FLOW_LATENT_CHANNELS, out_channels=FLOW_LATENT_CHANNELS,
        num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
        caption_projection_dim=16, pooled_projection_dim=20, pos_embed_max_size=16,
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=tiny_flow_vae(seed),
        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )  # fmt: skip
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def save_tiny_flux(folder: Path, seed: int = 0, *, guidance_embeds: bool = True) -> Path:
    """Write a tiny FluxPipeline folder (CLIP 16 wide, T5 32 wide; FLUX.1-dev's guidance embedding unless
    `guidance_embeds` is false) and return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip, tokenizer = tiny_clip(16, projection=None, seed=seed + 1)
    text_encoder_2, tokenizer_2 = tiny_t5(seed + 3)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * FLOW_LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=tiny_flow_vae(seed),
        text_encoder=clip, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )  # fmt: skip
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
