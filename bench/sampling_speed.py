"""Sampling speed of a network from conf/ at a given batch, in each sampling precision, side by side.

    python bench/sampling_speed.py model=unet_base data.image_size=32 data.channels=3 --batch 500 --steps 20

Builds the network as train.py would (random weights: speed does not depend on them), and times a whole
DPM-Solver++ run (`--steps` network calls) of `--batch` images in fp32 and bf16 (`sample.py precision=...`),
alternating the precisions over `--rounds` rounds and reporting the median. Prints images/s and the peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, as for train.py (model=unet_base ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from diffusion.samplers import dpmpp_sample, with_precision

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    torch.manual_seed(0)
    net = instantiate(cfg.model).to(args.device).eval()
    schedule = instantiate(cfg.process).to(args.device)
    shape = (args.batch, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    noise = torch.randn(shape, device=args.device)
    precisions = args.precisions.split(",")
    rates: dict[str, list[float]] = {p: [] for p in precisions}
    peaks: dict[str, float] = {p: 0.0 for p in precisions}

    def run(precision: str) -> float:
        model = with_precision(lambda x, t: net(x, t), precision, args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        dpmpp_sample(model, schedule, noise, steps=args.steps)
        if args.device == "cuda":
            torch.cuda.synchronize()
            peaks[precision] = max(peaks[precision], torch.cuda.max_memory_allocated() / 2**30)
        return args.batch / (time.perf_counter() - start)

    for p in precisions:  # warm-up: cuDNN autotuning, allocator
        run(p)
    for r in range(args.rounds):
        for p in precisions if r % 2 == 0 else precisions[::-1]:
            rates[p].append(run(p))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{n_params / 1e6:.1f}M params, {shape[-1]}px, batch {args.batch}, DPM-Solver++ {args.steps} steps on {name}")
    base = statistics.median(rates[precisions[0]])
    for p in precisions:
        median = statistics.median(rates[p])
        print(
            f"  {p}: {median:9.1f} images/s  x{median / base:.2f}  peak {peaks[p]:.2f} GiB  "
            f"(rounds: {', '.join(f'{v:.1f}' for v in rates[p])})"
        )


if __name__ == "__main__":
    main()
