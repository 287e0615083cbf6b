#!/usr/bin/env bash
# The GPU study's tables (wide CSV/MD, paper MD/TeX, comparisons CSV) rebuilt from its committed
# per-run JSON (results/embedded_gpu/raw) by `vlaforget table`, the command rule `table` runs, with the
# runs rule `table` gives each kind (config/demo_gpu.yaml: methods, shots, ablations and their bases).
#   bash bench/gpu_study_tables.sh [RAW_DIR] [OUT_DIR]
set -euo pipefail
RAW=${1:-results/embedded_gpu/raw}
OUT=${2:-results/embedded_gpu}
PY=${PY:-.venv/bin/python}
runs() {  # the eval JSONs of suite mw_downstream, methods $1, shots $2
  for m in $1; do for s in $2; do for d in "$RAW"/mw_downstream__"${m}"__"${s}"__s*; do
    echo "$d/mw_downstream.json $d/mw_upstream.json $d/forgetting.json"; done; done; done
}
teacher() {  # the teacher's JSONs for the runs $1: shared states (raw/teacher/), or with
  # eval.initial_states per_seed each run seed's block (raw/teacher__s{seed}/), as rule table reads them
  local out="$RAW/teacher/forgetting.json" f seed
  for f in "$RAW"/teacher/mw_downstream.json "$RAW"/teacher/mw_upstream.json; do
    [ -e "$f" ] && out="$out $f"; done
  for seed in $(echo "$1" | tr ' ' '\n' | sed -n 's/.*__s\([0-9]*\)\/forgetting.json$/\1/p' | sort -un); do
    [ -d "$RAW/teacher__s$seed" ] && out="$out $RAW/teacher__s$seed/mw_downstream.json $RAW/teacher__s$seed/mw_upstream.json"
  done
  echo "$out"
}
BASES=$($PY -c "import yaml; c = yaml.safe_load(open('config/config.yaml')); d = yaml.safe_load(open('config/demo_gpu.yaml')); print(' '.join(f'{a}={c[\"ablations\"][a][\"base\"]}' for a in d['study']['ablations']))")
ABL=$(echo "$BASES" | tr ' ' '\n' | cut -d= -f1 | tr '\n' ' ')
ABL_BASES=$(echo "$BASES" | tr ' ' '\n' | cut -d= -f2 | awk '!seen[$0]++' | tr '\n' ' ')
table() { $PY -m vlaforget.cli table --kind "$1" --upstream-suites mw_upstream --ablation-bases $BASES \
  --inputs $(teacher "$2") $2 --out "$OUT/table_$1.csv"; }
table main "$(runs 'baseline icsm_hsw_thermostat craft' full)"
table fewshot "$(runs 'baseline icsm_hsw_thermostat craft' '5shot 10shot')"
table ablation "$(runs "$ABL_BASES $ABL" full)"
