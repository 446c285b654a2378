"""Training throughput of our train.py path against a bare PyTorch loop, side by side in one process.

Both paths train the same network (same initial weights), on batches from the same datamodule, at the
same batch size and precision, with the same AdamW and gradient clipping. "ours" is the real Lightning Trainer +
DiffusionModule + datamodule built from conf/ exactly as train.py builds them (no callbacks, no loggers, no
validation); "bare" is a hand-written loop: q_sample, forward, fp32 MSE, backward, clip, step. The rounds
alternate between the two so that drift in machine load hits both alike; each round's rate comes from the
median step on a CPU (robust to load bursts on a shared machine) and from the whole window on a GPU, and the
median round is reported.

    python bench/throughput.py                                  # CPU: unet_small on the digits, fp32
    python bench/throughput.py model=unet_base data.image_size=32 data.channels=3 --device cuda \
        --precision bf16-mixed [--compile] [--channels-last] --batch 128
    python bench/throughput.py --model dit_b2 --latents 4x32 --device cuda --precision bf16-mixed --compile

`--latents CxS` trains on cached latents of C channels at SxS (4x32: Stable Diffusion's VAE at 256 px, the shape
DiT's ImageNet-256 runs train on): random tensors held in memory, as a `codec=vae data.cache=true` run reads its
latent cache, so the figure is the network's and the loop's, not the VAE's or the disk's.

Prints images/s for each path, their ratio (ours / bare), peak memory (CUDA) and, on a GPU, the model FLOPs
utilization (FLOPs of one forward+backward counted by torch.utils.flop_counter over the device's peak).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16/fp16 tensor-core peaks (FLOP/s), for model FLOPs utilization.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/tmp/bench_throughput"
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def batches(datamodule, n: int):
    """n batches from the datamodule's training loader (restarted at the end of an epoch)."""
    i = 0
    while True:
        for batch in datamodule.train_dataloader():
            if i == n:
                return
            i += 1
            yield batch


class CachedLatents:
    """Stands in for a latent cache: `n` random (C, S, S) latents in memory, with the datamodule interface the
    two loops read (`train_dataloader`, `setup`)."""

    def __init__(self, channels: int, size: int, batch_size: int, n: int = 4096) -> None:
        import lightning as L

        class Module(L.LightningDataModule):
            def train_dataloader(self):
                return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)

        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(n, channels, size, size, generator=g), torch.zeros(n))
        self.module = Module()


def rate(stamps: list[float], batch: int, device: str) -> float:
    """Images/s from the start times of the timed steps plus the end time. On a GPU (asynchronous; the stamps
    at both ends follow a synchronize) the whole window counts; on a CPU the median step, which a burst of load
    from other processes on a shared machine moves much less than the mean."""
    if device == "cuda":
        return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return batch / statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


class Timer:
    """Lightning callback: the start time of every step from `warmup` on, and the end of training."""

    def __init__(self, warmup: int, device: str) -> None:
        import lightning as L

        self.stamps: list[float] = []

        class _CB(L.Callback):
            def on_train_batch_start(cb, trainer, *args) -> None:
                if trainer.global_step >= warmup:
                    if trainer.global_step == warmup:
                        sync(device)
                    self.stamps.append(time.perf_counter())

            def on_train_end(cb, trainer, *args) -> None:
                sync(device)
                self.stamps.append(time.perf_counter())

        self.callback = _CB()


def run_ours(cfg, net_state, datamodule, args) -> float:
    """Images/s through the Trainer + DiffusionModule path (as train.py builds them)."""
    from hydra.utils import instantiate

    from diffusion.model import DiffusionModel

    net = instantiate(cfg.model)
    net.load_state_dict(net_state)
    model = DiffusionModel(net=net, process=instantiate(cfg.process))
    module = instantiate(cfg.module, model=model, optimizer=instantiate(cfg.optim.optimizer))
    timer = Timer(args.warmup, args.device)
    trainer = instantiate(
        cfg.trainer,
        callbacks=[timer.callback],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        max_steps=args.warmup + args.steps,
    )
    trainer.fit(module, datamodule=datamodule)
    return rate(timer.stamps, args.batch, args.device)


