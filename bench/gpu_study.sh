#!/usr/bin/env bash
# The GPU-sized embedded study (profiles/demo-gpu) on a lent GPU machine whose Python has torch but
# no Snakemake, TensorFlow or Meta-World (docs/benchmarks.md "Issue 19: the GPU study").
#
# What it needs, in $CARRY (default .device-carry/, git-ignored), made on the developer machine by
# `bash bench/device_carry.sh` (all but the state; ~50 MB, ~6 min; session 15):
#   gl/*.deb                  glvnd's EGL/GL loaders (apt-get download libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
#   whl/*.whl                 mujoco 3.3.0, PyOpenGL, gymnasium, glfw, farama-notifications, simplejpeg (cp312 wheels;
#                             simplejpeg since session 14: the evaluation's frames, eval/frames.py)
#   metaworld-pruned.tar.xz   metaworld 3.1.1 with only the assets of the study's six tasks (renders identically)
#   smk312.tar.xz             snakemake 9.27.1 and its pure/cp312 dependencies (pip install --target, no PuLP)
#   data.tar.xz               the data root after `snakemake --profile profiles/demo-gpu --until cache` here:
#                             the stage configs, caches and demos' done.json of both datasets (the demos and
#                             cache stages need TensorFlow, which that machine lacks; nothing after the
#                             cache stage reads the RLDS shards, which stay behind)
#   state.tar.xz (optional)   an earlier call's $OUT/state.tar.xz (teacher, probe, ICSM, CRaFT anchors): every
#                             table of the study then starts from that one teacher (bench/device_setup.sh;
#                             STATE=required refuses to pretrain another one when it is missing)
# The carry (~62 MB with the state) and the repo (~14 MB) exceed a call's 64 MiB together: split them over
# two back-to-back calls on the same warm machine (ignored paths carried once stay there), e.g. call 1
# carries .device-carry/state.tar.xz and .device-carry/data.tar.xz (and runs anything, even `true`), call 2
# carries .device-carry/{gl,whl,metaworld-pruned.tar.xz,smk312.tar.xz} and runs this script with STATE=required
# (session 12: issue 28's call carried the state, then `STATE=required bash bench/gpu_study.sh 575 table_ablation_build`).
# Session 13 split it the other way: call 1 carried gl, whl, metaworld, smk312 and the state (and ran
# bench/device_diag.py), call 2 carried data.tar.xz and ran this script.
#
#   bash bench/gpu_study.sh SECONDS [snakemake targets/flags...]
#   e.g. bash bench/gpu_study.sh 578 table_main_build     (then table_fewshot_build, table_ablation_build, all)
# One table's rule per call sequence: `--prioritize` did not keep the main table first (session 11:
# few-shot runs ran before the ICSM job the method needs). A machine can be taken back mid-call and
# return nothing; a fresh machine pretrains the teacher again (146 s on an H100).
#
# Two tables in one call, the second with what the first left of the call (session 13):
#   S=$(date +%s); STATE=required bash bench/gpu_study.sh 560 table_main_build; \
#   bash bench/gpu_study.sh $((575 - $(date +%s) + S)) table_fewshot_build
# Each invocation logs to $OUT/snakemake_<first target>.log; the second's study.tar.xz holds both.
#
# Runs Snakemake for at most SECONDS (SIGINT then: running jobs are killed and rerun next time, as
# rerun-incomplete says), with the data root in .device-root/ (ignored, kept between back-to-back
# calls) behind /opt/data/private/vlaforget-gpu, then packs the tables, figures and every job's JSON
# into $OUT/study.tar.xz.
set -u
BUDGET=${1:?seconds}; shift
T0=$(date +%s)
source bench/device_setup.sh || exit 1
echo "setup: $(( $(date +%s) - T0 )) s"
LEFT=$(( BUDGET - ($(date +%s) - T0) - 25 ))
[ "$LEFT" -gt 30 ] || { echo "only ${LEFT} s left: not starting Snakemake"; exit 0; }
LOG="$OUT/snakemake_${1:-all}.log"
timeout -s INT -k 20 "$LEFT" python3 -m snakemake --profile profiles/demo-gpu --scheduler greedy "$@" > "$LOG" 2>&1
echo "snakemake exit $? after $(( $(date +%s) - T0 )) s"
grep -E "steps \([0-9]+%\) done|Error in rule|Exiting because" "$LOG" | tail -5
# every job's JSON, log and stage config under the (id-addressed, issue 29) root; weights, checkpoints,
# datasets and caches stay behind
tar -cJf "$OUT/study.tar.xz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude='checkpoints' \
    --exclude='videos' --exclude='./datasets' --exclude='./tmp' --exclude='./hf_cache' --exclude='./torch_cache' \
    --exclude='./wandb' results/embedded_gpu -C "$ROOT" . 2>/dev/null
# the trained adapters (final/ only; ~0.7 MB each): with study.tar.xz, what a later session carries as
# $CARRY/resume/ to go on with an unfinished study (bench/device_setup.sh)
(cd "$ROOT" && find runs -path '*/final/*.safetensors' -not -path '*/checkpoints/*' -print0 \
    | tar --null -cf "$OUT/adapters.tar" -T - 2>/dev/null)
# the state a later call could resume from (the teacher, ICSM, probe: what every run depends on)
tar -cJf "$OUT/state.tar.xz" -C "$ROOT" models artifacts probe 2>/dev/null
ls -la "$OUT"
