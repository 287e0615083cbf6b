#!/usr/bin/env bash
# Builds the GPU study's carry (.device-carry/, git-ignored) on the developer machine, in one command:
# everything bench/gpu_study.sh's header lists except state.tar.xz (an earlier call's teacher state, which
# only a device call makes). A fresh developer machine has none of it (session 15 started on one: every
# ignored path of the earlier sessions was gone).
#
#   bash bench/device_carry.sh [PARTS...]     PARTS: gl whl metaworld smk data (default: all five)
#
# Needs `make install` (.venv with metaworld, TensorFlow, Snakemake) and PyPI + Debian mirrors. The
# data part runs the study's first stages here (`snakemake --profile profiles/demo-gpu --until cache` in a
# scratch root: the demos and cache stages need TensorFlow, which the GPU machine lacks) and packs the
# root without the RLDS shards (nothing after the cache stage reads them). The carry's stage ids hold
# the code: rebuild `data` after any change of the demos or cache stage's code, or the device reruns them
# and fails for want of TensorFlow.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.device-carry}
PY=${PY:-.venv/bin/python}
PARTS=${*:-gl whl metaworld smk data}
mkdir -p "$CARRY"
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

for part in $PARTS; do
  case $part in
  gl)  # glvnd's EGL/GL loaders (the machine has the NVIDIA driver's vendor libraries, not the loaders)
    rm -rf "$CARRY/gl" && mkdir -p "$CARRY/gl" /tmp/amd64/partial
    o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
    apt-get "${o[@]}" update -qq
    (cd "$CARRY/gl" && apt-get "${o[@]}" download -qq libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
    ;;
  whl)  # the simulator's wheels for the machine's Python 3.12, at the versions this .venv runs
    rm -rf "$CARRY/whl" && mkdir -p "$CARRY/whl"
    for name in mujoco PyOpenGL gymnasium glfw Farama-Notifications simplejpeg; do
      "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLAT[@]}" -d "$CARRY/whl" "$name==$(version "$name")"
    done
    ;;
  metaworld)  # metaworld with only the study's six tasks' assets (they render bit-identically)
    tasks=$("$PY" -c "import yaml; d = yaml.safe_load(open('config/demo.yaml')); \
print(' '.join(sorted({t for ts in d['data']['metaworld']['datasets'].values() for t in ts})))")
    tmp=$(mktemp -d)
    "$PY" bench/prune_metaworld.py "$tmp" $tasks
    tar -cJf "$CARRY/metaworld-pruned.tar.xz" -C "$tmp" .
    rm -rf "$tmp"
    ;;
  smk)  # Snakemake and its dependencies for Python 3.12 (PuLP, the ILP scheduler's, left out: --scheduler greedy)
    tmp=$(mktemp -d) links=$(mktemp -d)
    # its sdist-only dependencies (pure Python) as local wheels, so the cp312 resolve can stay binary-only
    "$PY" -m pip wheel -q --no-deps -w "$links" "connection_pool==$(version connection_pool)"
    "$PY" -m pip install -q --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLAT[@]}" --find-links "$links" --target "$tmp" "snakemake==$(version snakemake)"
    rm -rf "$links"
    rm -rf "$tmp"/pulp "$tmp"/PuLP-* "$tmp"/pulp-* "$tmp"/bin
    tar -cJf "$CARRY/smk312.tar.xz" -C "$tmp" .
    rm -rf "$tmp"
    ;;
  data)  # the data root up to the caches, made by the pipeline itself
    tmp=$(mktemp -d)
    VLAFORGET_ALLOWED_ROOT="$tmp" VLAFORGET_ROOT="$tmp/root" VLAFORGET_NO_PROGRESS=1 \
      "$PY" -m snakemake --profile profiles/demo-gpu --until cache --cores "$(nproc)"
    tar -cJf "$CARRY/data.tar.xz" -C "$tmp/root" --exclude='*.tfrecord*' --exclude='*.lock' --exclude='./tmp' .
    rm -rf "$tmp"
    ;;
  *) echo "unknown part '$part' (gl whl metaworld smk data)" >&2; exit 2 ;;
  esac
  echo "[device-carry] $part: $(du -sh "$CARRY" | cut -f1) in $CARRY"
done
du -sh "$CARRY"/* 2>/dev/null
