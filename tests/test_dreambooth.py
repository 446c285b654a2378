"""DreamBooth (experiment=dreambooth) on a tiny Stable Diffusion pipeline (tests/pipelines.py): the class images are
drawn once by the base model, reused, topped up and resumed; the loss is instance MSE + w * prior MSE; train.py
fine-tunes with LoRA (and LoRA on the text encoder), resumes exactly, and the export loads in diffusers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from diffusion.checkpoint import read_checkpoint
from diffusion.dreambooth import count_class_images
from tests.conftest import compose_train, run_train, write_image
from tests.pipelines import save_tiny_sd

INSTANCE = "a photo of sks digit"
CLASS = "a photo of a digit"


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def instance_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("instance") / "images"
    for i in range(4):  # no captions: each gets the instance prompt
        write_image(root / f"{i}.png", (20, 20), seed=i)
    return root


def overrides(pipeline, images, class_dir, *extra: str) -> list[str]:
    return [
        "experiment=dreambooth",
        f"model.pretrained={pipeline}",
        f"data.path={images}",
        "data.image_size=16",
        "data.batch_size=2",
        "data.num_workers=0",
        f'dreambooth.instance_prompt="{INSTANCE}"',
        f'dreambooth.class_prompt="{CLASS}"',
        "dreambooth.num_class_images=3",
        f"dreambooth.class_dir={class_dir}",
        "dreambooth.sample_batch_size=2",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "sampler.steps=2",
        "callbacks.sample_grid.num_images=2",
        "callbacks.sample_grid.every_n_steps=0",
        "logger=none",
        "optim.lr=1e-2",
        *extra,
    ]


def assembled(tmp_path, options: list[str]):
    """(model, datamodule) as train.py assembles them, the datamodule's base model's `generate` counting images."""
    import train

    cfg = compose_train(tmp_path / "run", options, tiny=False)
    model, datamodule = train.assemble(cfg, finetune=train.build(cfg, "finetune"))
    base = datamodule.base
    drawn = []
    generate = base.generate

    def counting(conditions, **kwargs):
        drawn.extend(kwargs["seeds"])
        return generate(conditions, **kwargs)

    base.generate = counting
    return model, datamodule, drawn


def folder_state(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("*.png"))}


def test_class_images_drawn_once_reused_topped_up_and_resumed(tmp_path, sd_pipeline, instance_images):
    class_dir = tmp_path / "class"
    options = overrides(sd_pipeline, instance_images, class_dir)
    # 1. the first run draws 3, one seed each, in a folder keyed by prompt and base model
    _, dm, drawn = assembled(tmp_path, options)
    dm.prepare_data()
    (folder,) = dm.class_folders
    assert folder.parent == class_dir and folder.name.startswith("a_photo_of_a_digit-")
    assert count_class_images(folder) == 3 and len(drawn) == 3
    first = folder_state(folder)
    # 2. a second run finds them: nothing drawn, nothing rewritten
    _, dm, drawn = assembled(tmp_path, options)
    dm.prepare_data()
    assert dm.class_folders == [folder] and drawn == [] and folder_state(folder) == first
    dm.setup("fit")
    x, captions, weights = dm.train_set.__getitems__([0, 1])
    assert x.shape == (4, 3, 16, 16) and captions == [INSTANCE, INSTANCE, CLASS, CLASS]
    # 3. more class images: the missing ones are drawn; the others are kept as they were
    _, dm, drawn = assembled(tmp_path, [*options, "dreambooth.num_class_images=5"])
    dm.prepare_data()
    assert len(drawn) == 2 and count_class_images(folder) == 5
    topped = folder_state(folder)
    assert {k: v for k, v in topped.items() if k in first} == first
    # 4. a generation killed after its first batch (and a write cut short) resumes at the first missing image and
    # gives the same images as one that never stopped (image i from its own seed)
    other = tmp_path / "other"
    _, dm, drawn = assembled(
        tmp_path, [*overrides(sd_pipeline, instance_images, other), "dreambooth.num_class_images=5"]
    )
    generate = dm.base.generate

    def killed_after_one_batch(conditions, **kwargs):
        if drawn:
            raise KeyboardInterrupt
        return generate(conditions, **kwargs)

    dm.base.generate = killed_after_one_batch
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    (resumed,) = dm.class_folders
    assert count_class_images(resumed) == 2
    (resumed / ".000002.png.tmp-0123456789ab").write_bytes(b"half an image")
    _, dm, drawn = assembled(
        tmp_path, [*overrides(sd_pipeline, instance_images, other), "dreambooth.num_class_images=5"]
    )
    dm.prepare_data()
    assert len(drawn) == 3 and count_class_images(resumed) == 5
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in resumed.iterdir())
    assert {k: v[1] for k, v in folder_state(resumed).items()} == {k: v[1] for k, v in topped.items()}
    # 5. other sampler settings draw other images: another folder
    _, dm, _ = assembled(tmp_path, [*options, "sampler.steps=3"])
    assert dm.class_folders != [folder]


def test_loss_is_instance_mse_plus_weighted_prior_mse(tmp_path, sd_pipeline, instance_images):
    """DreamBooth's loss with prior preservation, as diffusers' train_dreambooth.py computes it: the batch's noise
    predictions split in two, F.mse_loss(instance) + w * F.mse_loss(prior), noised by the pipeline's scheduler."""
    from diffusers import DDPMScheduler

    from diffusion.module import DiffusionModule

    w = 0.5
    options = overrides(sd_pipeline, instance_images, tmp_path / "class", f"dreambooth.prior_loss_weight={w}")
    model, dm, _ = assembled(tmp_path, [*options, "codec.sample=false"])
    dm.prepare_data()
    dm.setup("fit")
    batch = dm.train_set.__getitems__([0, 1])
    x = batch[0].float() * (2 / 255) - 1  # the loader's uint8 -> [-1, 1]
    batch = (x, *batch[1:])
    levels = torch.tensor([10, 500, 900, 999])
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model.process.draw_levels = lambda n, device=None, generator=None: levels
    module = DiffusionModule(model=model, cond_drop_prob=0.0)
    real_randn_like = torch.randn_like
    torch.randn_like = lambda t, **kw: noise.to(t)
    try:
        loss = module.training_step(batch, 0)
    finally:
        torch.randn_like = real_randn_like

    scheduler = DDPMScheduler.from_pretrained(str(sd_pipeline), subfolder="scheduler")
    with torch.no_grad():
        latents = model.codec.encode(x, sample=False)
        noisy = scheduler.add_noise(latents, noise, levels)
        pred = model.net(noisy, levels, **model.conditioning(batch[1]))
        instance_pred, prior_pred = pred.chunk(2)
        instance_noise, prior_noise = noise.chunk(2)
        expected = F.mse_loss(instance_pred, instance_noise) + w * F.mse_loss(prior_pred, prior_noise)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    assert (loss - F.mse_loss(pred, noise)).abs() > 1e-4  # not the plain batch mean


