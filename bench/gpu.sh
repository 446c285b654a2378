#!/usr/bin/env bash
# Every GPU figure of the README and docs, and the gpu-marked tests, as one prepared run on one CUDA GPU.
#   bash bench/gpu.sh [out_dir]        (default: gpu_out; the device tool passes $OUT)
#   TINY=1 bash bench/gpu.sh /tmp/g    (the same script on a CPU with tiny networks: checks it runs, in a minute)
# In the order of what matters most if the card's time runs out (each step has its own timeout):
# 1. training throughput, bf16-mixed + torch.compile, ours (train.py's Trainer path) vs a bare PyTorch loop of the
#    same network in the same process (bench/throughput.py): DiT-B/2 and DiT-S/2 on 32x32x4 cached latents (the
#    ImageNet-256 latent shape) and unet_base at 32x32x3, at batch 256, then DiT-B/2 at 128 and 512 (which batch fills the card best):
#    images/s, peak memory, MFU (model FLOPs of one forward + backward counted by torch.utils.flop_counter, over
#    the card's dense bf16 peak);
# 2. the gpu-marked tests (compile, 16-mixed, fused attention kernels, the on-device non-finite guard, DiT);
# 3. unet_base eager and channels-last rows; sampling speed, DPM-Solver++ 20 steps at batch 500, fp32 vs bf16;
# 4. fine-tuning memory (bench/finetune_gpu.py): SD 1.5 / SDXL / SD3-medium / Flux-dev denoisers from their configs,
#    LoRA rank 16 and full, gradient checkpointing and 8-bit AdamW on / off, then diffusers' LoRA example script.
#    ONLY=finetune runs this step alone (one ~8-minute device call; it also needs diffusers, bitsandbytes, peft,
#    and datasets for the example script: docs/finetune.md, "Memory", gives the command with the wheels).
# Needs torch, lightning, hydra-core, omegaconf, pytest, pyyaml, scikit-learn on the machine.
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=offline
if [[ ${TINY:-0} == 1 ]]; then  # CPU dry run: tiny networks, 2 steps, no compile (its first steps take minutes)
  dev="--device cpu --precision bf16-mixed --steps 2 --warmup 1 --rounds 1"; batches="8 4"; compile=""
  dits="dit_tiny"; unet_name=unet_tiny; sdev="--device cpu"; latents="--latents 4x8"; unet_size="data.image_size=16 data.channels=3"
  sample_batch=8; t=300
else
  dev="--device cuda --precision bf16-mixed --steps 30 --warmup 10 --rounds 2"; batches="256 128 512"
  compile="--compile"; dits="dit_b2 dit_s2"; unet_name=unet_base; sdev="--device cuda"; latents="--latents 4x32"
  unet_size="data.image_size=32 data.channels=3"; sample_batch=500; t=240
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } \
  | tee "$out/env.txt"
throughput() { timeout "$t" python3 bench/throughput.py $dev "$@" 2>&1 | grep -vi warn | tee -a "$out/throughput.txt"; }
finetune() {  # step 4; the tiny run checks the script and diffusers' example on the CPU in a minute
  if [[ ${TINY:-0} == 1 ]]; then ft="--tiny --device cpu --steps 2 --warmup 1"; else ft="--device cuda"; fi
  timeout 500 python3 bench/finetune_gpu.py $ft --peer --json "$out/finetune.json" 2>&1 | grep -vi warn \
    | tee "$out/finetune.txt"
}
if [[ ${ONLY:-} == finetune ]]; then finetune; exit; fi
first=${batches%% *}
for m in $dits; do throughput --model "$m" $latents --batch "$first" $compile; done
throughput --model "$unet_name" $unet_size --batch "$first" $compile
for b in ${batches#"$first"}; do throughput --model "${dits%% *}" $latents --batch "$b" $compile; done
if [[ ${TINY:-0} != 1 ]]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_scale.py tests/test_training_path.py \
    tests/test_dit.py 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
fi
throughput --model "$unet_name" $unet_size --batch 128
throughput --model "$unet_name" $unet_size --batch 128 --channels-last
finetune
timeout "$t" python3 bench/sampling_speed.py model="$unet_name" $unet_size --batch "$sample_batch" --steps 20 \
  --precisions fp32,bf16 $sdev 2>&1 | grep -vi warn | tee "$out/sampling.txt"
