"""Pack the part of an installed LIBERO that one suite needs, for a machine that cannot install it.

    MUJOCO_GL=egl python bench/libero_payload.py --suite libero_spatial --out .lib

Run it with a Python where LIBERO works (`python -m vlaforget.envs.libero_setup`, docs/evaluation.md).
It builds every task env of the suite once (reset to init state 0, one step) and records the files
they read: Python-level opens (robosuite's MJCF sources, bddl files, init states; an audit hook) and
the meshes / textures MuJoCo loads (the `file="..."` attributes of each compiled model). The
packages robosuite, libero, bddl, easydict, future and termcolor then go into two tar.xz archives:
all their code and small files, and of the big data folders (assets, init_files, datasets,
demonstrations) only the files the suite read. libero_spatial: ~24 MB compressed instead of ~1 GB.

On the target: `tar -xJf` both archives into a folder on PYTHONPATH, next to the mujoco, gymnasium
and PyOpenGL wheels (docs/benchmarks.md has the device command); `bench/eval_rollout.py
--benchmark libero --libero-config DIR` writes a LIBERO config pointing at the unpacked package.
A manifest (file list, sizes, sha256 of the archives) is written next to the archives.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

PACKAGES = {"libero_a": ["robosuite"], "libero_b": ["libero", "bddl", "easydict", "future", "termcolor"]}
DATA_DIRS = ("assets", "init_files", "datasets", "demonstrations")


def _is_data(rel: str) -> bool:
    return any(f"/{d}/" in f"/{rel}" for d in DATA_DIRS)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--out", default=".lib")
    p.add_argument("--libero-config", default=None, help="LIBERO config dir (default: vlaforget's)")
    a = p.parse_args()

    read: set[str] = set()

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], str):
            read.add(os.path.realpath(args[0]))

    sys.addaudithook(hook)
    import importlib.util

    from vlaforget.envs.libero import LiberoEnv, ensure_libero_config, suite_tasks

    ensure_libero_config(a.libero_config)
    for t in suite_tasks(a.suite, a.libero_config):
        env = LiberoEnv(a.suite, t["id"], a.libero_config, wait_steps=1)
        env.reset(0)
        env.step([0, 0, 0, 0, 0, 0, 0])
        xml = env._env.env.sim.model.get_xml()
        read |= {os.path.realpath(f) for f in re.findall(r'file="([^"]+)"', xml)}
        env.close()
        print(f"task {t['id']}: {t['name']} ({len(read)} files read so far)", flush=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"suite": a.suite, "archives": {}}
    for archive, pkgs in PACKAGES.items():
        members = []
        for pkg in pkgs:
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit(f"package {pkg} is not importable here; install LIBERO first")
            root = Path(next(iter(spec.submodule_search_locations))).resolve()
            base = root.parent
            for dp, dn, fn in os.walk(root):
                dn[:] = sorted(d for d in dn if d != "__pycache__")
                for f in sorted(fn):
                    full = Path(dp) / f
                    rel = str(full.relative_to(base))
                    if _is_data(rel) and str(full) not in read:
                        continue
                    members.append((full, rel))
        path = out / f"{archive}.tar.xz"
        with tarfile.open(path, "w:xz") as tar:
            for full, rel in members:
                tar.add(full, arcname=rel, recursive=False)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest["archives"][path.name] = {
            "sha256": digest,
            "bytes": path.stat().st_size,
            "files": len(members),
            "unpacked_bytes": sum(full.stat().st_size for full, _ in members),
        }
        print(f"{path}: {len(members)} files, {path.stat().st_size / 1e6:.1f} MB", flush=True)
    (out / "libero_payload.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
