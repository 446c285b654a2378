"""SD3 / Flux-class pipelines: tiny pipeline folders (tests/pipelines.py) whose text encoders, transformers, VAE and
scheduler are cross-checked against diffusers' pipelines, then fine-tuned with experiment=sd3_lora / sd3_full /
flux_lora through train.py, resumed, sampled with sample.py prompt=..., exported and reloaded in diffusers."""

import json
import math

import pytest
import torch

from diffusion.checkpoint import read_checkpoint
from diffusion.codec import VAECodec
from diffusion.diffusers_transformer import FluxTransformer, SD3Transformer, image_ids, pack_latents, unpack_latents
from diffusion.errors import ConfigError
from diffusion.model import DiffusionModel
from diffusion.pipeline import flow_from_pipeline, schedule_from_pipeline
from diffusion.process import Flow
from diffusion.text_encoders import PipelineTextEncoder
from tests.conftest import run_cli, run_train
from tests.pipelines import save_tiny_flux, save_tiny_sd3
from tests.test_sd import PROMPTS, captioned, sd_overrides  # noqa: F401 - captioned is a fixture

NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}  # how a pipeline saved without T5 loads


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipeline")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "pipeline")


@pytest.fixture(scope="module")
def images(captioned):  # noqa: F811 - the fixture imported above
    """test_sd.py's captioned image folder."""
    return captioned


# --- the parts against diffusers' pipelines -------------------------------------------------------------------------
@pytest.mark.parametrize("t5", [True, False])
def test_sd3_text_encoder_equals_pipeline_encode_prompt(tmp_path, t5):
    from diffusers import StableDiffusion3Pipeline

    folder = save_tiny_sd3(tmp_path / "sd3", t5=t5)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), **({} if t5 else NO_T5))
    prompts = [*PROMPTS, ""]
    with torch.no_grad():
        context, pooled = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)[::2]
    encoder = PipelineTextEncoder(pretrained=str(folder), max_length=256)
    ours, mask, our_pooled = encoder(prompts).values()
    assert context.shape == (4, 16 + 256, 32) and mask.all()
    torch.testing.assert_close(ours, context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_pooled, pooled, rtol=1e-5, atol=1e-5)
    assert encoder.pooled_dim == pooled.shape[1] == 20
    if t5:  # t5=false: T5's part is zeros, as a pipeline without text_encoder_3
        off = PipelineTextEncoder(pretrained=str(folder), t5=False)(prompts)["context"]
        torch.testing.assert_close(off[:, :16], ours[:, :16], rtol=0, atol=0)
        assert off.shape == ours.shape and not off[:, 16:].any() and ours[:, 16:].abs().sum() > 0


def test_flux_text_encoder_equals_pipeline_encode_prompt(flux):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux))
    with torch.no_grad():
        context, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=64)
    ours, mask, our_pooled = PipelineTextEncoder(pretrained=str(flux), max_length=64)(PROMPTS).values()
    torch.testing.assert_close(ours, context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_pooled, pooled, rtol=1e-5, atol=1e-5)
    assert mask.shape == (3, 64) and mask.all() and not text_ids.any()


def test_transformers_equal_diffusers_on_the_pipelines_inputs(sd3, flux):
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.9, 0.25])
    context, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 20, generator=g)
    # SD3: the pipeline's timestep is sigma * 1000
    ours = SD3Transformer(image_size=8, in_channels=16, pretrained=str(sd3))
    theirs = SD3Transformer2DModel.from_pretrained(str(sd3), subfolder="transformer")
    with torch.no_grad():
        expected = theirs(x, context, pooled, 1000 * t).sample
        torch.testing.assert_close(ours(x, 1000 * t, context=context, pooled=pooled), expected, rtol=1e-5, atol=1e-5)
    # Flux: packed 2x2 patches, position ids and guidance as FluxPipeline builds them, timestep sigma
    pooled = pooled[:, :16]
    ours = FluxTransformer(image_size=8, in_channels=16, pretrained=str(flux), guidance=3.5)
    theirs = FluxTransformer2DModel.from_pretrained(str(flux), subfolder="transformer")
    packed = FluxPipeline._pack_latents(x, 2, 16, 8, 8)
    torch.testing.assert_close(pack_latents(x), packed, rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 8, 8), x, rtol=0, atol=0)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    torch.testing.assert_close(image_ids(8, 8), ids, rtol=0, atol=0)
    with torch.no_grad():
        out = theirs(packed, context, pooled, t, ids, torch.zeros(5, 3), torch.full((2,), 3.5)).sample
        expected = FluxPipeline._unpack_latents(out, 16, 16, 2)
        torch.testing.assert_close(ours(x, 1000 * t, context=context, pooled=pooled), expected, rtol=1e-5, atol=1e-5)
        other = ours.guidance, ours.transformer.config.guidance_embeds
        ours.guidance = 1.0  # the embedded guidance reaches the transformer
        assert (ours(x, 1000 * t, context=context, pooled=pooled) - expected).abs().max() > 1e-4, other


