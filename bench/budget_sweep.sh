#!/usr/bin/env bash
# Issue 27 item 1: choose the embedded study's fine-tuning budget by downstream learning, before
# looking at any method. On a lent GPU machine (same carry as bench/gpu_study.sh): the teacher via
# Snakemake (profiles/demo-gpu, --until the teacher's evaluations), then plain-LoRA baseline runs per
# (steps, lr) budget and seed, each trained and evaluated on both suites by the pipeline's own stages
# (configs from `vlaforget stage-config` with a budget overlay; one data root per budget beside the
# study's root, sharing its teacher, caches and probe through links).
#
#   bash bench/budget_sweep.sh SECONDS [SEEDS] ["STEPS LR" ...]
#   e.g. bash bench/budget_sweep.sh 560 "42 123 456" "60 3e-4" "120 3e-4" "240 1e-4"
# Writes $OUT/sweep.jsonl (one line per budget x seed: success per suite and task) and the logs.
set -u
BUDGET=${1:?seconds}; shift
SEEDS=${1:-42 123 456}; [ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- "60 3e-4" "120 3e-4" "240 3e-4" "120 1e-4" "240 1e-4" "480 1e-4"
T0=$(date +%s)
source bench/device_setup.sh || exit 1
CFG="config/config.yaml config/demo.yaml config/demo_gpu.yaml"
TEACHER_EVALS="$ROOT/evals/teacher/mw_upstream.json $ROOT/evals/teacher/mw_downstream.json"
python3 -m snakemake --profile profiles/demo-gpu --scheduler greedy $TEACHER_EVALS > "$OUT/teacher.log" 2>&1 \
  || { tail -30 "$OUT/teacher.log"; exit 1; }
echo "teacher + its evaluations: $(( $(date +%s) - T0 )) s"
VF="python3 -m vlaforget.cli"
one() {  # one budget x seed: train, then both suites' closed-loop evaluation
    steps=$1 lr=$2 seed=$3
    tag=s${steps}_lr${lr}; R=$ROOT/sweep/$tag; d=$R/stage-configs; key=mw_downstream__baseline__full__s$seed
    mkdir -p "$d"
    for x in models datasets probe artifacts hf_cache; do [ -e "$R/$x" ] || ln -sfn "$ROOT/$x" "$R/$x"; done
    printf 'train:\n  max_steps: %s\n  lr: %s\n  save_steps: 100000\n' "$steps" "$lr" > "$d/overlay_$seed.yaml"
    export VLAFORGET_ROOT=$R
    $VF stage-config --configfile $CFG "$d/overlay_$seed.yaml" --stage train --key "$key" --out "$d/train_$seed.yaml" &&
    $VF train --config "$d/train_$seed.yaml" > "$d/train_$seed.log" 2>&1 || { echo "{\"tag\": \"$tag\", \"seed\": $seed, \"error\": \"train\"}"; return; }
    for suite in mw_upstream mw_downstream; do
        $VF stage-config --configfile $CFG "$d/overlay_$seed.yaml" --stage eval --key "$key@$suite" --out "$d/eval_${suite}_$seed.yaml" &&
        $VF eval --config "$d/eval_${suite}_$seed.yaml" > "$d/eval_${suite}_$seed.log" 2>&1 || { echo "{\"tag\": \"$tag\", \"seed\": $seed, \"error\": \"eval $suite\"}"; return; }
    done
    python3 - "$R/evals/$key" "$tag" "$steps" "$lr" "$seed" <<'PY'
import json, sys
from pathlib import Path
d, tag, steps, lr, seed = sys.argv[1:]
out = {"tag": tag, "steps": int(steps), "lr": float(lr), "seed": int(seed)}
for s in ("mw_upstream", "mw_downstream"):
    r = json.loads((Path(d) / f"{s}.json").read_text())
    out[s] = {k: r[k] for k in ("success_rate", "task_success", "n_episodes") if k in r}
    out[s + "_episodes"] = [e.get("success") for e in r.get("episodes", [])]
print(json.dumps(out))
PY
}
export -f one; export ROOT CFG VF OUT
LEFT=$(( BUDGET - ($(date +%s) - T0) - 20 ))
jobs=(); for spec in "$@"; do read -r st lr <<<"$spec"; for s in $SEEDS; do jobs+=("$st $lr $s"); done; done
printf '%s\n' "${jobs[@]}" | timeout -s INT "$LEFT" xargs -P "${PAR:-16}" -L 1 bash -c 'one $0 $1 $2' > "$OUT/sweep.jsonl"
echo "sweep: $(wc -l < "$OUT/sweep.jsonl") of ${#jobs[@]} runs in $(( $(date +%s) - T0 )) s"
cp "$ROOT/evals/teacher/mw_upstream.json" "$OUT/teacher_mw_upstream.json"
cp "$ROOT/evals/teacher/mw_downstream.json" "$OUT/teacher_mw_downstream.json"
tar -cJf "$OUT/sweep_logs.tar.xz" -C "$ROOT/sweep" . --exclude='*.safetensors' --exclude='*.pt' --exclude=checkpoints --exclude=models --exclude=datasets --exclude=probe --exclude=artifacts 2>/dev/null