def run_bare(cfg, net_state, datamodule, args) -> float:
    """Images/s through a hand-written loop over the same network, data, optimizer and precision."""
    from hydra.utils import instantiate

    device = torch.device(args.device)
    process = instantiate(cfg.process).to(device)
    net = instantiate(cfg.model)
    net.load_state_dict(net_state)
    net.to(device).train()
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    forward = torch.compile(net.forward) if args.compile else net
    optimizer = instantiate(cfg.optim.optimizer)(net.parameters())
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(enabled=args.precision == "16-mixed")
    clip = cfg.trainer.gradient_clip_val
    stamps: list[float] = []
    for i, (x0, _) in enumerate(batches(datamodule, args.warmup + args.steps)):
        if i >= args.warmup:
            if i == args.warmup:
                sync(args.device)
            stamps.append(time.perf_counter())
        x0 = x0.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        level = process.draw_levels(x0.shape[0], device=device)  # any family: a step, a sigma or a flow time
        noise = torch.randn_like(x0)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = forward(*process.net_input(process.q_sample(x0, level, noise), level), None)
        mse = (out.float() - process.target(x0, noise, level).float()).square().flatten(1).mean(1)
        loss = (mse * process.loss_weight(level)).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    sync(args.device)
    stamps.append(time.perf_counter())
    return rate(stamps, args.batch, args.device)


def step_flops(cfg, net_state, args) -> float:
    """FLOPs of one forward + backward of the network at this batch (torch.utils.flop_counter)."""
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode

    net = instantiate(cfg.model)
    net.load_state_dict(net_state)
    net.to(args.device)
    size, ch = cfg.model.image_size, cfg.model.in_channels
    x = torch.randn(args.batch, ch, size, size, device=args.device)
    t = torch.randint(0, 1000, (args.batch,), device=args.device)
    with FlopCounterMode(display=False) as counter:
        net(x, t).float().square().mean().backward()
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, as for train.py (model=unet_base ...)")
    parser.add_argument("--model", default="unet_small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="32-true | bf16-mixed | 16-mixed")
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per round (compilation, allocator)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours / bare")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (module.compile=true)")
    parser.add_argument("--channels-last", action="store_true", help="module.channels_last=true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--latents", default=None, help="CxS: train on cached C-channel SxS latents (4x32)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import lightning as L

    overrides = [
        f"model={args.model}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        f"trainer.precision={args.precision}",
        "trainer.enable_progress_bar=false",
        "callbacks=none",
        "logger=none",
        f"data.batch_size={args.batch}",
        f"module.compile={str(args.compile).lower()}",
        f"module.channels_last={str(args.channels_last).lower()}",
        *args.overrides,
    ]
    latents = tuple(int(v) for v in args.latents.split("x")) if args.latents else None
    if latents:  # the network in the latents' shape, as train.assemble builds it for codec=vae
        overrides += [f"model.in_channels={latents[0]}", f"model.image_size={latents[1]}"]
    cfg = compose(overrides)
    from hydra.utils import instantiate

    L.seed_everything(0, workers=True)
    if latents:
        datamodule = CachedLatents(*latents, batch_size=args.batch).module
    else:
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
    net_state = copy.deepcopy(instantiate(cfg.model).state_dict())
    n_params = sum(v.numel() for v in net_state.values())

    ours, bare, peaks = [], [], {"ours": 0, "bare": 0}
    for r in range(args.rounds):
        order = (("bare", run_bare, bare), ("ours", run_ours, ours))
        for name, fn, out in order if r % 2 == 0 else order[::-1]:
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            out.append(fn(cfg, net_state, datamodule, args))
            if args.device == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())

    o, b = statistics.median(ours), statistics.median(bare)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{cfg.hydra.runtime.choices.model} ({n_params / 1e6:.1f}M params) "
        f"{f'{args.latents} latents' if latents else f'{cfg.model.image_size}px'} "
        f"batch {args.batch} {args.precision} "
        f"compile={args.compile} channels_last={args.channels_last} on {name}, "
        f"{args.steps} steps x {args.rounds} rounds"
    )
    print(f"  ours: {o:9.1f} images/s   (rounds: {', '.join(f'{v:.1f}' for v in ours)})")
    print(f"  bare: {b:9.1f} images/s   (rounds: {', '.join(f'{v:.1f}' for v in bare)})")
    paired = statistics.median(x / y for x, y in zip(ours, bare))  # rounds ran back to back: same load
    print(f"  ratio ours/bare: {paired:.3f} (median of the rounds' ratios; of the medians: {o / b:.3f})")
    if args.device == "cuda":
        print(f"  peak memory: ours {peaks['ours'] / 2**30:.2f} GiB, bare {peaks['bare'] / 2**30:.2f} GiB")
        by_name = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        peak = args.peak_tflops * 1e12 if args.peak_tflops else by_name
        flops = step_flops(cfg, net_state, args)
        if peak:
            mfu = flops * (o / args.batch) / peak
            print(f"  model FLOPs {flops / 1e12:.2f} TFLOP/step, MFU ours {100 * mfu:.1f}% of {peak / 1e12:.0f}T")
    else:
        import resource

        print(f"  peak process RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (both paths)")


if __name__ == "__main__":
    main()
