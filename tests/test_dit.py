"""The DiT backbone (diffusion/dit.py): shapes and zero init, position embeddings that follow the image size, the
null class and guidance, diffusers' DiTTransformer2DModel cross-check, LoRA targets, torch.compile without graph
breaks; and through train.py / sample.py / export.py: every process family x conditioning, latents, resume,
init_from at another size, LoRA, DDP."""

from __future__ import annotations

import functools

import pytest
import torch

from diffusion.checkpoint import read_checkpoint
from diffusion.dit import DiT, sincos_pos_embed_2d, to_diffusers
from diffusion.finetune import LoRA
from diffusion.model import DiffusionModel
from tests.conftest import TINY, run_cli, run_train


def tiny_dit(**overrides) -> DiT:
    config = dict(in_channels=2, image_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    return DiT(**{**config, **overrides})


def randomized(net: DiT, seed: int = 0) -> DiT:
    """`net` with every weight random (the zero-initialised layers would hide mistakes), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def inputs(b: int = 3, c: int = 2, s: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, s, s, generator=g), torch.tensor([0.0, 417.0, 999.0][:b])


def test_shapes_and_the_output_is_exactly_zero_at_init():
    x, t = inputs()
    for net in (tiny_dit(), tiny_dit(num_classes=5), tiny_dit(context_dim=6)):
        kwargs = {"context": torch.randn(3, 4, 6)} if net.context_dim else {}
        out = net(x, t, **kwargs)
        assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    net = randomized(tiny_dit(patch_size=4))
    assert net(x, t).shape == x.shape and net(x, t).abs().sum() > 0
    assert net(torch.randn(2, 2, 8, 12), t[:2]).shape == (2, 2, 8, 12)  # any whole number of patches
    with pytest.raises(ValueError, match="model.image_size=10 must be a multiple of model.patch_size=4"):
        tiny_dit(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="model.hidden_size=30 does not split into model.num_heads=4"):
        tiny_dit(hidden_size=30, num_heads=4)


def test_position_embeddings_follow_the_grid_and_nothing_in_the_weights_depends_on_the_size():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for h, w in [(4, 4), (3, 5)]:  # diffusers' (MAE's) layout: columns in the first half, rows in the second
        theirs = get_2d_sincos_pos_embed(16, (h, w), base_size=h, output_type="pt") if h == w else None
        ours = sincos_pos_embed_2d(16, h, w)
        assert ours.shape == (h * w, 16)
        if theirs is not None:
            torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)
        omega = 10000.0 ** (-torch.arange(4) / 4)  # dim / 4 frequencies
        col, row = 2 * omega, 1 * omega  # the token in row 1, column 2
        expected = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()])
        torch.testing.assert_close(ours[1 * w + 2], expected, rtol=0, atol=1e-6)
    small, large = randomized(tiny_dit(image_size=8)), tiny_dit(image_size=16)
    assert small.state_dict().keys() == large.state_dict().keys()
    large.load_state_dict(small.state_dict())  # strict: no tensor has the image size in its shape
    x, t = inputs(s=16)
    torch.testing.assert_close(large.eval()(x, t), small(x, t), rtol=0, atol=0)


def test_the_null_class_and_guidance():
    from diffusion.conditioning import ClassConditioning
    from diffusion.process.discrete import NoiseSchedule

    net = randomized(tiny_dit(num_classes=4))
    x, t = inputs()
    y = torch.tensor([0, 3, 1])
    null = torch.full((3,), 4)
    torch.testing.assert_close(net(x, t), net(x, t, null), rtol=0, atol=0)  # y=None is the null class
    assert not torch.allclose(net(x, t, y), net(x, t, null))
    model = DiffusionModel(
        net=net, process=NoiseSchedule(num_steps=1000), conditioning=ClassConditioning(num_classes=4)
    )
    guided = model.denoiser({"y": y}, guidance=3.0)(x, t)
    expected = net(x, t, null) + 3.0 * (net(x, t, y) - net(x, t, null))
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="class labels were given to an unconditional model"):
        tiny_dit()(x, t, y)


def test_text_context_padding_is_masked():
    net = randomized(tiny_dit(context_dim=6))
    x, t = inputs()
    context = torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = net(x, t, context=context, context_mask=mask)
    padded = context.clone()
    padded[~mask] = 100.0  # what stands where the mask is False must not matter
    torch.testing.assert_close(net(x, t, context=padded, context_mask=mask), out, rtol=0, atol=1e-6)
    assert not torch.allclose(net(x, t, context=padded), out)  # without the mask it does
    with pytest.raises(ValueError, match="needs a context"):
        net(x, t)


@pytest.mark.parametrize("num_classes", [10, None])
def test_weights_map_onto_diffusers_dit(num_classes):
    net = randomized(tiny_dit(num_classes=num_classes, in_channels=4))
    x, t = inputs(c=4)
    y = torch.tensor([0, 7, 10]) if num_classes else None
    with torch.no_grad():
        ours = net(x, t, y)
        theirs = to_diffusers(net)(x, timestep=t, class_labels=y if num_classes else torch.zeros(3, dtype=torch.long))
    assert ours.abs().mean() > 0.1 and (ours - theirs.sample).abs().max() < 1e-4


def test_lora_adapts_attention_and_mlp_projections():
    for net, expected in [
        (tiny_dit(num_classes=3), {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}),
        (tiny_dit(context_dim=6), {"attn.qkv", "attn.proj", "cross.q", "cross.kv", "cross.proj", "mlp.fc1", "mlp.fc2"}),
    ]:
        randomized(net)
        kwargs = {"context": torch.randn(3, 4, 6)} if net.context_dim else {}
        x, t = inputs()
        before = net(x, t, **kwargs)
        lora = LoRA(rank=2).apply(net, source={"kind": "checkpoint", "path": "/nowhere.ckpt", "use_ema": True})
        adapted = {k.split(".", 3)[3].rsplit(".lora_", 1)[0] for k in lora.state_dict()}  # net.blocks.i.<layer>
        assert adapted == expected
        assert len(lora.state_dict()) == 2 * len(expected) * 2  # A and B per layer per block
        torch.testing.assert_close(lora(x, t, **kwargs), before, rtol=0, atol=0)  # B = 0: the base exactly


def test_compile_has_no_graph_breaks():
    x, t = inputs()
    for net, kwargs in [
        (randomized(tiny_dit(num_classes=4)), {"y": torch.tensor([0, 1, 4])}),
        (tiny_dit(context_dim=6, gradient_checkpointing=True).train(), {"context": torch.randn(3, 4, 6)}),
    ]:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(net)(x, t, **kwargs)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_gradient_checkpointing_gives_the_same_gradients_and_bf16_stays_close():
    torch.manual_seed(0)
    plain = randomized(tiny_dit(num_classes=3)).train()
    ckpt = tiny_dit(num_classes=3, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = inputs()
    y = torch.tensor([0, 1, 2])
    plain(x, t, y).square().sum().backward()
    ckpt(x, t, y).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    reference = plain.eval()(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = plain(x, t, y)
    true_bf16 = plain.to(torch.bfloat16)(x, t, y)
    for out in (mixed, true_bf16):
        assert torch.isfinite(out).all()
        assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_flops_are_counted_from_the_architecture():
    net = DiT(in_channels=4, image_size=32, patch_size=2, hidden_size=768, depth=12, num_heads=12)
    # DiT-B/2 at 256 px: the paper's table 1 gives 23.0 GFLOPs (multiply-adds) per forward pass
    assert net.forward_flops() / 2 / 1e9 == pytest.approx(23.0, rel=0.03)
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(130, rel=0.02)


# --- end to end through train.py / sample.py / export.py ---------------------------------------------------------
E2E = [t for t in TINY if not t.startswith("process")] + [
    "model=dit_tiny",
    "trainer.max_steps=2",
    "logger=none",
    "+trainer.limit_val_batches=1",
    "callbacks.sample_grid.every_n_steps=0",
]
CONDITIONING = {
    "none": [],
    "class": ["experiment=digits_cond", "model=dit_tiny", "module.cond_drop_prob=0.2"],
    "text": [
        "experiment=digits_text",
        "model=dit_tiny",
        "conditioning.encoder.dim=16",
        "conditioning.encoder.depth=1",
    ],
}
# each family with each conditioning; the discrete schedules and predictions spread over them
PROCESSES = {
    ("discrete", "none"): ["process=cosine", "process.prediction=eps", "process.num_steps=50"],
    ("discrete", "class"): ["process=linear", "process.prediction=v", "process.num_steps=50"],
    ("discrete", "text"): ["process=sigmoid", "process.prediction=x0", "process.num_steps=50"],
    **{(f, c): [f"process={f}"] for f in ("edm", "flow") for c in CONDITIONING},
}
SAMPLER = {"discrete": "ddim", "edm": "heun", "flow": "euler"}


@pytest.mark.parametrize(("family", "cond"), list(PROCESSES), ids=[f"{f}-{c}" for f, c in PROCESSES])
def test_every_family_and_conditioning_trains_and_generates(tmp_path, family, cond):
    from diffusion.samplers import SAMPLERS

    run = tmp_path / "run"
    run_train(run, [*E2E, *CONDITIONING[cond], *PROCESSES[(family, cond)], f"sampler={SAMPLER[family]}"], tiny=False)
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 and ckpt["diffusion"]["net"]["target"] == "diffusion.dit.DiT"
    model = DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt")
    conditions = {"none": None, "class": [3, 7], "text": ["the digit 3", "a handwritten seven"]}[cond]
    sampler = functools.partial(SAMPLERS[SAMPLER[family]], steps=2)
    images = model.generate(conditions, seeds=[0, 1], sampler=sampler, guidance=1.0 if cond == "none" else 2.0)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_latent_dit_on_a_vae_codec(tmp_path):
    from tests.conftest import write_image
    from tests.test_latent import latent_overrides, save_vae

    save_vae(tmp_path / "vae")
    for i in range(6):
        write_image(tmp_path / "images" / f"{i}.png", (16, 16), seed=i)
    run = tmp_path / "run"
    run_train(run, [*E2E, "process=flow", *latent_overrides(tmp_path / "images", tmp_path / "vae")], tiny=False)
    config = read_checkpoint(run / "checkpoints" / "last.ckpt")["diffusion"]["net"]["config"]
    assert (config["in_channels"], config["image_size"]) == (4, 8)  # the codec's latent shape, not the pixels'
    model = DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt")
    from diffusion.samplers import SAMPLERS

    images = model.generate(seeds=[0], sampler=functools.partial(SAMPLERS["euler"], steps=2))
    assert images.shape == (1, 3, 16, 16)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """A class-conditional DiT trained 2 steps with EMA (the default), post-hoc EMA and FID (random features)."""
    tmp = tmp_path_factory.mktemp("dit")
    callbacks = [
        "callbacks=[default,posthoc_ema,fid]",
        "callbacks.posthoc_ema.every_n_steps=1",
        "callbacks.fid.feature_extractor={_target_:diffusion.callbacks.fid.RandomFeatures,_partial_:true,num_features:8}",
        "callbacks.fid.num_samples=6",
        "callbacks.fid.num_real=40",
        "callbacks.fid.every_n_steps=2",
        "callbacks.fid.batch_size=16",
        "callbacks.fid.kid_subset_size=5",
        f"callbacks.fid.cache_dir={tmp / 'cache'}",
    ]
    run = tmp / "run"
    common = [*E2E, *CONDITIONING["class"], "process=cosine", "process.num_steps=50", *callbacks, "logger=csv"]
    run_train(run, common, tiny=False)
    return run


def test_fid_and_posthoc_ema_of_a_dit_run(class_run):
    import csv

    with open(class_run / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/fid")]
    assert [int(r["step"]) for r in rows] == [2] and float(rows[0]["val/fid"]) > 0
    assert len(list((class_run / "ema_snapshots").glob("step_*.pt"))) == 2 * 2  # 2 steps x 2 profiles


@pytest.mark.slow
def test_sample_and_export_a_dit_checkpoint(tmp_path, class_run):
    import diffusers

    from diffusion.export import export

    out = tmp_path / "samples"
    result = run_cli(
        "sample.py", f"ckpt={class_run}", "n=2", "label=3", "guidance=2", "sampler.steps=2", f"out={out}",
        "device=cpu", "progress=false", "ema.sigma_rel=0.1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((out / "images").glob("*.png"))) == 2
    ours = DiffusionModel.from_checkpoint(class_run / "checkpoints" / "last.ckpt")
    randomized(ours.net)  # two steps leave the zero-initialised layers nearly zero: compare on random weights
    torch.save({**read_checkpoint(class_run / "checkpoints" / "last.ckpt"), "ema_state_dict": ours.net.state_dict()},
               tmp_path / "random.ckpt")  # fmt: skip
    result = run_cli("export.py", f"ckpt={tmp_path / 'random.ckpt'}", f"out={tmp_path / 'hf'}", "format=diffusers")
    assert result.returncode == 0, result.stderr[-2000:]
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "hf" / "transformer")).eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(tmp_path / "hf" / "scheduler"))
    assert scheduler.config.num_train_timesteps == 50 and scheduler.config.prediction_type == "v_prediction"
    x, t = inputs(c=1, s=16)
    y = torch.tensor([3, 10, 9])
    with torch.no_grad():
        diff = (transformer(x, timestep=t, class_labels=y).sample - ours.net(x, t, y)).abs().max()
    assert diff < 1e-4
    export(tmp_path / "random.ckpt", tmp_path / "st", format="safetensors")
    loaded = DiffusionModel.from_export(tmp_path / "st")
    torch.testing.assert_close(loaded.net(x, t, y), ours.net(x, t, y), rtol=0, atol=0)


@pytest.mark.slow
def test_init_from_at_another_size_then_lora(tmp_path, class_run):
    """The position embeddings follow the grid: a 16x16 DiT starts a 24x24 run strictly; then LoRA on it."""
    bigger = [
        "data=folder",
        "data.labels=true",
        "data.image_size=24",
        "data.channels=1",
        "data.num_workers=0",
        "data.batch_size=4",
    ]
    from tests.conftest import write_image

    for i in range(8):
        write_image(tmp_path / "images" / str(i % 2) / f"{i}.png", (24, 24), "L", seed=i)
    common = [*E2E, *CONDITIONING["class"], "process=cosine", "process.num_steps=50", *bigger,
              f"data.path={tmp_path / 'images'}", "model.num_classes=10", "conditioning=class"]  # fmt: skip
    run = tmp_path / "big"
    run_train(run, [*common, f"init_from={class_run}"], tiny=False)
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["diffusion"]["net"]["config"]["image_size"] == 24
    lora = tmp_path / "lora"
    run_train(lora, [*common, f"init_from={run}", "finetune=lora", "finetune.rank=2", "optim.lr=1e-2"], tiny=False)
    ckpt = read_checkpoint(lora / "checkpoints" / "last.ckpt")
    assert ckpt["diffusion"]["net"]["target"] == "diffusion.finetune.LoRANet"
    assert {k.split(".")[5] for k in ckpt["state_dict"]} == {"attn", "mlp"}  # model.net.net.blocks.<i>.<part>...
    assert any(v.abs().sum() > 0 for k, v in ckpt["state_dict"].items() if "lora_B" in k)


@pytest.mark.slow
def test_two_process_ddp(tmp_path):
    from tests.test_ema import DDP_TINY

    run = tmp_path / "ddp"
    result = run_cli("train.py", *DDP_TINY, "model=dit_tiny", "logger=none", f"hydra.run.dir={run}", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["diffusion"]["net"]["target"] == "diffusion.dit.DiT"
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
