#!/usr/bin/env bash
# The README's GPU figures and the gpu-marked tests, as one prepared run on one CUDA GPU (an H200 here).
#   bash bench/gpu.sh [out_dir]        (default: gpu_out; the device tool passes $OUT)
# 1. the gpu-marked tests (compile, 16-mixed, fused attention kernels, the on-device non-finite guard);
# 2. training throughput of unet_base at 32x32, batch 128, bf16-mixed, ours vs a bare loop, with and without
#    module.channels_last and module.compile (images/s, peak memory, MFU);
# 3. sampling speed, DPM-Solver++ 20 steps at batch 500, fp32 vs bf16.
# Needs torch, lightning, hydra-core, omegaconf, pytest, pyyaml, scikit-learn on the machine.
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=offline
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } \
  | tee "$out/env.txt"
model="model=unet_base data.image_size=32 data.channels=3"
bench() { timeout "$1" python3 bench/throughput.py $model --device cuda --precision bf16-mixed --batch 128 \
  --steps 40 --warmup 10 "${@:2}" 2>&1 | grep -vi warn | tee -a "$out/throughput.txt"; }
bench 120 --rounds 3
bench 120 --rounds 3 --channels-last
timeout 120 python3 bench/sampling_speed.py $model --batch 500 --steps 20 --precisions fp32,bf16 2>&1 \
  | tee "$out/sampling.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_scale.py tests/test_training_path.py 2>&1 \
  | tail -25 | tee "$out/gpu_tests.txt"
bench 150 --rounds 2 --compile --channels-last
bench 150 --rounds 2 --compile
