"""finetune=lora / full: adapters on our own U-Net (init_from + LoRA) and on diffusers U-Nets; checkpoints hold only
the adapters plus where the base came from; resume and sample.py rebuild base + adapters."""

import shutil

import pytest
import torch

from diffusion.checkpoint import net_state_dict, read_checkpoint
from diffusion.finetune import LoRA, LoRANet, base_source
from diffusion.model import DiffusionModel
from diffusion.unet import UNet
from tests.conftest import compose_train, run_cli, run_train, tiny_unet

QUIET = ["callbacks.sample_grid.every_n_steps=0", "logger=none", "+trainer.limit_val_batches=1"]
ATTN = ["model.attention_resolutions=[8]"]  # unet_tiny has no attention: give it one level to adapt


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "run"
    run_train(run, [*QUIET, *ATTN])
    return run / "checkpoints" / "last.ckpt"


def test_lora_net_state_dict_holds_adapters_and_loading_keeps_the_base():
    torch.manual_seed(0)
    net = tiny_unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lora = LoRA(rank=2).apply(net, source={"kind": "checkpoint", "path": "/nowhere.ckpt", "use_ema": True})
    keys = list(lora.state_dict())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == set(keys)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    base_out = UNet(**{**tiny_unet().config})  # same architecture, other weights
    base_out.load_state_dict(before)
    torch.testing.assert_close(lora(x, t), base_out(x, t), rtol=0, atol=0)  # B = 0: the base exactly
    state = {k: torch.randn_like(v) for k, v in lora.state_dict().items()}
    lora.load_state_dict(state)  # strict: the base keys are filled from the module itself
    for name, value in lora.net.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(value, before[name.replace(".base_layer", "")], rtol=0, atol=0)
    with pytest.raises(ValueError, match="finetune=lora needs base weights"):
        LoRA().apply(tiny_unet(), source=None)
    with pytest.raises(ValueError, match="finetune.rank=0 must be >= 1"):
        LoRA(rank=0)


@pytest.mark.slow
def test_lora_on_our_unet_through_train_resume_and_sample(tmp_path, base_ckpt):
    run = tmp_path / "lora"
    overrides = [*QUIET, *ATTN, "finetune=lora", "finetune.rank=2", f"init_from={base_ckpt}", "optim.lr=1e-2"]
    run_train(run, [*overrides, "trainer.max_steps=2"])
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    # 1. the checkpoint: adapter weights only (raw and EMA), plus where the base came from
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])
    assert all(".lora_" in k for k in ckpt["ema_state_dict"])
    config = ckpt["diffusion"]["net"]["config"]
    assert ckpt["diffusion"]["net"]["target"] == "diffusion.finetune.LoRANet"
    assert config["source"] == base_source(init_from=str(base_ckpt)) and config["rank"] == 2
    # 2. the optimizer held only the adapters
    adapters = len(ckpt["state_dict"])
    assert sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"]) == adapters
    # 3. the base weights are bit-identical after training; the adapters moved
    loaded = DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt", use_ema=False)
    assert isinstance(loaded.net, LoRANet)
    # export.py without format= writes what it is (LoRA); format=diffusers is refused with that advice
    from diffusion.export import check_diffusers_exportable, default_format

    assert default_format(loaded) == "lora"
    with pytest.raises(ValueError, match="holds LoRANet: use format=lora$"):
        check_diffusers_exportable(loaded)
    base_state, _ = net_state_dict(read_checkpoint(base_ckpt))
    for name, value in loaded.net.net.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(value, base_state[name.replace(".base_layer", "")], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in ckpt["state_dict"].items() if "lora_B" in k)
    # 4. resume (the base again from init_from) continues the adapters
    run_train(run, [*overrides, "trainer.max_steps=3", f"ckpt_path={run}"])
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    # 5. sample.py rebuilds base + adapters from the checkpoint; without the base it says which file is missing
    out = tmp_path / "samples"
    result = run_cli(
        "sample.py",
        f"ckpt={run}",
        "n=2",
        f"out={out}",
        "sampler=ddim",
        "sampler.steps=2",
        "device=cpu",
        "progress=false",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "grid.png").exists()
    moved = tmp_path / "moved.ckpt"
    shutil.move(base_ckpt, moved)
    try:
        result = run_cli("sample.py", f"ckpt={run}", "n=1", f"out={tmp_path / 's2'}", "device=cpu")
    finally:
        shutil.move(moved, base_ckpt)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: checkpoint {base_ckpt} does not exist"


def test_lora_config_errors(tmp_path, base_ckpt):
    import train

    for overrides, message in [
        (["finetune=lora"], "finetune=lora needs base weights"),
        (["finetune=full"], "finetune=full needs base weights"),
        (["finetune=lora", f"init_from={base_ckpt}", "init.strict=false"], "needs its base loaded whole"),
        (["finetune=lora", f"init_from={base_ckpt}", "finetune.target_modules=[nope]"], "finetune.target_modules"),
    ]:
        cfg = compose_train(tmp_path / "run", [*QUIET, *ATTN, *overrides])
        with pytest.raises(ValueError, match=message):
            train.train(cfg)
