#!/usr/bin/env bash
# Issue 28 measurements on one GPU under a smaller card's memory cap: every method (baseline, ICSM + HSW +
# Thermostat, CRaFT fused and separate) with a checkpoint save, the periodic-eval forward and the export
# merge, plus the plain-PEFT reference, on OpenVLA-7B's REAL architecture (openvla's code + its pinned
# stack as wheels) where it runs, else the two-tower stand-in.
# Usage on the GPU machine, from a folder holding src/, bench/, openvla_hf/ (openvla's
# prismatic/extern/hf/*.py, never committed), whl-ovla/ (py3.12 wheels: transformers 4.40.1, tokenizers
# 0.19.1, timm 0.9.16, peft 0.11.1, huggingface_hub 0.23.4) and whl-native/ (peft for the image's stack):
#   bash bench/gpu_issue28.sh OUTDIR PART       PART: bf16 (4090 profile, cap 23.5 GiB) | fp16 (V100, 31.2 GiB)
#                                               | each (one process per SPECS entry PREC:METHOD[@BS:ACCUM])
# Env: STEPS (30), BATCH (16), ACCUM (1), BACKEND (auto: openvla if it builds, else standin), LIMIT (s per bench).
set -uo pipefail
OUT=${1:-/tmp/bench-out}
PART=${2:-bf16}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" /tmp/vf
export PYTHONUNBUFFERED=1 VLAFORGET_NO_PROGRESS=1 VLAFORGET_ALLOWED_ROOT=/tmp/vf VLAFORGET_ROOT=/tmp/vf/root
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
NATIVE=$HERE/src
if ! python3 -c "import peft" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-native "$HERE"/whl-native/*.whl
  NATIVE=/tmp/site-native:$HERE/src
fi
[ -d /tmp/site-ovla ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-ovla "$HERE"/whl-ovla/*.whl
run_native() { PYTHONPATH=$NATIVE timeout ${LIMIT:-420} python3 -m vlaforget.cli "$@"; }
run_ovla() { PYTHONPATH=/tmp/site-ovla:$HERE/src VLAFORGET_OPENVLA_CODE=$HERE/openvla_hf timeout ${LIMIT:-420} \
  python3 -m vlaforget.cli "$@"; }
# ICSM artifacts for HSW's groups and the Thermostat's basis: the LLM (Llama-2-7B) is the same in both
# backends, so the stand-in computes them (a small run; the training numbers are what matters here)
[ -f /tmp/icsm7b/meta.json ] || run_native bench icsm --shape 7b --n-probe 64 --r 64 --sens 8 \
  --direction-batch 16 --probe-batch 16 --out /tmp/icsm7b --json "$OUT/issue28_icsm_small.json" 2>&1 | tail -2
if [ "$PART" = each ]; then
  # one process per (precision, method): no memory carried over from the previous model; a method over
  # the profile's reserved limit (22 GiB bf16 / 30 GiB fp16) or out of memory at micro-batch 16 is
  # measured again at 8 x grad_accum 2 (the same effective batch)
  T=${STEPS:-30}
  for spec in ${SPECS:-bf16:icsm_hsw_thermostat bf16:craft bf16:craft+separate fp16:baseline fp16:icsm_hsw_thermostat fp16:craft fp16:craft+separate fp16:peft_reference}; do
    PREC=${spec%%:*}; M=${spec#*:}; BAS="16:1 8:2"
    case $M in *@*) BAS=${M#*@}; M=${M%@*};; esac    # PREC:METHOD@BS:ACCUM: that micro-batch only
    if [ "$PREC" = fp16 ]; then CAP=31.2; LIM=30; else CAP=23.5; LIM=22; fi
    for BA in $BAS; do
      BS=${BA%%:*}; AC=${BA#*:}
      J="$OUT/issue28_openvla_${PREC}_b${BS}_${M/+/_}.json"
      run_ovla bench train --shape 7b --icsm-dir /tmp/icsm7b --batch $BS --accum $AC --steps $T --warmup 3 --grad-ckpt \
        --thermostat-every 10 --thermostat-chunk 32 --amortise-every 50 --anchor-batch 8 --precision $PREC \
        --num-workers 6 --memory-cap-gib $CAP --eval-every $(( T / 2 )) --save-every $(( T / 2 )) --export-merge \
        --backend openvla --methods $M --json "$J" > "${J%.json}.log" 2>&1
      python3 "$HERE/bench/issue28_fits.py" "$J" "$M" $LIM && break
    done
  done
  exit 0
fi
if [ "$PART" = fp16 ]; then PREC=fp16; CAP=31.2; else PREC=bf16; CAP=23.5; fi
T=${STEPS:-30}
HALF=$(( T / 2 ))
COMMON="--shape 7b --icsm-dir /tmp/icsm7b --batch ${BATCH:-16} --accum ${ACCUM:-1} --steps $T --warmup 3 --grad-ckpt
  --thermostat-every 10 --thermostat-chunk 32 --amortise-every 50 --anchor-batch 8 --precision $PREC --num-workers 6
  --memory-cap-gib $CAP --eval-every $HALF --save-every $HALF --export-merge"
METHODS=${METHODS:-baseline,icsm_hsw_thermostat,craft,craft+separate,peft_reference}
B=${BACKEND:-auto}
if [ "$B" = auto ] || [ "$B" = openvla ]; then
  run_ovla bench train $COMMON --backend openvla --methods $METHODS \
    --json "$OUT/issue28_openvla_${PREC}_b${BATCH:-16}.json" 2>&1 \
    | grep -v -E "Loading weights|FutureWarning|warnings.warn|UserWarning" | tail -40
  python3 - "$OUT/issue28_openvla_${PREC}_b${BATCH:-16}.json" <<'EOF' || B=standin
import json, sys
d = json.load(open(sys.argv[1]))
ok = "baseline" in d["methods"] and "error" not in d["methods"]["baseline"]
print("openvla backend ran:", ok)
sys.exit(0 if ok else 1)
EOF
fi
if [ "$B" = standin ]; then
  run_native bench train $COMMON --backend standin --methods $METHODS \
    --json "$OUT/issue28_standin_${PREC}_b${BATCH:-16}.json" 2>&1 \
    | grep -v -E "Loading weights|FutureWarning|warnings.warn|UserWarning" | tail -40
fi
ls -la "$OUT"
