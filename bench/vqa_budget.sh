#!/usr/bin/env bash
# Where does the embedded world's VQA skill get forgotten? One baseline run per fine-tuning budget,
# each in its own data root beside SRC_ROOT (which must hold the teacher, caches and probe set:
# e.g. a root after `snakemake --profile profiles/demo-gpu --until probe`), then the forgetting
# stage (VQA, drift, CKA) and, with EVAL=1, both closed-loop suites. Stages run by hand with the
# configs `vlaforget stage-config` writes from config/demo.yaml + config/demo_gpu.yaml + a budget overlay.
#
#   bash bench/vqa_budget.sh SRC_ROOT [KEY] ["STEPS LR" ...]
#   e.g. EVAL=1 bash bench/vqa_budget.sh /opt/data/private/vlaforget-vqa mw_downstream__baseline__full__s42 "100 0.0003" "300 0.0003"
# EXTRA (YAML appended to the overlay) and TAG (appended to the budget's folder name) vary anything else:
#   EVAL=1 TAG=_pb64 EXTRA=$'methods:\n  icsm_hsw_thermostat:\n    thermostat:\n      probe_batch: 64' \
#     bash bench/vqa_budget.sh /opt/data/private/vlaforget-vqa mw_downstream__icsm_hsw_thermostat__full__s42 "30 0.0003"
# docs/benchmarks.md "Issue 19: where the VQA skill is forgotten".
set -u
SRC=${1:?source data root}; shift
KEY=${1:-mw_downstream__baseline__full__s42}; [ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- "30 0.0003" "100 0.0003" "300 0.0003" "300 0.001" "1000 0.001"
CFG="config/config.yaml config/demo.yaml config/demo_gpu.yaml"
VF=${VF:-.venv/bin/vlaforget}
export VLAFORGET_ALLOWED_ROOT=${VLAFORGET_ALLOWED_ROOT:-/opt/data/private} MUJOCO_GL=${MUJOCO_GL:-egl}
for spec in "$@"; do
    read -r steps lr <<<"$spec"; tag=s${steps}_lr${lr}${TAG:-}
    R=$SRC/$tag; d=$R/stage-configs; mkdir -p "$d"; export VLAFORGET_ROOT=$R
    for x in models datasets probe artifacts hf_cache; do [ -e "$R/$x" ] || ln -s "$SRC/$x" "$R/$x"; done
    printf 'train:\n  max_steps: %s\n  lr: %s\n  save_steps: 100000\n%s\n' "$steps" "$lr" "${EXTRA:-}" > "$d/overlay.yaml"
    for st in train forgetting; do
        $VF stage-config --configfile $CFG "$d/overlay.yaml" --stage $st --key "$KEY" --out "$d/$st.yaml" || exit 1
        $VF $st --config "$d/$st.yaml" > "$d/$st.log" 2>&1 || { echo "$st $tag failed: $d/$st.log"; exit 1; }
    done
    grep -h "INFO vlaforget.forgetting: forgetting" "$d/forgetting.log" | sed "s|^|$tag |"
    [ "${EVAL:-0}" = 1 ] || continue
    for suite in mw_upstream mw_downstream; do
        $VF stage-config --configfile $CFG "$d/overlay.yaml" --stage eval --key "$KEY@$suite" --out "$d/eval_$suite.yaml" || exit 1
        $VF eval --config "$d/eval_$suite.yaml" > "$d/eval_$suite.log" 2>&1 || { echo "eval $tag $suite failed: $d/eval_$suite.log"; exit 1; }
        grep -h "INFO vlaforget.eval:.*success" "$d/eval_$suite.log" | tail -1 | sed "s|^|$tag |"
    done
done
