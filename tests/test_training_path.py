"""The training path's plumbing: the network registered once, compile on/off resumes, clipping with fused
optimizers, the non-finite guard reusing the clipping norm, fp32 EMA in checkpoints, fused-kernel-ready attention,
low-precision sampling and the declared torch floor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import torch

from diffusion.checkpoint import NET_PREFIX, read_checkpoint
from diffusion.guard import check_fused_clipping
from diffusion.model import DiffusionModel
from diffusion.module import DiffusionModule
from diffusion.process.discrete import NoiseSchedule
from diffusion.samplers import precision_from_trainer, with_precision
from diffusion.unet import AttentionBlock, UNet
from tests.conftest import ROOT, run_cli, run_train
from tests.test_scale import NO_GRIDS, PoisonBatch, _poison  # noqa: F401  (PoisonBatch is named by _poison)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny_net(**kw) -> UNet:
    return UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), norm_groups=4, **kw)


# --- the network is registered once -----------------------------------------------------------------------
@pytest.mark.parametrize("compile", [False, True])
def test_checkpoint_holds_the_network_once(compile, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the registration, not inductor, is under test
    net = _tiny_net()
    module = DiffusionModule(model=DiffusionModel(net=net, process=NoiseSchedule(num_steps=10)), compile=compile)
    tensors = {k: v for k, v in module.state_dict().items() if not k.startswith("val_")}
    assert set(tensors) == {NET_PREFIX + k for k in net.state_dict()}
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("first,second", [("false", "true"), ("true", "false")])
def test_resume_across_compile_settings(tmp_path, monkeypatch, first, second):
    """A run written with module.compile=X resumes with module.compile=not X (same weights, same step count)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # inductor is slow on CPU and beside the point
    run = tmp_path / "run"
    run_train(run, [f"module.compile={first}", "trainer.max_steps=2", *NO_GRIDS])
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert not any(k.startswith("net_forward.") for k in ckpt["state_dict"])
    run_train(run, [f"module.compile={second}", "trainer.max_steps=4", f"ckpt_path={run}", *NO_GRIDS])
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_old_checkpoints_with_a_second_copy_still_resume(tmp_path):
    """Checkpoints written before the fix (format 1: "net." keys) also hold the network as net_forward.*: resuming
    drops that copy."""
    run = tmp_path / "run"
    run_train(run, ["trainer.max_steps=2", *NO_GRIDS])
    path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    description = ckpt["diffusion"]
    ckpt["diffusion"] = {**description, "format": 1, "schedule": description.pop("process")}
    net = {k[len(NET_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(NET_PREFIX)}
    old = {"net." + k: v for k, v in net.items()}
    ckpt["state_dict"] = {**old, **{"net_forward." + k: v.clone() for k, v in net.items()}}
    torch.save(ckpt, path)
    run_train(run, ["trainer.max_steps=4", f"ckpt_path={run}", *NO_GRIDS])
    assert read_checkpoint(path)["global_step"] == 4


# --- gradient clipping with fused optimizers, and the guard ------------------------------------------------
def test_fused_adamw_with_clipping_trains_under_bf16_mixed(tmp_path):
    """The flagship recipes' combination: fused AdamW, bf16-mixed, gradient_clip_val=1 (Lightning refuses it)."""
    run = tmp_path / "run"
    options = ["trainer.precision=bf16-mixed", "optim.optimizer.fused=true", "trainer.gradient_clip_val=1.0"]
    _, val_loss = run_train(run, [*options, *NO_GRIDS])
    assert val_loss is not None and 0 < val_loss < 10
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_fused_optimizer_with_clipping_under_16_mixed_is_refused_at_start():
    module = DiffusionModule(model=DiffusionModel(net=_tiny_net(), process=NoiseSchedule(num_steps=10)))

    class Plugin:
        scaler = object()  # 16-mixed: a gradient scaler

    class Trainer:
        gradient_clip_val = 1.0
        precision = "16-mixed"
        precision_plugin = Plugin()

    optimizer = torch.optim.AdamW(module.model.net.parameters(), fused=True)
    module.trainer = Trainer()  # attach a stand-in trainer: what the check reads, nothing else
    with pytest.raises(ValueError, match=r"optim.optimizer.fused=true under trainer.precision=16-mixed.*bf16-mixed"):
        check_fused_clipping(module.trainer, optimizer)


class _Trainer:
    """What configure_gradient_clipping reads from a trainer: no scaler, one process, nothing saved yet."""

    class precision_plugin:  # noqa: N801
        scaler = None

    world_size = 1
    global_step = 0
    checkpoint_callbacks: list = []  # the guard's advice names only checkpoints that exist
    ckpt_path = None


def _module_with_grads(scale: float) -> tuple[DiffusionModule, torch.optim.Optimizer]:
    module = DiffusionModule(model=DiffusionModel(net=_tiny_net(), process=NoiseSchedule(num_steps=10)))
    module.trainer = _Trainer()
    for p in module.model.net.parameters():
        p.grad = torch.full_like(p, scale)
    module.guard.add_loss(torch.tensor(1.0))
    return module, torch.optim.AdamW(module.model.net.parameters())


def test_clipping_clips_and_the_guard_reuses_its_norm(monkeypatch):
    module, optimizer = _module_with_grads(10.0)

    def no_second_norm(*args, **kwargs):
        raise AssertionError("the guard reduced the gradients a second time")

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", no_second_norm)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    grads = [p.grad for p in module.model.net.parameters()]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert total == pytest.approx(1.0, rel=1e-4)


def test_guard_without_clipping_stops_a_nonfinite_gradient():
    from diffusion.module import NonFiniteLossError

    module, optimizer = _module_with_grads(float("inf"))
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at step 1"):
        module.configure_gradient_clipping(optimizer, gradient_clip_val=None)


# --- EMA average in fp32 ---------------------------------------------------------------------------------
def test_ema_average_is_saved_in_fp32_under_bf16_true(tmp_path):
    run = tmp_path / "run"
    run_train(run, ["trainer.precision=bf16-true", "trainer.max_steps=2", *NO_GRIDS])
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert {v.dtype for k, v in ckpt["state_dict"].items() if k.startswith(NET_PREFIX)} == {torch.bfloat16}
    ema = ckpt["ema_state_dict"]
    assert {v.dtype for v in ema.values() if v.is_floating_point()} == {torch.float32}


# --- attention in the fused kernels' layout ----------------------------------------------------------------
def test_attention_hands_sdpa_contiguous_heads_and_matches_explicit_softmax():
    torch.manual_seed(0)
    block = AttentionBlock(64, head_dim=16, groups=8)
    torch.nn.init.normal_(block.proj.weight, std=0.1)  # the zero-initialised output would hide everything
    x = torch.randn(2, 64, 8, 8)
    for layout in (torch.contiguous_format, torch.channels_last):
        xin = x.contiguous(memory_format=layout)
        q, k, v = block.heads_qkv(xin)  # each (B, heads, HW, d)
        assert q.shape == (2, 4, 64, 16)
        # Flash and memory-efficient SDPA need the head dimension contiguous (stride 1).
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        # The same numbers as attention written out: softmax(q k^T / sqrt(d)) v, heads over channels h*d + j.
        qkv = block.qkv(block.norm(xin)).reshape(2, 3, 4, 16, 64)  # (B, 3, heads, d, HW)
        q2, k2, v2 = qkv.unbind(1)
        weights = torch.softmax(q2.transpose(-1, -2) @ k2 / 4.0, dim=-1)  # (B, heads, HW, HW)
        out = (weights @ v2.transpose(-1, -2)).transpose(-1, -2).reshape(2, 64, 8, 8)
        torch.testing.assert_close(block(xin), x + block.proj(out), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@cuda
def test_attention_runs_on_the_fused_kernels_only():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    net = UNet(in_channels=3, image_size=32, base_channels=64, attention_head_dim=64).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    for layout in (torch.contiguous_format, torch.channels_last):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            reference = net(x, t)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                fused = net.to(memory_format=layout)(x.contiguous(memory_format=layout), t)
        torch.testing.assert_close(fused.float(), reference.float(), rtol=2e-2, atol=2e-2)


# --- sampling precision -------------------------------------------------------------------------------------
def test_precision_follows_the_trainer():
    assert [precision_from_trainer(p) for p in ("bf16-mixed", "bf16-true", "16-mixed", "32-true", None)] == [
        "bf16",
        "bf16",
        "fp16",
        "fp32",
        "fp32",
    ]
    with pytest.raises(ValueError, match="precision='int8'"):
        with_precision(lambda x, t: x, "int8", "cpu")


def test_bf16_sampling_runs_the_network_in_bf16_and_returns_fp32():
    net = _tiny_net().eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    seen = []
    net.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model = with_precision(lambda x, t: net(x, t), "bf16", "cpu")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        out, ref = model(x, t), net(x, t)
    assert seen == [torch.bfloat16, torch.float32] and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_sample_cli_precision_bf16(tmp_path):
    run = tmp_path / "run"
    run_train(run, ["trainer.max_steps=2", *NO_GRIDS])
    outs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        result = run_cli(
            "sample.py", f"ckpt={run}", f"out={out}", "n=4", "sampler=ddim", "sampler.steps=4", f"precision={precision}"
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outs[precision] = (out / "grid.png").read_bytes()
    assert outs["fp32"] and outs["bf16"]
    bad = run_cli("sample.py", f"ckpt={run}", f"out={tmp_path / 'bad'}", "precision=fp8")
    assert bad.returncode != 0 and "precision='fp8' is not one of" in bad.stderr


# --- the declared torch floor is true ---------------------------------------------------------------------------
# torch APIs whose first release is newer than what some torch>=2.x floor would admit: (pattern, first version).
VERSIONED_APIS = {
    r"torch\.nn\.utils\.get_total_norm": (2, 6),
    r"torch\.nn\.attention": (2, 3),
    r"\bfused=": (2, 4),  # fused AdamW on the CPU
}


def test_declared_torch_floor_covers_the_apis_the_code_calls():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.fullmatch(r"torch>=(\d+)\.(\d+).*", d) for d in deps if d.startswith("torch>="))
    floor = (int(floor.group(1)), int(floor.group(2)))
    code = "\n".join(p.read_text() for p in Path(ROOT / "diffusion").rglob("*.py"))
    used = {pattern: version for pattern, version in VERSIONED_APIS.items() if re.search(pattern, code)}
    assert used, "the table above no longer matches the code"
    for pattern, version in used.items():
        assert floor >= version, f"pyproject says torch>={floor}, but diffusion/ uses {pattern} (torch {version})"


@pytest.mark.gpu
@cuda
def test_nonfinite_step_is_skipped_on_the_device_without_a_sync(tmp_path):
    """CUDA + fused AdamW: the bad step never reaches the weights or AdamW's moments, and is read one step late."""
    run = tmp_path / "run"
    gpu = ["trainer=gpu", "optim.optimizer.fused=true", *NO_GRIDS]
    run_train(run, [*_poison(run, at_step=2), "module.nonfinite=skip", *gpu])
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert all(int(s["step"]) == 3 for s in ckpt["optimizer_states"][0]["state"].values())


@pytest.mark.gpu
@cuda
def test_nonfinite_error_on_the_device_keeps_the_last_good_checkpoint(tmp_path):
    from diffusion.module import NonFiniteLossError

    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3;"):
        run_train(
            run,
            [*_poison(run, at_step=2), "trainer.max_steps=6", "trainer=gpu", "optim.optimizer.fused=true", *NO_GRIDS],
        )
    ckpts = {p: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")}
    assert PoisonBatch.SNAPSHOT == ckpts
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_every_sampler_runs_with_the_schedule_on_the_gpu(sampler):
    """sample.py moves the schedule to the GPU: the logsnr grid (DPM-Solver++'s default) once mixed devices."""
    from diffusion.samplers import SAMPLERS

    schedule = NoiseSchedule(kind="cosine", num_steps=100, prediction="v").to("cuda")
    noise = torch.randn(2, 1, 8, 8, device="cuda")
    x = SAMPLERS[sampler](lambda x, t: torch.zeros_like(x), schedule, noise, steps=5, spacing="logsnr")
    assert x.device.type == "cuda" and torch.isfinite(x).all()


# --- last.ckpt (resume) apart from kept snapshots ------------------------------------------------------------
def test_last_checkpoint_holds_the_final_step_when_max_steps_is_off_the_period(tmp_path):
    run = tmp_path / "run"
    run_train(run, ["trainer.max_steps=5", *NO_GRIDS])  # snapshots every 2 steps (TINY)
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 5
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.ckpt")) == [
        "step_000002.ckpt",
        "step_000004.ckpt",
    ]


def test_last_checkpoint_is_refreshed_by_time_and_snapshots_keep_the_newest(tmp_path, monkeypatch):
    """last.ckpt every M minutes even between step periods; keep_last=2 keeps the newest two snapshots."""
    from diffusion.callbacks import checkpoints

    now = [0.0]

    def clock() -> float:
        now[0] += 61.0  # a minute passes between any two readings
        return now[0]

    monkeypatch.setattr(checkpoints.time, "monotonic", clock)
    run = tmp_path / "run"
    saved = []
    orig = checkpoints.ResumeCheckpoint.save
    monkeypatch.setattr(
        checkpoints.ResumeCheckpoint,
        "save",
        lambda self, trainer: (saved.append(trainer.global_step), orig(self, trainer)),
    )
    options = [
        "trainer.max_steps=6",
        "callbacks.model_checkpoint.keep_last=2",
        "callbacks.resume_checkpoint.every_n_steps=100",
        "callbacks.resume_checkpoint.every_n_minutes=1",
        "+callbacks.resume_checkpoint.check_every_n_steps=1",
        *NO_GRIDS,
    ]
    run_train(run, options)
    assert saved == [1, 2, 3, 4, 5, 6]  # by time only: the step period (100) never came
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.ckpt")) == [
        "step_000004.ckpt",
        "step_000006.ckpt",
    ]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_bad_checkpoint_periods_are_named():
    from diffusion.callbacks.checkpoints import ResumeCheckpoint, Snapshots

    with pytest.raises(ValueError, match="callbacks.resume_checkpoint.every_n_minutes=-1"):
        ResumeCheckpoint(dirpath="x", every_n_minutes=-1)
    with pytest.raises(ValueError, match="callbacks.model_checkpoint.keep_last=0"):
        Snapshots(dirpath="x", keep_last=0)


def test_validation_loss_stays_fp32_under_bf16_true(tmp_path, monkeypatch):
    """bf16-true casts the module, metric states included: val/loss must not be a bf16-rounded number."""
    seen = []
    original = DiffusionModule.on_validation_epoch_end

    def spy(self):
        seen.append((self.val_loss.mean_value.dtype, self.val_bucket_loss[0].mean_value.dtype))
        return original(self)

    monkeypatch.setattr(DiffusionModule, "on_validation_epoch_end", spy)
    _, val_loss = run_train(tmp_path / "run", ["trainer.precision=bf16-true", *NO_GRIDS])
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert val_loss != float(torch.tensor(val_loss).to(torch.bfloat16))  # not on the bf16 grid
