"""Stable Diffusion-class pipelines: a tiny pipeline folder (tests/pipelines.py) fine-tuned with experiment=sd_lora /
sd_full through train.py, sampled with sample.py prompt=..., exported with export.py and reloaded in diffusers."""

import json

import pytest
import torch

from diffusion.checkpoint import read_checkpoint
from diffusion.model import DiffusionModel
from diffusion.samplers import ddim_sample
from tests.conftest import run_cli, run_train, write_image
from tests.pipelines import save_tiny_sd

PROMPTS = ["a red digit", "a blue digit", "a photo of a digit"]


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioned") / "images"
    rows = []
    for i in range(6):
        write_image(root / f"{i}.png", (20, 20), seed=i)
        rows.append({"file_name": f"{i}.png", "text": PROMPTS[i % 3]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def sd_overrides(experiment: str, pipeline, images) -> list[str]:
    return [
        f"experiment={experiment}",
        f"model.pretrained={pipeline}",
        f"data.path={images}",
        "data.image_size=16",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.val_fraction=0.34",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "+trainer.limit_val_batches=1",
        "sampler.steps=2",
        "callbacks.sample_grid.num_images=2",
        "callbacks.sample_grid.every_n_steps=0",
        "logger=none",
        "optim.lr=1e-2",
    ]


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 500]), torch.randn(2, 16, 32, generator=g)


@pytest.mark.slow
def test_sd_lora_train_sample_export_reloads_in_diffusers(tmp_path, sd_pipeline, captioned):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    run_train(run, sd_overrides("sd_lora", sd_pipeline, captioned), tiny=False)
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    # 1. only the adapters are saved, trained and optimized; the base is named by its folder
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])
    assert sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"]) == len(ckpt["state_dict"])
    description = ckpt["diffusion"]
    assert description["net"]["config"]["source"] == {"kind": "pretrained", "path": str(sd_pipeline.resolve())}
    assert description["codec"]["path"] == str(sd_pipeline)
    assert description["process"]["kind"] == "scaled_linear" and description["process"]["beta_end"] == 0.012
    # 2. the base U-Net is bit-identical after training
    ours = DiffusionModel.from_checkpoint(ckpt_path, use_ema=False)
    base = StableDiffusionPipeline.from_pretrained(str(sd_pipeline), safety_checker=None)
    base_state = base.unet.state_dict()
    for name, value in ours.net.net.unet.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(value, base_state[name.replace(".base_layer", "")], rtol=0, atol=0)
    # 3. sample.py with a prompt decodes through the VAE
    out = tmp_path / "samples"
    result = run_cli(
        "sample.py",
        f"ckpt={run}",
        "n=2",
        f"out={out}",
        'prompt="a red digit"',
        "sampler=ddim",
        "sampler.steps=2",
        "device=cpu",
        "progress=false",
        "use_ema=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    with Image.open(out / "images" / "000000.png") as img:
        assert img.size == (16, 16) and img.mode == "RGB"  # pixels, decoded from 8x8 latents
    # 4. export.py format=lora loads into the diffusers pipeline with the same U-Net outputs
    lora_dir = tmp_path / "lora"
    result = run_cli("export.py", f"ckpt={ckpt_path}", f"out={lora_dir}", "format=lora", "use_ema=false")
    assert result.returncode == 0, result.stderr[-3000:]
    base.load_lora_weights(str(lora_dir))
    x, t, context = unet_inputs()
    with torch.no_grad():
        theirs = base.unet(x, t, encoder_hidden_states=context).sample
        mine = ours.net(x, t, context=context)
        plain = (
            StableDiffusionPipeline.from_pretrained(str(sd_pipeline), safety_checker=None)
            .unet(x, t, encoder_hidden_states=context)
            .sample
        )
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5)
    assert (mine - plain).abs().max() > 1e-4  # the adapters changed something, and the export carries it
    # 5. export.py format=pipeline merges the adapters: a plain pipeline folder (no adapter modules), same outputs
    merged_dir = tmp_path / "merged"
    result = run_cli("export.py", f"ckpt={ckpt_path}", f"out={merged_dir}", "format=pipeline", "use_ema=false")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = StableDiffusionPipeline.from_pretrained(str(merged_dir), safety_checker=None)
    assert not any("lora" in k for k in merged.unet.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged.unet(x, t, encoder_hidden_states=context).sample, mine, rtol=1e-4, atol=1e-5)
    # 6. resume: the base again from its folder, the adapters and their optimizer state from the checkpoint; the
    # adapters at step 3 equal those of an uninterrupted 3-step run bit for bit
    three = ["trainer.max_steps=3"]
    run_train(run, [*sd_overrides("sd_lora", sd_pipeline, captioned), *three, f"ckpt_path={run}"], tiny=False)
    straight = tmp_path / "straight"
    run_train(straight, [*sd_overrides("sd_lora", sd_pipeline, captioned), *three], tiny=False)
    resumed, uninterrupted = (read_checkpoint(r / "checkpoints" / "last.ckpt") for r in (run, straight))
    assert resumed["global_step"] == uninterrupted["global_step"] == 3
    assert resumed["state_dict"].keys() == uninterrupted["state_dict"].keys() == ckpt["state_dict"].keys()
    for key, value in resumed["state_dict"].items():
        torch.testing.assert_close(value, uninterrupted["state_dict"][key], rtol=0, atol=0)


@pytest.mark.slow
def test_sd_full_export_pipeline_matches_our_unet_and_ddim(tmp_path, sd_pipeline, captioned):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    run = tmp_path / "run"
    run_train(run, sd_overrides("sd_full", sd_pipeline, captioned), tiny=False)
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    assert not any(k.startswith(("codec.", "conditioning.")) for k in ckpt["state_dict"])  # named, not copied
    out = tmp_path / "exported"
    result = run_cli("export.py", f"ckpt={ckpt_path}", f"out={out}", "format=pipeline")
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    ours = DiffusionModel.from_checkpoint(ckpt_path)
    # 1. one U-Net forward with the same latents, timestep and prompt embeddings
    x, t, context = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.unet(x, t, encoder_hidden_states=context).sample, ours.net(x, t, context=context), rtol=1e-5, atol=1e-6
        )
    # 2. a few DDIM steps: the pipeline's scheduler (as DDIM, trailing spacing, final alpha 1, latents not clipped)
    # vs our ddim_sample
    scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False
    )
    scheduler.set_timesteps(4)
    latents = x
    with torch.no_grad():
        for step in scheduler.timesteps:
            eps = pipe.unet(latents, step, encoder_hidden_states=context).sample
            latents = scheduler.step(eps, step, latents).prev_sample
        mine = ddim_sample(lambda z, s: ours.net(z, s, context=context), ours.process, x, steps=4, clip_x0=False)
    torch.testing.assert_close(mine, latents, rtol=1e-4, atol=1e-4)
    # 3. the scheduler read from the folder is diffusers' own
    torch.testing.assert_close(ours.process.alpha_bar, pipe.scheduler.alphas_cumprod.float(), rtol=1e-6, atol=1e-7)
    # 4. format=lora of a full fine-tune is refused in one line
    result = run_cli("export.py", f"ckpt={ckpt_path}", f"out={tmp_path / 'x'}", "format=lora")
    assert result.returncode == 1 and "format=lora needs a LoRA fine-tune" in result.stderr
