# Sourced by bench/gpu_study.sh and bench/budget_sweep.sh on a lent GPU machine whose Python has torch
# but no Snakemake, TensorFlow or Meta-World: unpacks the carry ($CARRY, default .device-carry/, made on
# the developer machine as bench/gpu_study.sh's header says), links the data root to the ignored
# .device-root/ (kept between back-to-back calls) and exports ROOT, PYTHONPATH, MUJOCO_GL.
CARRY=${CARRY:-.device-carry}
grep -qx '/.device-root/' .gitignore || { echo "add /.device-root/ to .gitignore first"; return 2; }
for f in "$CARRY"/gl/*.deb; do dpkg -x "$f" /; done; ldconfig
SITE=/tmp/site
if [ ! -d "$SITE/snakemake" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$CARRY"/whl/*.whl || return 1
    tar -xJf "$CARRY/metaworld-pruned.tar.xz" -C "$SITE" && tar -xJf "$CARRY/smk312.tar.xz" -C "$SITE" || return 1
fi
export PYTHONPATH="$SITE:$PWD/src" MUJOCO_GL=egl PYOPENGL_PLATFORM=egl PYTHONUNBUFFERED=1 VLAFORGET_NO_PROGRESS=1
ROOT=${ROOT:-/opt/data/private/vlaforget-gpu}
mkdir -p .device-root /opt/data/private
[ -e "$ROOT" ] || ln -s "$PWD/.device-root" "$ROOT"
export VLAFORGET_ALLOWED_ROOT="$(realpath "$ROOT")" VLAFORGET_ROOT=$ROOT
if ! ls "$ROOT"/datasets/cache/mw_upstream/*/manifest.json >/dev/null 2>&1; then   # id-addressed root (issue 29)
    tar -xJf "$CARRY/data.tar.xz" -C "$ROOT" || return 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
