"""export.py: a fine-tuned diffusers U-Net as a DDPMPipeline folder that reproduces our sampler; safetensors."""

import functools
import json

import pytest
import torch

from diffusion.checkpoint import net_state_dict, read_checkpoint
from diffusion.export import check_diffusers_exportable, export
from diffusion.model import DiffusionModel
from diffusion.process.discrete import NoiseSchedule, scheduler_config
from diffusion.samplers import ddpm_sample
from tests.conftest import run_cli, run_train

QUIET = ["callbacks.sample_grid.every_n_steps=0", "trainer.max_steps=2", "logger=none", "+trainer.limit_val_batches=1"]


@pytest.mark.parametrize(
    "kind, steps, prediction", [("cosine", 1000, "eps"), ("linear", 50, "v"), ("sigmoid", 20, "x0")]
)
def test_scheduler_config_reproduces_our_schedule(kind, steps, prediction):
    import diffusers

    ours = NoiseSchedule(kind=kind, num_steps=steps, prediction=prediction)
    config = scheduler_config(ours)
    theirs = diffusers.DDPMScheduler(**config)
    assert theirs.config.prediction_type == {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction]
    torch.testing.assert_close(theirs.betas, ours.betas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(theirs.alphas_cumprod, ours.alpha_bar, rtol=1e-5, atol=1e-7)
    if kind != "sigmoid":  # the named built-in is the same schedule (diffusers' sigmoid is a different one)
        named = diffusers.DDPMScheduler(**{**config, "trained_betas": None})
        torch.testing.assert_close(named.alphas_cumprod, ours.alpha_bar, rtol=1e-5, atol=1e-6)


def test_finetuned_diffusers_unet_exports_to_a_ddpm_pipeline(tmp_path):
    import diffusers

    from tests.test_diffusers_unet import save_tiny_unet

    save_tiny_unet(tmp_path / "pretrained")  # 1 channel, 16x16: the built-in digits
    run = tmp_path / "run"
    run_train(
        run,
        [
            "model=diffusers_unet",
            f"model.pretrained={tmp_path / 'pretrained'}",
            *QUIET,
            "process.num_steps=20",
            "data.batch_size=4",
            "callbacks.sample_grid.num_images=1",
        ],
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt)["diffusion"]["net"]["target"] == "diffusion.diffusers_unet.DiffusersUNet"
    ours = DiffusionModel.from_checkpoint(ckpt)  # rebuilt from the checkpoint alone: no pretrained folder needed
    out = tmp_path / "exported"
    export(ckpt, out, format="diffusers")
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert (out / "scheduler" / "scheduler_config.json").exists() and (out / "model_index.json").exists()

    # 1. the network: same output for the same (x_t, t)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 7, 19])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t).sample, ours.net(x, t), rtol=0, atol=0)
    # 2. the whole DDPM trajectory: DDPMPipeline draws x_T and then one z per step t > 0 from the generator,
    # exactly as ddpm_sample does after we draw x_T from it; tables differ only in float32 vs float64 rounding.
    T = ours.process.num_steps
    images = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=T, output_type="np")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 1, 16, 16), generator=g)
    x0 = ddpm_sample(lambda x, t: ours.net(x, t), ours.process, noise, generator=g)
    expected = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images.images - expected).max() < 1e-4

    with pytest.raises(FileExistsError, match="not empty"):
        export(ckpt, out, format="diffusers")


