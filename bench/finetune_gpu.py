"""Fine-tuning memory and speed of the real denoisers (SD 1.5's and SDXL's UNet, SD3-medium's and Flux-dev's
transformer) on one GPU: peak memory and images/s of a training step, LoRA rank 16 and full fine-tune, bf16,
gradient checkpointing on / off, 8-bit AdamW on / off; then diffusers' own LoRA example script on the same kind of
random SD 1.5 pipeline, for comparison.

The networks are built from their published diffusers configs (`CONFIGS`, as in each model's config.json) with
random weights: nothing is downloaded, and memory and speed do not depend on the weights' values. What is measured
is the denoiser's training step at native resolution on cached latents and cached text embeddings (random tensors
of the shapes the VAE and the text encoders give: what `codec=vae data.cache=true` and a text-embedding cache feed
it), which is what decides whether a fine-tune fits a card: the frozen VAE and text encoders are not built.
Precision follows the project's recommendations (docs/finetune.md, "Memory"): a full fine-tune keeps fp32 master
weights and runs the step under bf16 autocast (trainer.precision=bf16-mixed); LoRA keeps the frozen base in bf16
and the adapters in fp32 (trainer.precision=bf16-true with finetune.adapter_dtype=fp32). The adapters are our
`finetune=lora` ones (peft, on to_q / to_k / to_v / to_out.0) and the 8-bit AdamW our `optim=adamw8bit`.

    python bench/finetune_gpu.py --device cuda [--rows sd15-lora-gc,sdxl-full-gc-8bit ...] [--peer]
    python bench/finetune_gpu.py --tiny --device cpu --peer     (CPU dry run with tiny configs: checks it runs)

`--peer` also runs diffusers' examples/text_to_image/train_text_to_image_lora.py (../shared/peers/diffusers-examples)
on a saved SD 1.5 pipeline: the real UNet config with random weights, and, since the script needs the whole
pipeline, a VAE of the same 8x factor and a 768-wide CLIP text encoder built at reduced size (2 layers, narrow
channels), with a folder of random images. Peak memory comes from torch.cuda.max_memory_allocated in the script's
process and images/s from the optimizer steps' times (torch's optimizer step hook), after `--warmup` steps.
Rows that run out of memory are reported as OOM. Prints one line per row: name, params trained, peak GiB, images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# diffusers' example scripts: $DIFFUSERS_EXAMPLES (a copy carried to a device machine, where ../shared does not
# travel), else the checkout's shared/peers, else the one beside it
_PEER_PLACES = [
    ROOT / "shared" / "peers" / "diffusers-examples",
    ROOT.parent / "shared" / "peers" / "diffusers-examples",
]
PEERS = next((p for p in _PEER_PLACES if p.is_dir()), _PEER_PLACES[-1])

# The published configs (diffusers config.json), architecture keys only.
CONFIGS = {
    "sd15": (  # stable-diffusion-v1-5 unet/config.json: 860M parameters, 512 px -> 64x64x4 latents, CLIP-L 77x768
        "UNet2DConditionModel",
        dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            norm_num_groups=32,
        ),
    ),
    "sdxl": (  # stable-diffusion-xl-base-1.0 unet/config.json: 2.6B, 1024 px -> 128x128x4, CLIP-L + bigG 77x2048
        "UNet2DConditionModel",
        dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        ),
    ),
    "sd3": (  # stable-diffusion-3-medium transformer/config.json: 2B, 1024 px -> 128x128x16, 77+256 tokens x 4096
        "SD3Transformer2DModel",
        dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192,
        ),
    ),
    "flux": (  # FLUX.1-dev transformer/config.json: 11.9B, 1024 px -> 128x128x16 packed to 4096 x 64, T5 512 x 4096
        "FluxTransformer2DModel",
        dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=[16, 56, 56],
        ),
    ),
}  # fmt: skip
# The same layouts at a few thousand parameters, for --tiny (the CPU dry run).
TINY = {
    "sd15": dict(block_out_channels=[32, 64, 64, 64], attention_head_dim=4, cross_attention_dim=32, sample_size=8),
    "sdxl": dict(
        block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], cross_attention_dim=32,
        transformer_layers_per_block=[1, 1, 2], addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        sample_size=8,
    ),
    "sd3": dict(
        num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=32, sample_size=8, pos_embed_max_size=16,
    ),
    "flux": dict(
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
    ),
}  # fmt: skip
TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "sd3": 333, "flux": 512}  # cached text embedding length
LATENT = {"sd15": 64, "sdxl": 128, "sd3": 128, "flux": 128}  # latent side at native resolution (512 / 1024 px)
# name -> (model, method, gradient checkpointing, 8-bit AdamW); the default rows fit one ~8-minute device call.
ROWS = {
    "sd15-lora": ("sd15", "lora", False, False),
    "sd15-lora-gc": ("sd15", "lora", True, False),
    "sd15-full": ("sd15", "full", False, False),
    "sd15-full-gc": ("sd15", "full", True, False),
    "sd15-full-gc-8bit": ("sd15", "full", True, True),
    "sdxl-lora-gc": ("sdxl", "lora", True, False),
    "sdxl-full-gc": ("sdxl", "full", True, False),
    "sdxl-full-gc-8bit": ("sdxl", "full", True, True),
    "sd3-lora-gc": ("sd3", "lora", True, False),
    "sd3-full-gc-8bit": ("sd3", "full", True, True),
    "flux-lora": ("flux", "lora", False, False),
    "flux-lora-gc": ("flux", "lora", True, False),
}


def build(model: str, *, tiny: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The denoiser from its config, random weights, created directly on `device` in `dtype` (no CPU copy)."""
    import diffusers

    cls_name, config = CONFIGS[model]
    config = {**config, **(TINY[model] if tiny else {})}
    if tiny and model in ("sd15", "sdxl"):
        config["norm_num_groups"] = 8
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocated in `dtype` at once: Flux in fp32 first would take 48 GB
    try:
        with torch.device(device):
            return getattr(diffusers, cls_name).from_config(config)
    finally:
        torch.set_default_dtype(default)


