#!/usr/bin/env bash
# One table of the GPU-sized embedded study (profiles/demo-gpu) on this 2-core CPU, seed pair by seed
# pair so that whole seeds finish (how results/embedded_main_cpu/ was made, sessions 11-12; the few-shot
# table from session 14 on). The data root must already hold the teacher, probe, ICSM (and the CRaFT
# anchors of the full set): config/demo_gpu.yaml's root, /opt/data/private/vlaforget-gpu here.
#
#   bash bench/cpu_study_pairs.sh table_fewshot_build [SEED ...]   (default: config/demo_gpu.yaml's seeds)
#
# A killed or interrupted pair reruns its unfinished jobs next time (rerun-incomplete); the stage ids
# hold the stage code, so a changed stage reruns rather than mixing. Then the table: `snakemake --profile
# profiles/demo-gpu --cores 2 <rule>` (every job done: only the table runs) or bench/gpu_study_collect.py.
set -u
RULE=${1:?table rule, e.g. table_fewshot_build}; shift
PY=${PY:-.venv/bin/python}
SEEDS=${*:-$($PY -c "import yaml; print(' '.join(map(str, yaml.safe_load(open('config/demo_gpu.yaml'))['study']['seeds'])))")}
SMK="$PY -m snakemake"
OPTS="--profile profiles/demo-gpu --cores 2 --resources mem_mb=20000"  # after the targets: --resources takes several values
DRY=$(mktemp)
$SMK -n "$RULE" $OPTS > "$DRY" 2>&1 || { tail -20 "$DRY"; exit 1; }
# each eval / forgetting job's JSON from its log path (logs/eval/RUN@SUITE/CID.log -> evals/RUN/SUITE/CID.json,
# logs/forgetting/RUN/CID.log -> evals/RUN/forgetting/CID.json)
targets() {  # $1 = seed
  sed -nE 's#^Job [0-9]+: eval: (.*)/logs/eval/([^/@]+)@([^/]+)/([0-9a-f]+)\.log$#\1/evals/\2/\3/\4.json#p;
            s#^Job [0-9]+: forgetting: (.*)/logs/forgetting/([^/]+)/([0-9a-f]+)\.log$#\1/evals/\2/forgetting/\3.json#p' "$DRY" \
    | grep -E "/evals/[^/]*__s$1/|/evals/teacher/" | sort -u
}
set -- $SEEDS
while [ $# -gt 0 ]; do
  PAIR="$1 ${2:-}"; shift; [ $# -gt 0 ] && shift
  T=$(for s in $PAIR; do targets "$s"; done | sort -u)
  [ -n "$T" ] || { echo "seeds $PAIR: nothing to do"; continue; }
  echo "$(date -u +%FT%TZ) seeds $PAIR: $(echo "$T" | wc -l) targets"
  $SMK $T $OPTS; rc=$?
  [ $rc -eq 0 ] || echo "$(date -u +%FT%TZ) seeds $PAIR: snakemake exit $rc"
done
rm -f "$DRY"
echo "$(date -u +%FT%TZ) done; the table: $SMK $RULE $OPTS"
