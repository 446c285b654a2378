"""Memory levers (docs/finetune.md, "Memory"): 8-bit AdamW (optim=adamw8bit), LoRA adapters kept fp32 under a
bf16-true base (finetune.adapter_dtype), and sharded training (trainer=fsdp_cpu: FSDP2 in two gloo processes)
whose checkpoints load back into one process (sample.py, export.py, a single-process resume)."""

from __future__ import annotations

import pytest
import torch

from diffusion.checkpoint import read_checkpoint
from diffusion.errors import ConfigError
from diffusion.model import DiffusionModel
from tests.conftest import CONF, compose_train, run_cli, run_train
from tests.test_sd import captioned, sd_overrides, sd_pipeline  # noqa: F401 (module fixtures)


def test_adamw8bit_trains_on_the_cpu_with_8bit_moments():
    """bitsandbytes 0.50 runs its 8-bit AdamW on the CPU: the loss falls, and the moments of a tensor large enough
    for block-wise quantization (>= 4096 elements) are stored as uint8."""
    pytest.importorskip("bitsandbytes")
    from diffusion.module import adamw8bit

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    opt = adamw8bit(net.parameters(), lr=1e-2)
    x = torch.randn(32, 64)
    losses = []
    for _ in range(20):
        loss = (net(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    state = opt.state[net[0].weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_adamw8bit_refuses_a_device_bitsandbytes_does_not_run_on():
    pytest.importorskip("bitsandbytes")
    from diffusion.module import adamw8bit

    with pytest.raises(ConfigError, match="optim=adamw8bit: bitsandbytes' 8-bit AdamW does not run on meta"):
        adamw8bit([torch.nn.Parameter(torch.zeros(4, device="meta"))])


@pytest.mark.slow
def test_adamw8bit_through_train_py(tmp_path):
    """optim=adamw8bit composes and trains the tiny U-Net; the checkpoint's optimizer state is bitsandbytes' (its
    quantized moments, not torch's exp_avg; tensors this small keep 32-bit moments, block-wise 8 bits start
    at 4096 elements, which the test above checks)."""
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "run"
    _, val = run_train(run, ["optim=adamw8bit", "callbacks.sample_grid=null", "logger=none"])
    assert val == val and val < 10
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    states = ckpt["optimizer_states"][0]["state"].values()
    assert states and all("__bnb_optimizer_quant_state__" in s and "exp_avg" not in s for s in states)


@pytest.mark.slow
@pytest.mark.parametrize("adapter_dtype", ["fp32", "null"])
def test_lora_adapters_stay_fp32_under_a_bf16_true_base(tmp_path, sd_pipeline, captioned, adapter_dtype):  # noqa: F811
    """trainer.precision=bf16-true casts the whole network to bf16; finetune.adapter_dtype=fp32 (the default) puts
    the adapters back into fp32 before the optimizer is built (diffusers' cast_training_params), so they, their
    gradients and their optimizer state are fp32 while the frozen base stays bf16. null: bf16 adapters."""
    run = tmp_path / "run"
    overrides = [*sd_overrides("sd_lora", sd_pipeline, captioned), "trainer.precision=bf16-true"]
    run_train(run, [*overrides, f"finetune.adapter_dtype={adapter_dtype}", "callbacks.ema=null"], tiny=False)
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    want = torch.float32 if adapter_dtype == "fp32" else torch.bfloat16
    assert ckpt["state_dict"] and {v.dtype for v in ckpt["state_dict"].values()} == {want}
    moments = [s["exp_avg"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert moments and {m.dtype for m in moments} == {want}
    assert any(m.abs().sum() > 0 for m in moments)  # the adapters trained


# A full fine-tune of the tiny SD pipeline in two CPU processes, weights sharded with FSDP2 (gloo).
FSDP = ["trainer=fsdp_cpu", "callbacks.sample_grid=null", "data.val_fraction=0.34", "trainer.max_steps=2"]


@pytest.mark.slow
def test_fsdp_two_cpu_processes_then_sample_export_and_resume_in_one(tmp_path, sd_pipeline, captioned):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "fsdp"
    args = [a for a in sd_overrides("sd_full", sd_pipeline, captioned) if not a.startswith("trainer=")]
    result = run_cli("train.py", *args, *FSDP, "callbacks.ema.decay=0.5", f"hydra.run.dir={run}", timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 4 (2 per device x 2 devices x 1 nodes x 1 accumulation)" in result.stdout
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    # 1. one whole checkpoint: plain tensors of the U-Net's full shapes (no shards, no DTensors), EMA included,
    # optimizer state keyed by parameter index as a single process writes it, the network named by its own class
    base = StableDiffusionPipeline.from_pretrained(str(sd_pipeline), safety_checker=None).unet.state_dict()
    net_state = {k.removeprefix("model.net.unet."): v for k, v in ckpt["state_dict"].items()}
    assert net_state.keys() == base.keys()
    assert all(type(v) is torch.Tensor and v.shape == base[k].shape for k, v in net_state.items())
    ema = {k.removeprefix("unet."): v for k, v in ckpt["ema_state_dict"].items()}
    assert ema.keys() == base.keys() and all(
        type(v) is torch.Tensor and v.shape == base[k].shape for k, v in ema.items()
    )
    assert any(not torch.equal(ema[k], net_state[k]) for k in base)  # the EMA averaged (decay 0.5)
    assert any(not torch.equal(net_state[k], base[k]) for k in base)  # the U-Net trained
    assert sorted(ckpt["optimizer_states"][0]["state"]) == list(range(len(base)))
    assert ckpt["diffusion"]["net"]["target"] == "diffusion.diffusers_unet.DiffusersCondUNet"
    # 2. it loads into one process, with the trained weights
    model = DiffusionModel.from_checkpoint(ckpt_path, use_ema=False)
    for k, v in model.net.unet.state_dict().items():
        torch.testing.assert_close(v, net_state[k], rtol=0, atol=0)
    # 3. sample.py and export.py read it as any other checkpoint
    result = run_cli(
        "sample.py", f"ckpt={run}", "n=2", f"out={tmp_path / 's'}", 'prompt="a red digit"', "sampler.steps=2",
        "device=cpu", "progress=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "s" / "images" / "000001.png").exists()
    result = run_cli("export.py", f"ckpt={ckpt_path}", f"out={tmp_path / 'pipe'}", "format=pipeline")
    assert result.returncode == 0, result.stderr[-3000:]
    exported = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), safety_checker=None).unet.state_dict()
    for k, v in exported.items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)  # export takes the EMA weights by default
    # 4. a single-process resume continues from it: optimizer state, step count and EMA restored
    resumed = tmp_path / "resumed"
    run_train(
        resumed,
        [*sd_overrides("sd_full", sd_pipeline, captioned), "trainer.max_steps=3", f"ckpt_path={run}"],
        tiny=False,
    )
    after = read_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 3
    assert after["callbacks"] and after["ema_state_dict"].keys() == ckpt["ema_state_dict"].keys()


@pytest.mark.parametrize("kind", ["clip", "sdxl"])
def test_text_embeddings_cached_on_disk_free_the_encoder(tmp_path, sd_pipeline, kind):  # noqa: F811
    """conditioning.cache_dir: prepare() writes every caption's embedding (every key the encoder gives: SDXL's
    pooled one too) to the folder and frees the encoder's weights; the table answers those captions with the
    encoder's own outputs bit for bit, a second conditioning reads the file without encoding, and a caption outside
    the table loads the encoder again."""
    from types import SimpleNamespace

    from diffusion.conditioning import TextConditioning
    from diffusion.text_encoders import CLIPTextEncoder, PipelineTextEncoder
    from tests.pipelines import save_tiny_sdxl

    if kind == "sdxl":
        folder = save_tiny_sdxl(tmp_path / "sdxl")

        def encoder():
            return PipelineTextEncoder(pretrained=str(folder))
    else:

        def encoder():
            return CLIPTextEncoder(pretrained=str(sd_pipeline))

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    captions = ["a red digit", "a blue digit", "a photo of a digit"]
    datamodule = SimpleNamespace(caption_corpus=lambda: captions * 2)
    plain = TextConditioning(encoder=encoder())  # the in-memory cache: one caption per call, as the table
    cached = TextConditioning(encoder=encoder(), cache_dir=str(tmp_path / "emb"))
    weights = sum(p.numel() for p in cached.encoder.parameters())
    cached.prepare(datamodule)
    assert weights > 0 and sum(p.numel() for p in cached.encoder.parameters()) == 0  # freed
    assert len(list((tmp_path / "emb").glob("text_embeddings-*.safetensors"))) == 1
    batch = ["a blue digit", "", "a red digit", "a blue digit"]
    assert same(cached.encode(batch), plain.encode(batch))
    assert ("pooled" in plain.encode(batch)) == (kind == "sdxl")
    # a second run with the same encoder and captions reads the file: its encoder never runs
    again = TextConditioning(encoder=encoder(), cache_dir=str(tmp_path / "emb"))
    again.encoder.forward = None  # calling it would raise TypeError
    again.prepare(datamodule)
    assert same(again.encode(batch), plain.encode(batch))
    # a caption outside the table: the encoder's weights come back, and its output is the plain one
    assert same(cached.encode(["a new caption"]), plain.encode(["a new caption"]))
    assert sum(p.numel() for p in cached.encoder.parameters()) == weights


@pytest.mark.slow
def test_text_embedding_cache_trains_bit_for_bit_as_the_in_memory_path(tmp_path, sd_pipeline, captioned):  # noqa: F811
    """The same LoRA run with conditioning.cache_dir and with the in-memory cache: identical adapters and loss."""
    overrides = [*sd_overrides("sd_lora", sd_pipeline, captioned), "trainer.max_steps=3", "callbacks.ema=null"]
    _, with_disk = run_train(tmp_path / "disk", [*overrides, f"conditioning.cache_dir={tmp_path / 'emb'}"], tiny=False)
    _, in_memory = run_train(tmp_path / "memory", overrides, tiny=False)
    assert len(list((tmp_path / "emb").glob("text_embeddings-*.safetensors"))) == 1
    assert with_disk == in_memory
    a, b = (read_checkpoint(tmp_path / r / "checkpoints" / "last.ckpt")["state_dict"] for r in ("disk", "memory"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_network_config_has_the_gradient_checkpointing_key(tmp_path, model):
    """model.gradient_checkpointing is the one key for activation checkpointing, whichever the network."""
    cfg = compose_train(tmp_path, [f"model={model}"], tiny=False)
    assert "gradient_checkpointing" in cfg.model and cfg.model.gradient_checkpointing is False


def test_diffusers_unet_gradient_checkpointing_same_gradients():
    """model=diffusers_unet model.gradient_checkpointing=true: diffusers' checkpointing on, the same loss and
    gradients as without (it only trades memory for recomputation)."""
    pytest.importorskip("diffusers")
    from diffusion.diffusers_unet import DiffusersUNet

    unet = dict(block_out_channels=[8, 16], layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=8, norm_num_groups=4)  # fmt: skip
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = DiffusersUNet(image_size=8, in_channels=1, unet=unet, gradient_checkpointing=checkpointing).train()
        assert net.unet.is_gradient_checkpointing is checkpointing
        assert net.config["gradient_checkpointing"] is checkpointing
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        net(x, torch.tensor([3, 7])).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads, strict=True))


def test_sample_grid_refuses_a_sharded_network_in_one_line():
    """Under trainer=fsdp the grid (drawn on rank 0 alone) would hang the run: a one-line error at setup instead."""
    from types import SimpleNamespace

    from diffusion.callbacks.sample_grid import SampleGrid

    grid = SampleGrid(dirpath="unused", sampler=lambda *a, **k: None)
    grid.setup(None, SimpleNamespace(device_mesh=None), "fit")  # unsharded: fine
    with pytest.raises(ConfigError, match="callbacks.sample_grid draws on rank 0 alone.*callbacks.sample_grid=null"):
        grid.setup(None, SimpleNamespace(device_mesh=object()), "fit")
