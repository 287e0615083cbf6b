#!/usr/bin/env bash
# Does the closed-loop evaluation flip with the CPU's last bit? (issue 27, session 13)
# Re-runs committed evaluation configs of a root by hand, twice: with the study's pinned CPU kernels
# (ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 DNNL_MAX_CPU_ISA=AVX2, what every metaworld job exports) and
# with ATen's AVX-512 kernels and MKL's default path, into {root}/tmp/kprobe/{pin,avx512}/, one thread
# each, two at a time; then bench/eval_compare.py compares every episode with the root's own result.
# KINDS (default "pin avx512") may add tf32: pinned kernels with cuDNN's TF32 convolutions emulated
# (bench/tf32_emulate.py).
#   [KINDS="pin avx512 tf32"] bash bench/eval_kernel_probe.sh ROOT RUN@SUITE ...
#   e.g. bash bench/eval_kernel_probe.sh /opt/data/private/vlaforget-gpu teacher__s42@mw_upstream teacher__s42@mw_downstream
set -u
R=${1:?root}; shift
TMP=$R/tmp/kprobe; mkdir -p "$TMP"
one() {  # $1 kind (pin|avx512) $2 RUN@SUITE
  local run=${2%@*} suite=${2#*@} cfg out E
  cfg=$(ls "$R"/configs/eval/"$2"/*.yaml | head -1)
  out=$TMP/cfg_$1_$run@$suite.yaml
  sed "s#^out_file: .*#out_file: '{root}/tmp/kprobe/$1/$run/$suite.json'#" "$cfg" > "$out"
  E="ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 DNNL_MAX_CPU_ISA=AVX2"; CMD=".venv/bin/vlaforget"
  [ "$1" = avx512 ] && E="ATEN_CPU_CAPABILITY=avx512"
  [ "$1" = tf32 ] && CMD=".venv/bin/python bench/tf32_emulate.py"
  env $E OMP_NUM_THREADS=1 VLAFORGET_ROOT="$R" VLAFORGET_NO_PROGRESS=1 CUDA_VISIBLE_DEVICES= USE_TF=0 \
    $CMD eval --config "$out" --threads 1 > "$TMP/log_$1_$run@$suite.txt" 2>&1
  echo "$1 $2 exit $?"
}
export -f one; export R TMP
KINDS=${KINDS:-pin avx512}
for rs in "$@"; do for k in $KINDS; do echo "$k $rs"; done; done | xargs -P 2 -L 1 bash -c 'one $0 $1'
for rs in "$@"; do
  run=${rs%@*} suite=${rs#*@}
  .venv/bin/python bench/eval_compare.py "$R"/evals/"$run"/"$suite"/*.json $(for k in $KINDS; do echo "$TMP/$k/$run/$suite.json"; done)
done
