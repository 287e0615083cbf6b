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
# The teacher, probe, ICSM and CRaFT anchors of an earlier call (its $OUT/state.tar.xz), so that every table
# of a study starts from one teacher: carried as $CARRY/state.tar.xz. STATE=required stops here without it
# (a fresh machine would otherwise pretrain another teacher, 146 s on an H100).
if [ ! -d "$ROOT/models" ]; then
    if [ -f "$CARRY/state.tar.xz" ]; then
        tar -xJf "$CARRY/state.tar.xz" -C "$ROOT" || return 1
        echo "teacher state unpacked: $(ls "$ROOT"/models/*/)"
    elif [ "${STATE:-}" = required ]; then
        echo "STATE=required but $CARRY/state.tar.xz is not here: carry it, or unset STATE to pretrain a new teacher"
        return 1
    fi
fi
# A study an earlier session left unfinished (its $OUT/study.tar.xz and $OUT/adapters.tar, carried as
# $CARRY/resume/): every finished job's outputs, so Snakemake goes on from where that session stopped.
# The same code must run (the ids hold the stage code; a changed stage reruns, as it should).
if [ -f "$CARRY/resume/study.tar.xz" ] && [ ! -d "$ROOT/runs" ]; then
    tar -xJf "$CARRY/resume/study.tar.xz" -C "$ROOT" --exclude='./results' --exclude='results' || return 1
    [ -f "$CARRY/resume/adapters.tar" ] && { tar -xf "$CARRY/resume/adapters.tar" -C "$ROOT" || return 1; }
    echo "resumed: $(ls "$ROOT"/runs | wc -l) runs, $(find "$ROOT"/evals -name '*.json' -path '*/mw_*' | wc -l) evaluations"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
