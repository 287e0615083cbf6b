#!/usr/bin/env bash
# Run teacher_sweep.py variants in parallel on one GPU host: caches first, then one process per
# variant (2 eval workers each). Usage: bench/teacher_sweep_parallel.sh OUT.jsonl 'V1' 'V2' ...
set -u
out=$1; shift
all=$(python3 -c 'import json,sys; print(json.dumps([json.loads(a) for a in sys.argv[1:]]))' "$@")
python3 bench/teacher_sweep.py --out "$out" --device "${DEVICE:-cuda}" --workers 14 --variants "$all" --prepare-only
for v in "$@"; do
  python3 bench/teacher_sweep.py --out "$out" --device "${DEVICE:-cuda}" --workers 2 --variants "[$v]" &
done
wait
