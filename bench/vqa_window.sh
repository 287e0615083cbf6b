#!/usr/bin/env bash
# Can fine-tuning on the window tasks make the teacher forget what it knows about the window? (issue 27.4)
# From an empty data root, the pipeline's own stages run by hand with the configs `vlaforget
# stage-config` writes from config/demo.yaml + config/demo_gpu.yaml (its budget: 100 LoRA steps at 1e-4)
# + config/demo_window_vqa.yaml + an overlay (the teacher's pretraining steps, PRETRAIN_STEPS): demonstrations, caches, the teacher
# (its VQA mix includes the window scenes: model.pretrain.vqa_datasets), probe, ICSM, then for each
# KEY one run and the forgetting stage of the teacher and of each run (vqa_mc = upstream scenes,
# vqa_mc_downstream = window scenes).
#
#   bash bench/vqa_window.sh ROOT [KEY ...]      (default KEY: mw_downstream__baseline__full__s42)
#   PRETRAIN_STEPS=$'2500\n    vqa_fraction: 0.3' bash bench/vqa_window.sh /tmp/vqa-root2
# DATA_FROM=ROOT2 reuses ROOT2's demonstrations and caches; SETUP=0 skips everything before the runs (a root the script has set up). Other budgets: bench/vqa_budget.sh
# on this root with EXTRA= the same model.pretrain keys and eval.forgetting.downstream_vqa_suites
# (docs/benchmarks.md "Issue 27.4" has the lines).
# docs/benchmarks.md "Issue 27.4: questions about the window".
set -u
R=${1:?data root}; shift
[ $# -gt 0 ] || set -- mw_downstream__baseline__full__s42
CFG="config/config.yaml config/demo.yaml config/demo_gpu.yaml config/demo_window_vqa.yaml"
VF=${VF:-.venv/bin/vlaforget}
export VLAFORGET_ROOT=$R VLAFORGET_ALLOWED_ROOT=${VLAFORGET_ALLOWED_ROOT:-$(dirname "$R")} MUJOCO_GL=${MUJOCO_GL:-egl}
d=$R/stage-configs; mkdir -p "$d"
printf 'model:\n  pretrain:\n    steps: %s\n    threads: %s\ntrain:\n  save_steps: 100000\n%s\n' \
    "${PRETRAIN_STEPS:-800}" "${THREADS:-2}" "${EXTRA:-}" > "$d/overlay.yaml"
stage() {  # stage key [tag]
    local f="$d/$1_${3:-$2}.yaml"
    $VF stage-config --configfile $CFG "$d/overlay.yaml" --stage "$1" --key "$2" --out "$f" || exit 1
    local t0=$SECONDS
    $VF "$1" --config "$f" > "${f%.yaml}.log" 2>&1 || { echo "$1 $2 failed: ${f%.yaml}.log"; exit 1; }
    echo "$1 $2: $((SECONDS - t0)) s"
}
if [ "${SETUP:-1}" = 1 ]; then
    if [ -n "${DATA_FROM:-}" ]; then  # another root's demonstrations and caches (same ids)
        [ -e "$R/datasets" ] || ln -s "$DATA_FROM/datasets" "$R/datasets"
    else
        for ds in mw_upstream mw_downstream; do stage demos $ds; stage cache $ds; done
    fi
    stage model tiny-vla
    PS=$(.venv/bin/python -c "from vlaforget import config as c, study as s; print(s.probe_set_name(c.load_config(*'$CFG $d/overlay.yaml'.split())))")
    stage probe "$PS"; stage icsm "$PS"
    stage forgetting teacher
fi
for key in "$@"; do stage train "$key"; stage forgetting "$key"; done
