#!/usr/bin/env bash
# GPU benchmarks at OpenVLA-7B shape (random init): probe + ICSM, then training step time / memory.
# Usage on the GPU machine, from the repo root:  bash bench/gpu_icsm_train.sh OUTDIR
set -uo pipefail
OUT=${1:-/tmp/bench-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 VLAFORGET_NO_PROGRESS=1
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
[ -f /tmp/icsm7b/meta.json ] || python3 -m vlaforget.cli bench icsm --shape 7b --n-probe "${N_PROBE:-500}" --r 128 --sens "${SENS:-128}" \
  --direction-batch "${DIR_BATCH:-16}" --probe-batch 16 --out /tmp/icsm7b --json "$OUT/bench_icsm.json" 2>&1 | tail -25
python3 -m vlaforget.cli bench train --shape 7b --icsm-dir /tmp/icsm7b --precision bf16 --batch 2 --accum 8 \
  --steps "${STEPS:-12}" --warmup 3 --grad-ckpt --thermostat-every 5 --amortise-every 50 --json "$OUT/bench_train.json" 2>&1 | tail -40