def test_flow_process_from_the_schedulers(sd3, flux):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    # SD3: shift 3 on the sampling grid and on the training levels (the scheduler's training sigmas)
    process = flow_from_pipeline(path=str(sd3), weighting="cosmap")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(sd3), subfolder="scheduler")
    assert (process.shift, process.train_shift, process.time_scale) == (3.0, True, 1000.0)
    u = torch.linspace(1, 0, 11, dtype=torch.float64)[:-1]
    scheduler.set_timesteps(sigmas=u.numpy())
    torch.testing.assert_close(
        torch.tensor(process.sampling_levels(10, None, sampler="euler"), dtype=torch.float32), scheduler.sigmas[:-1]
    )
    train_sigmas = FlowMatchEulerDiscreteScheduler.from_pretrained(str(sd3), subfolder="scheduler").sigmas
    grid = torch.linspace(1, 0.001, 1000)  # u at the scheduler's training indices
    uniform = Flow(t_sampling="uniform", shift=3.0, train_shift=True)
    torch.testing.assert_close(uniform.quantile_levels(grid), train_sigmas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        process.loss_weight(train_sigmas), compute_loss_weighting_for_sd3("cosmap", train_sigmas)
    )
    sqrt = Flow(weighting="sigma_sqrt").loss_weight(train_sigmas)
    torch.testing.assert_close(sqrt, compute_loss_weighting_for_sd3("sigma_sqrt", train_sigmas))
    # SD3's mode sampling: diffusers' u, whose index reads the grid from sigma = 1 down, is 1 - our t
    mode = Flow(t_sampling="mode", mode_scale=1.29)
    ours = mode.draw_levels(4096, device=torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    theirs = compute_density_for_timestep_sampling(
        "mode", 4096, mode_scale=1.29, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(ours, 1 - theirs, rtol=1e-5, atol=1e-6)
    # a flow-matching pipeline is refused by process=pretrained, which names process=pretrained_flow
    with pytest.raises(ConfigError, match="use process=pretrained_flow"):
        schedule_from_pipeline(path=str(sd3))
    # Flux: training levels unshifted, sampling shifted by exp(mu) at the image's token count (16 px: 4x4 tokens)
    process = flow_from_pipeline(path=str(flux), image_size=16)
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)
    assert not process.train_shift and process.shift == pytest.approx(math.exp(mu))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(flux), subfolder="scheduler")
    scheduler.set_timesteps(sigmas=u.numpy(), mu=mu)
    torch.testing.assert_close(
        torch.tensor(process.sampling_levels(10, None, sampler="euler"), dtype=torch.float32), scheduler.sigmas[:-1]
    )


