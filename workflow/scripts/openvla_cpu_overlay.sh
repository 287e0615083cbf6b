#!/usr/bin/env bash
# A job venv for OpenVLA's remote code on a CPU-only box, layered over the real study's job env
# (make real-env) without touching it: OVERLAY's own site-packages come first (a torchvision), then
# BASE's (OpenVLA's pinned stack, TF/TFDS, LIBERO, wandb), loaded through a .pth file.
# Why: PyPI has only CUDA torchvision wheels next to a CPU torch 2.13, whose C ops cannot load
# (`operator torchvision::nms does not exist`, raised by its fake-kernel registrations), so
# make real-env leaves BASE without torchvision and timm cannot import. Here torchvision is installed
# --no-deps (it never replaces torch) and, only if it fails that way, its _meta_registrations.py is
# blanked: OpenVLA's processor and timm use only torchvision's Python transforms, never its C ops.
# With a matching CPU or CUDA torch/torchvision pair in BASE none of this is needed (rehearsal-openvla
# then runs in BASE directly). Usage: openvla_cpu_overlay.sh OVERLAY_VENV BASE_VENV
set -euo pipefail
overlay=$1
base=$(cd "$2" && pwd)
bpy=$base/bin/python
test -x "$bpy" || { echo "no job environment at $2: run 'make real-env' first" >&2; exit 2; }
base_py=$("$bpy" -c "import sys; print(sys._base_executable)")
test -x "$overlay/bin/python" || "$base_py" -m venv "$overlay"
opy=$overlay/bin/python
osp=$("$opy" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
bsp=$("$bpy" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$bsp')" > "$osp/zz_vlaforget_base_env.pth"
torch=$("$opy" -c "import torch; print(torch.__version__.split('+')[0])")
minor=$(echo "$torch" | cut -d. -f2)
if ! "$opy" -c "import torchvision" 2>/dev/null; then
  if ! "$opy" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torchvision') is None)"; then
    "$opy" -m pip install -q --no-deps "torchvision==0.$((minor + 15)).*"
  fi
  if ! "$opy" -c "import torchvision" 2>/dev/null; then
    f=$("$opy" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
    test -f "$f.orig" || cp "$f" "$f.orig"
    echo "# blanked by vlaforget openvla_cpu_overlay.sh: the C ops these register cannot load next to a CPU torch" > "$f"
  fi
fi
"$opy" -c "import torch, torchvision, timm, transformers, tensorflow_datasets; print('overlay job env:', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
