#!/usr/bin/env bash
# Issue 16 measurements at OpenVLA-7B shape on one GPU: every method at the profiles' micro-batch
# (bf16 = 4090 profile, fp16 = V100 profile), the plain-PEFT reference in the same run.
# Usage on the GPU machine, from the repo root:  bash bench/gpu_issue16.sh OUTDIR [PART]
#   PART: all (default) | bf16 | fp16 | sweep (CRaFT anchor batch, Thermostat chunk, CRaFT profile) | final | overhead
#         | speed (session 6: CRaFT fused vs separate pass, fused AdamW, torch.compile, beside baseline / method / reference)
set -uo pipefail
OUT=${1:-/tmp/bench-out}
PART=${2:-all}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 VLAFORGET_NO_PROGRESS=1
export VLAFORGET_ALLOWED_ROOT=/tmp/vlaforget-bench VLAFORGET_ROOT=/tmp/vlaforget-bench/root
mkdir -p /tmp/vlaforget-bench
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
T=${STEPS:-12}
# ICSM artifacts for the method's HSW groups and Thermostat basis (a small run: the numbers that
# matter here are the training ones)
[ -f /tmp/icsm7b/meta.json ] || [ "$PART" = speed2 ] || python3 -m vlaforget.cli bench icsm --shape 7b --n-probe 128 --r 64 --sens 16 \
  --direction-batch 16 --probe-batch 16 --out /tmp/icsm7b --json "$OUT/icsm_small.json" 2>&1 | tail -3
COMMON="--shape 7b --icsm-dir /tmp/icsm7b --batch ${BATCH:-16} --accum ${ACCUM:-1} --steps $T --warmup 3 --grad-ckpt --thermostat-every 4 --amortise-every 50 --anchor-batch ${ANCHOR:-8}"
if [ "$PART" = all ] || [ "$PART" = bf16 ]; then
  python3 -m vlaforget.cli bench train $COMMON --precision bf16 --num-workers ${WORKERS:-4} \
    --methods baseline,icsm_hsw_thermostat,craft,peft_reference --json "$OUT/train_bf16.json" 2>&1 | grep -v "Loading weights" | tail -60
fi
if [ "$PART" = all ] || [ "$PART" = fp16 ]; then
  python3 -m vlaforget.cli bench train $COMMON --precision fp16 --num-workers ${WORKERS:-4} \
    --methods baseline,icsm_hsw_thermostat,craft --json "$OUT/train_fp16.json" 2>&1 | grep -v "Loading weights" | tail -60
fi
if [ "$PART" = sweep ]; then
  python3 -m vlaforget.cli bench train $COMMON --precision bf16 --num-workers ${WORKERS:-4} \
    --methods baseline,icsm_hsw_thermostat,craft --json "$OUT/train_bf16_b.json" 2>&1 | grep -v "Loading weights" | tail -30
  python3 -m vlaforget.cli bench train ${COMMON/--anchor-batch ${ANCHOR:-8}/--anchor-batch 4} --precision bf16 \
    --methods craft --json "$OUT/craft_anchor4.json" 2>&1 | grep -v "Loading weights" | tail -5
  python3 -m vlaforget.cli bench train $COMMON --precision bf16 --thermostat-chunk 32 \
    --methods icsm_hsw_thermostat --json "$OUT/thermostat_chunk32.json" 2>&1 | grep -v "Loading weights" | tail -5
  python3 -m vlaforget.cli bench train ${COMMON/--steps $T/--steps 6} --precision bf16 --profile \
    --methods craft --json "$OUT/craft_profiled.json" 2>&1 | grep -v "Loading weights" | tail -5
  head -12 "$OUT/craft_profiled.json.profile_craft.txt"
fi
if [ "$PART" = final ]; then
  python3 -m vlaforget.cli bench train $COMMON --precision bf16 --num-workers ${WORKERS:-4} --thermostat-chunk 32 \
    --methods baseline,icsm_hsw_thermostat,craft,peft_reference --json "$OUT/train_bf16_final.json" 2>&1 | grep -v "Loading weights" | tail -40
fi
if [ "$PART" = overhead ]; then  # baseline vs method only, more timed steps (the overhead target)
  python3 -m vlaforget.cli bench train ${COMMON/--thermostat-every 4/--thermostat-every 10} --precision bf16 --num-workers ${WORKERS:-4} \
    --thermostat-chunk 32 --methods baseline,icsm_hsw_thermostat --json "$OUT/train_overhead.json" 2>&1 | grep -v "Loading weights" | tail -40
fi
if [ "$PART" = speed ]; then  # one invocation: before (craft+separate = the old CRaFT pass) and after, the speed keys
  # each variant builds its own model; a failing variant (e.g. +compile) is recorded as an error and the
  # JSON is rewritten after every variant, so a run cut by its time limit keeps what it measured
  timeout ${LIMIT:-300} python3 -m vlaforget.cli bench train $COMMON --precision bf16 --num-workers ${WORKERS:-4} --thermostat-chunk 32 \
    --methods ${VARIANTS:-baseline,craft+separate,craft,peft_reference,icsm_hsw_thermostat,baseline+fused_optimizer,baseline+no_input_cast,baseline+compile} \
    --json "$OUT/train_speed.json" 2>&1 | grep -v -E "Loading weights|FutureWarning|warnings.warn" | tail -60
fi
if [ "$PART" = speed2 ]; then  # after the fused pass's custom row-split matmul; one process per group (no carry-over of memory)
  python3 -m vlaforget.cli bench train $COMMON --precision bf16 --num-workers ${WORKERS:-4} \
    --methods baseline,craft --json "$OUT/train_speed2_craft.json" 2>&1 | grep -E "^\s+\"(step_time_s_median|peak_mem_gib|peak_reserved_gib)\"|baseline|craft\b|Error" | tail -20
  python3 -m vlaforget.cli bench train $COMMON --precision bf16 --num-workers ${WORKERS:-4} \
    --methods baseline+compile,peft_reference --json "$OUT/train_speed2_compile.json" 2>&1 | grep -E "^\s+\"(step_time_s_median|peak_mem_gib|peak_reserved_gib)\"|Error" | tail -20
fi