def test_vae_codec_shift_and_scale(sd3):
    from diffusers import AutoencoderKL

    codec = VAECodec(path=str(sd3), sample=False)
    vae = AutoencoderKL.from_pretrained(str(sd3), subfolder="vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    assert codec.latent_shape(3, 16) == (16, 8) and codec.shift_factor == pytest.approx(0.0609)
    torch.testing.assert_close(codec.encode(x), (mean - 0.0609) * 1.5305, rtol=1e-5, atol=1e-5)


# --- end to end through train.py, sample.py and export.py ---------------------------------------------------------
def overrides(experiment: str, pipeline, images, *extra: str) -> list[str]:
    """test_sd.py's tiny run, with T5 cut to 16 tokens."""
    return [*sd_overrides(experiment, pipeline, images), "conditioning.encoder.max_length=16", *extra]


def transformer_inputs(flux: bool):
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([900.0, 300.0])
    return x, t, torch.randn(2, 7, 32, generator=g), torch.randn(2, 16 if flux else 20, generator=g)


def diffusers_output(pipe, x, t, context, pooled):
    """The pipeline's transformer on our inputs, called as its pipeline calls it."""
    from diffusers import FluxPipeline

    with torch.no_grad():
        if not isinstance(pipe, FluxPipeline):
            return pipe.transformer(x, context, pooled, t).sample
        guidance = torch.full((2,), 3.5) if pipe.transformer.config.guidance_embeds else None
        ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
        out = pipe.transformer(FluxPipeline._pack_latents(x, 2, 16, 8, 8), context, pooled, t / 1000, ids,
                               torch.zeros(7, 3), guidance).sample  # fmt: skip
        return FluxPipeline._unpack_latents(out, 16, 16, 2)


def sample_cli(tmp_path, run):
    out = tmp_path / "samples"
    result = run_cli("sample.py", f"ckpt={run}", "n=2", f"out={out}", 'prompt="a red digit"', "sampler.steps=2",
                     "device=cpu", "progress=false", "use_ema=false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    with Image.open(out / "images" / "000000.png") as img:
        assert img.size == (16, 16) and img.mode == "RGB"  # pixels, decoded from 16-channel 8x8 latents


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_train_resume_sample_export_reloads_in_diffusers(tmp_path, kind, sd3, flux, images):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipeline, cls = (sd3, StableDiffusion3Pipeline) if kind == "sd3" else (flux, FluxPipeline)
    run = tmp_path / "run"
    run_train(run, overrides(f"{kind}_lora", pipeline, images), tiny=False)
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    # 1. only the adapters are saved; the base is named by its folder, the process read from its scheduler
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])
    assert any(".add_q_proj.lora_A" in k for k in ckpt["state_dict"])  # the text stream's projections too
    description = ckpt["diffusion"]
    assert description["net"]["config"]["source"] == {"kind": "pretrained", "path": str(pipeline.resolve())}
    assert description["process"]["family"] == "flow" and description["process"].get("train_shift", False) == (
        kind == "sd3"
    )
    # 2. sample.py with a prompt decodes through the 16-channel VAE
    sample_cli(tmp_path, run)
    # 3. export.py (default format: lora) loads into the diffusers pipeline with the same transformer outputs
    lora_dir = tmp_path / "lora"
    result = run_cli("export.py", f"ckpt={ckpt_path}", f"out={lora_dir}", "use_ema=false")
    assert result.returncode == 0, result.stderr[-3000:]
    ours = DiffusionModel.from_checkpoint(ckpt_path, use_ema=False)
    x, t, context, pooled = transformer_inputs(kind == "flux")
    with torch.no_grad():
        mine = ours.net(x, t, context=context, pooled=pooled)
    plain = diffusers_output(cls.from_pretrained(str(pipeline)), x, t, context, pooled)
    pipe = cls.from_pretrained(str(pipeline))
    pipe.load_lora_weights(str(lora_dir))
    torch.testing.assert_close(diffusers_output(pipe, x, t, context, pooled), mine, rtol=1e-4, atol=1e-4)
    assert (mine - plain).abs().max() > 1e-3  # the adapters changed something, and the export carries it
    # 4. format=pipeline merges them: a plain pipeline folder, the same outputs
    merged_dir = tmp_path / "merged"
    result = run_cli("export.py", f"ckpt={ckpt_path}", f"out={merged_dir}", "format=pipeline", "use_ema=false")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = cls.from_pretrained(str(merged_dir))
    assert not any("lora" in k for k in merged.transformer.state_dict())
    torch.testing.assert_close(diffusers_output(merged, x, t, context, pooled), mine, rtol=1e-4, atol=1e-4)
    # 5. resume to step 3 equals an uninterrupted 3-step run bit for bit
    three = "trainer.max_steps=3"
    run_train(run, [*overrides(f"{kind}_lora", pipeline, images, three), f"ckpt_path={run}"], tiny=False)
    straight = tmp_path / "straight"
    run_train(straight, overrides(f"{kind}_lora", pipeline, images, three), tiny=False)
    resumed, uninterrupted = (read_checkpoint(r / "checkpoints" / "last.ckpt") for r in (run, straight))
    assert resumed["global_step"] == uninterrupted["global_step"] == 3
    for key, value in resumed["state_dict"].items():
        torch.testing.assert_close(value, uninterrupted["state_dict"][key], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("t5", [True, False])
def test_sd3_full_exports_a_pipeline_with_our_transformer(tmp_path, sd3, images, t5):
    from diffusers import StableDiffusion3Pipeline

    sd3 = sd3 if t5 else save_tiny_sd3(tmp_path / "no_t5", t5=False)  # SD3 without T5: its tokens are zeros
    run = tmp_path / "run"
    run_train(run, overrides("sd3_full", sd3, images), tiny=False)
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    assert not any(k.startswith(("codec.", "conditioning.")) for k in ckpt["state_dict"])  # named, not copied
    out = tmp_path / "exported"
    result = run_cli("export.py", f"ckpt={ckpt_path}", f"out={out}")  # default format: pipeline
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), **({} if t5 else NO_T5))
    ours = DiffusionModel.from_checkpoint(ckpt_path)
    x, t, context, pooled = transformer_inputs(False)
    with torch.no_grad():
        mine = ours.net(x, t, context=context, pooled=pooled)
    torch.testing.assert_close(diffusers_output(pipe, x, t, context, pooled), mine, rtol=1e-4, atol=1e-4)
    base = diffusers_output(
        StableDiffusion3Pipeline.from_pretrained(str(sd3), **({} if t5 else NO_T5)), x, t, context, pooled
    )
    assert (mine - base).abs().max() > 1e-3  # trained
    sample_cli(tmp_path, run)