def inputs(model: str, batch: int, *, tiny: bool, device: str, dtype: torch.dtype, net) -> dict:
    """Random stand-ins for the cached latents and text embeddings the network trains on (native shapes)."""
    g = torch.Generator(device).manual_seed(0)
    side = 8 if tiny else LATENT[model]
    tokens = 8 if tiny else TEXT_TOKENS[model]
    cfg = net.config

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    t = torch.randint(0, 1000, (batch,), generator=g, device=device)
    if model in ("sd15", "sdxl"):
        kw = dict(
            sample=rand(batch, 4, side, side),
            timestep=t,
            encoder_hidden_states=rand(batch, tokens, cfg.cross_attention_dim),
        )
        if model == "sdxl":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": rand(batch, pooled), "time_ids": rand(batch, 6)}
        return kw
    if model == "sd3":
        return dict(
            hidden_states=rand(batch, 16, side, side),
            timestep=t.float(),
            pooled_projections=rand(batch, cfg.pooled_projection_dim),
            encoder_hidden_states=rand(batch, tokens, cfg.joint_attention_dim),
        )
    packed = (side // 2) ** 2  # Flux packs 2x2 latent patches: (B, 16, h, w) -> (B, h/2 * w/2, 64)
    return dict(
        hidden_states=rand(batch, packed, 64),
        timestep=t.float() / 1000,
        guidance=torch.full((batch,), 3.5, device=device),
        pooled_projections=rand(batch, cfg.pooled_projection_dim),
        encoder_hidden_states=rand(batch, tokens, cfg.joint_attention_dim),
        txt_ids=torch.zeros(tokens, 3, device=device),
        img_ids=torch.zeros(packed, 3, device=device),
    )


def measure(name: str, *, tiny: bool, device: str, batch: int, steps: int, warmup: int) -> dict:
    """One row: build, adapt, train `warmup + steps` steps; peak memory and images/s over the last `steps`."""
    from peft import LoraConfig, inject_adapter_in_model

    from diffusion.module import adamw8bit

    model, method, gc, eight_bit = ROWS[name]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # LoRA: bf16 frozen base, fp32 adapters (bf16-true + adapter_dtype=fp32); full: fp32 master weights (bf16-mixed)
    net = build(model, tiny=tiny, device=device, dtype=torch.bfloat16 if method == "lora" else torch.float32)
    if method == "lora":
        net.requires_grad_(False)
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=targets), net)
        for p in net.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if gc:
        net.enable_gradient_checkpointing()
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = adamw8bit(params, lr=1e-5) if eight_bit else torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    kw = inputs(model, batch, tiny=tiny, device=device, dtype=torch.bfloat16, net=net)
    target = next(iter(kw.values()))
    times = []
    for _ in range(warmup + steps):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = net(**kw, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    rate = batch * steps / (times[-1] - times[warmup - 1]) if warmup else batch * steps / (times[-1] - times[0])
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    trained = sum(p.numel() for p in params)
    return dict(row=name, trained_params=trained, peak_gib=round(peak, 2), images_per_s=round(rate, 2))


def run_row(name: str, args) -> dict:
    try:
        return measure(name, tiny=args.tiny, device=args.device, batch=args.batch, steps=args.steps, warmup=args.warmup)
    except torch.OutOfMemoryError:
        return dict(row=name, trained_params=None, peak_gib="OOM", images_per_s=None)
    finally:
        if args.device == "cuda":
            torch.cuda.empty_cache()


# --- diffusers' example script on a saved random SD 1.5 pipeline ------------------------------------------
def save_sd15_pipeline(folder: Path, *, tiny: bool) -> None:
    """SD 1.5's UNet (its config, random weights) with a reduced VAE (same 8x factor, 4 latent channels) and a
    reduced 768-wide CLIP text encoder (2 layers), saved as a StableDiffusionPipeline folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.pipelines import write_tokenizer_files

    torch.manual_seed(0)
    unet = build("sd15", tiny=tiny, device="cpu", dtype=torch.float32)
    width = unet.config.cross_attention_dim
    blocks = 2 if tiny else 4  # 2^(blocks-1): 2x for the tiny UNet's 8x8 latents of 16 px, 8x at 512 px
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=[32] * blocks, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    )  # fmt: skip
    write_tokenizer_files(folder / "tok_src")
    tokenizer = CLIPTokenizer(
        str(folder / "tok_src" / "vocab.json"), str(folder / "tok_src" / "merges.txt"), model_max_length=77
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=4 * width if not tiny else 64,
            num_attention_heads=8 if not tiny else 4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(folder / "pipeline"))


def write_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "a photo of a red digit"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


# Runs the example in this process's child with two hooks: optimizer step times and the peak memory at exit.
_PEER_RUNNER = """
import atexit, json, runpy, sys, time, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
times = []
def hook(opt, args, kwargs):
    if torch.cuda.is_available(): torch.cuda.synchronize()
    times.append(time.perf_counter())
register_optimizer_step_post_hook(hook)
def report():
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float('nan')
    print('PEER ' + json.dumps({'times': times, 'peak_gib': peak}), flush=True)
atexit.register(report)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name='__main__')
"""


def run_peer(args, work: Path) -> dict:
    """diffusers' train_text_to_image_lora.py (rank 16, bf16, 8-bit Adam and checkpointing as in `--rows`' first
    sd15 LoRA row: off) on the saved pipeline; images/s over the steps after `--warmup`."""
    tiny = args.tiny
    save_sd15_pipeline(work, tiny=tiny)
    size = 16 if tiny else 512
    write_images(work / "images", n=args.batch * (args.warmup + args.steps + 1), size=size)
    script = Path(os.environ.get("DIFFUSERS_EXAMPLES") or PEERS) / "text_to_image_train_text_to_image_lora.py"
    cmd = [
        sys.executable, "-c", _PEER_RUNNER, str(script),
        f"--pretrained_model_name_or_path={work / 'pipeline'}", f"--train_data_dir={work / 'images'}",
        f"--resolution={size}", f"--train_batch_size={args.batch}", f"--max_train_steps={args.warmup + args.steps}",
        "--rank=16", "--learning_rate=1e-4", f"--output_dir={work / 'out'}", "--checkpointing_steps=100000",
        "--dataloader_num_workers=0", "--seed=0", "--caption_column=text",
    ]  # fmt: skip
    cmd += ["--mixed_precision=bf16"] if args.device == "cuda" else ["--mixed_precision=no"]
    env = {**os.environ, "WANDB_MODE": "offline", "ACCELERATE_USE_CPU": "1" if args.device == "cpu" else "0"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.peer_timeout)
    line = next((x for x in result.stdout.splitlines() if x.startswith("PEER ")), None)
    if result.returncode != 0 or line is None:
        tail = (result.stderr or result.stdout)[-1500:]
        return dict(row="diffusers-sd15-lora", trained_params=None, peak_gib="failed", images_per_s=None, error=tail)
    data = json.loads(line[5:])
    times = data["times"]
    w = min(args.warmup, len(times) - 2)
    rate = args.batch * (len(times) - 1 - w) / (times[-1] - times[w]) if len(times) > w + 1 else float("nan")
    peak = data["peak_gib"]
    return dict(row="diffusers-sd15-lora", trained_params=None, peak_gib=round(peak, 2), images_per_s=round(rate, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU dry run)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peer", action="store_true", help="also run diffusers' LoRA example script")
    parser.add_argument("--peer-timeout", type=int, default=240)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    names = [r for r in args.rows.split(",") if r]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    rows = []
    print(f"{'row':<22} {'trained params':>15} {'peak GiB':>9} {'images/s':>9}", flush=True)
    todo = [*names, "peer"] if args.peer else names
    for name in todo:
        if name == "peer":
            with tempfile.TemporaryDirectory() as work:
                row = run_peer(args, Path(work))
        else:
            row = run_row(name, args)
        rows.append(row)
        trained = f"{row['trained_params']:,}" if row["trained_params"] else "-"
        print(f"{row['row']:<22} {trained:>15} {row['peak_gib']!s:>9} {row['images_per_s']!s:>9}", flush=True)
        if row.get("error"):
            print(row["error"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
