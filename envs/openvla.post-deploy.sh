#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) once, inside the freshly created envs/openvla.yaml env: LIBERO 0.1.1
# (--no-deps) and its scene assets, every file checked against the hash manifest; the env keeps its
# torch (libero_setup constrains every pip call to it). Not run on this project's CI (no conda there).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python "$here/../src/vlaforget/envs/libero_setup.py" --venv "$CONDA_PREFIX" --numpy '' --no-smoke