@pytest.mark.slow
def test_dreambooth_train_resume_and_export_with_text_encoder_lora(tmp_path, sd_pipeline, instance_images):
    from diffusers import StableDiffusionPipeline

    from diffusion.export import export
    from diffusion.model import DiffusionModel

    class_dir = tmp_path / "class"
    options = overrides(sd_pipeline, instance_images, class_dir, "dreambooth.train_text_encoder=true")
    run = tmp_path / "run"
    run_train(run, options, tiny=False)
    (folder,) = class_dir.iterdir()
    drawn = folder_state(folder)
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    # 1. the checkpoint holds the U-Net's and the text encoder's adapters, and only them
    text = [k for k in ckpt["state_dict"] if k.startswith("model.conditioning.")]
    assert text and all(".lora_" in k for k in ckpt["state_dict"])
    assert ckpt["diffusion"]["conditioning"]["config"]["encoder"]["target"] == "diffusion.finetune.LoRATextEncoder"
    # 2. resume: the same adapters as an uninterrupted run, bit for bit; the class images are not drawn again
    three = ["trainer.max_steps=3"]
    run_train(run, [*options, *three, f"ckpt_path={run}"], tiny=False)
    straight = tmp_path / "straight"
    run_train(straight, [*options, *three], tiny=False)
    assert folder_state(folder) == drawn and list(class_dir.iterdir()) == [folder]
    resumed, uninterrupted = (read_checkpoint(r / "checkpoints" / "last.ckpt") for r in (run, straight))
    assert resumed["global_step"] == uninterrupted["global_step"] == 3
    assert resumed["state_dict"].keys() == uninterrupted["state_dict"].keys() == ckpt["state_dict"].keys()
    for key, value in resumed["state_dict"].items():
        torch.testing.assert_close(value, uninterrupted["state_dict"][key], rtol=0, atol=0)
    # 3. format=lora loads into the pipeline (U-Net and text encoder) and gives our outputs
    ours = DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt", use_ema=False)
    export(run / "checkpoints" / "last.ckpt", tmp_path / "lora", format="lora", use_ema=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_pipeline), safety_checker=None)
    with torch.no_grad():
        base_context = pipe.text_encoder(*_tokens(pipe, INSTANCE))[0]
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 500])
    with torch.no_grad():
        mine = ours.conditioning([INSTANCE, CLASS])
        theirs_context = pipe.text_encoder(*_tokens(pipe, INSTANCE, CLASS))[0]
        torch.testing.assert_close(theirs_context, mine["context"], rtol=1e-4, atol=1e-5)
        assert (mine["context"][:1] - base_context).abs().max() > 1e-4  # the text adapters trained
        theirs = pipe.unet(x, t, encoder_hidden_states=theirs_context).sample
        torch.testing.assert_close(theirs, ours.net(x, t, **mine), rtol=1e-4, atol=1e-5)
    # 4. format=pipeline merges both kinds of adapters: a plain pipeline folder with the same outputs
    export(run / "checkpoints" / "last.ckpt", tmp_path / "merged", format="pipeline", use_ema=False)
    merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"), safety_checker=None)
    assert not any("lora" in k for k in [*merged.unet.state_dict(), *merged.text_encoder.state_dict()])
    with torch.no_grad():
        context = merged.text_encoder(*_tokens(merged, INSTANCE, CLASS))[0]
        torch.testing.assert_close(context, mine["context"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            merged.unet(x, t, encoder_hidden_states=context).sample, theirs, rtol=1e-4, atol=1e-5
        )


def _tokens(pipe, *prompts):
    """input_ids and attention_mask as our CLIPTextEncoder passes them (padded to max_length)."""
    tokens = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length)
    return torch.tensor(tokens["input_ids"]), torch.tensor(tokens["attention_mask"])


def test_dreambooth_full_finetune_trains(tmp_path, sd_pipeline, instance_images):
    run = tmp_path / "run"
    run_train(run, overrides(sd_pipeline, instance_images, tmp_path / "class", "finetune=full"), tiny=False)
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 and not any(".lora_" in k for k in ckpt["state_dict"])
    assert os.listdir(tmp_path / "class")