def test_safetensors_export_of_our_unet_from_the_command_line(tmp_path):
    run = tmp_path / "run"
    run_train(run, QUIET)
    out = tmp_path / "st"
    result = run_cli("export.py", f"ckpt={run}", f"out={out}", "format=safetensors")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["net"]["target"] == "diffusion.unet.UNet" and config["weights"] == "ema"  # EMA is on by default
    assert config["process"]["num_steps"] == 50 and config["global_step"] == 2
    loaded = DiffusionModel.from_export(out)
    ema, _ = net_state_dict(read_checkpoint(run / "checkpoints" / "last.ckpt"))
    for k, v in ema.items():
        torch.testing.assert_close(loaded.net.state_dict()[k], v, rtol=0, atol=0)
    raw, _ = net_state_dict(read_checkpoint(run / "checkpoints" / "last.ckpt"), use_ema=False)
    # EMA weights are preferred when the checkpoint has them
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    ckpt["ema_state_dict"] = {k: v * 0.5 for k, v in raw.items()}
    torch.save(ckpt, tmp_path / "ema.ckpt")
    export(tmp_path / "ema.ckpt", tmp_path / "st_ema", format="safetensors")
    loaded = DiffusionModel.from_export(tmp_path / "st_ema")
    assert loaded.weights == "ema"
    torch.testing.assert_close(loaded.net.conv_in.weight, raw["conv_in.weight"] * 0.5, rtol=0, atol=0)
    # our own U-Net has no diffusers pipeline
    with pytest.raises(ValueError, match="format=diffusers needs a diffusers-backed model"):
        export(tmp_path / "ema.ckpt", tmp_path / "none", format="diffusers")
    assert not (tmp_path / "none").exists()
    # without a format: what the checkpoint is (our U-Net: safetensors)
    assert export(tmp_path / "ema.ckpt", tmp_path / "default")[1] == "safetensors"
    assert (tmp_path / "default" / "model.safetensors").is_file()


def test_conditional_diffusers_unet_has_no_pipeline():
    from diffusion.diffusers_unet import DiffusersUNet
    from tests.test_diffusers_unet import TINY_UNET

    net = DiffusersUNet(image_size=16, in_channels=1, num_classes=2, unet=TINY_UNET)
    model = DiffusionModel(net=net, process=NoiseSchedule(num_steps=10))
    with pytest.raises(ValueError, match="class-conditional"):
        check_diffusers_exportable(model)


def test_an_export_that_fails_leaves_nothing_behind(tmp_path, monkeypatch):
    """Files are written into a fresh folder and renamed into place at the end: a failure midway leaves no
    model.safetensors without its config.json, removes the folder the export created, and keeps what was there."""
    import diffusion.export as exporting

    run = tmp_path / "run"
    run_train(run, QUIET)

    real, calls = exporting.write_bytes, []

    def fail_on_the_second_file(path, data, **kwargs):  # model.safetensors is written, config.json fails
        calls.append(path)
        if len(calls) > 1:
            raise OSError("disk full")
        real(path, data, **kwargs)

    monkeypatch.setattr(exporting, "write_bytes", fail_on_the_second_file)
    with pytest.raises(OSError, match="disk full"):
        export(run / "checkpoints" / "last.ckpt", tmp_path / "new", format="safetensors")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        export(run / "checkpoints" / "last.ckpt", tmp_path / "old", format="safetensors", overwrite=True)
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["config.json"]


def test_safetensors_export_of_a_text_model_carries_its_tokenizer(tmp_path):
    """A jointly trained text encoder's weights and its tokenizer (non-tensor state, in the file's metadata) go into
    conditioning.safetensors; the folder rebuilds the same model (it crashed on the tokenizer before)."""
    from tests.test_conditioning import TEXT

    run = tmp_path / "run"
    run_train(run, [*TEXT, "trainer.max_steps=2", "logger=none", "callbacks.sample_grid.every_n_steps=0"])
    result = run_cli("export.py", f"ckpt={run}", f"out={tmp_path / 'st'}", "format=safetensors")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == [
        "conditioning.safetensors",
        "config.json",
        "model.safetensors",
    ]
    ours = DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt")
    theirs = DiffusionModel.from_export(tmp_path / "st")
    prompts = ["a 7", "a handwritten one"]
    sampler = functools.partial(ddpm_sample, steps=3)
    torch.testing.assert_close(
        theirs.generate(prompts, seeds=[0, 1], sampler=sampler, guidance=3.0),
        ours.generate(prompts, seeds=[0, 1], sampler=sampler, guidance=3.0),
        rtol=0,
        atol=0,
    )
