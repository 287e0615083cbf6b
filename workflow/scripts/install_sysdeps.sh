#!/usr/bin/env bash
# Debian packages for headless rendering (MuJoCo / Meta-World on a machine without a display):
# EGL from Mesa (preferred; MUJOCO_GL=egl) with OSMesa as the fallback (MUJOCO_GL=osmesa).
# Installs what is missing when run as root with apt-get; otherwise says what to install and goes on.
set -uo pipefail

PKGS=(libegl-mesa0 libgl1-mesa-dri libosmesa6)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "[sysdeps] headless rendering packages present"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[sysdeps] not a Debian/Ubuntu system: install EGL (Mesa) or OSMesa for headless MuJoCo yourself (${missing[*]})"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[sysdeps] missing ${missing[*]}; as root run: apt-get install -y ${missing[*]}  (skipping)"
  exit 0
fi
echo "[sysdeps] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" \
  || echo "[sysdeps] apt-get failed; Meta-World rendering may not work (see docs/troubleshooting.md)"
exit 0
