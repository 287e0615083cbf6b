"""Data-root policy: every big byte lives under one root, and nothing is written outside it.

All output paths of the pipeline derive from `root` (config key `root`, env VLAFORGET_ROOT,
default /opt/data/private/vlaforget). `allowed_root` (default /opt/data/private) is the only tree
any configured path may point into.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

DEFAULT_ROOT = "/opt/data/private/vlaforget"
DEFAULT_ALLOWED_ROOT = "/opt/data/private"


class PathPolicyError(UserError, ValueError):
    """A configured path violates the data-root policy."""


def resolve_root(cfg: dict | None = None) -> Path:
    """Root from (in order) VLAFORGET_ROOT, config `root`, the default."""
    env = os.environ.get("VLAFORGET_ROOT")
    if env:
        return Path(env).expanduser().absolute()
    if cfg and cfg.get("root"):
        return Path(str(cfg["root"])).expanduser().absolute()
    return Path(DEFAULT_ROOT)


def resolve_allowed_root(cfg: dict | None = None) -> Path:
    env = os.environ.get("VLAFORGET_ALLOWED_ROOT")
    if env:
        return Path(env).expanduser().absolute()
    if cfg and cfg.get("allowed_root"):
        return Path(str(cfg["allowed_root"])).expanduser().absolute()
    return Path(DEFAULT_ALLOWED_ROOT)


def is_within(path: Path, parent: Path) -> bool:
    """path lies in parent after resolving symlinks (of path, its nearest existing parent, and parent):
    a symlink inside the allowed root that points elsewhere does not count as inside."""
    path, parent = Path(os.path.realpath(path)), Path(os.path.realpath(parent))
    return path == parent or parent in path.parents


def check_under(path: str | Path, allowed: Path, what: str) -> Path:
    p = Path(path).expanduser().absolute()
    if not is_within(p, allowed):
        real = os.path.realpath(p)
        via = f" (a symlink to {real})" if real != os.path.normpath(p) else ""
        raise PathPolicyError(
            f"{what} = {p}{via} is outside the allowed root {allowed}. Large files must live under "
            f"{allowed}: set {what} to a path under it (or set allowed_root / VLAFORGET_ALLOWED_ROOT "
            f"if your machine's data disk is elsewhere)."
        )
    return p


@dataclass(frozen=True)
class Layout:
    """Every directory of a study under the data root (ARCHITECTURE.md, run-directory layout)."""

    root: Path

    @property
    def hf_cache(self) -> Path:
        return self.root / "hf_cache"

    @property
    def torch_cache(self) -> Path:
        return self.root / "torch_cache"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def rlds(self, dataset: str) -> Path:
        """Generated RLDS datasets (embedded world). LIBERO RLDS lives at data.rlds_dir."""
        return self.root / "datasets" / "rlds" / dataset

    def cache(self, dataset: str) -> Path:
        return self.root / "datasets" / "cache" / dataset

    def libero_vqa(self) -> Path:
        """The LIBERO-simulator question set (data/libero_vqa.py): questions.jsonl, images/, manifest.json."""
        return self.root / "vqa" / "libero"

    def model(self, base: str) -> Path:
        return self.root / "models" / base

    def probe(self, base: str, probe_set: str) -> Path:
        return self.root / "probe" / base / probe_set

    def icsm(self, base: str, probe_set: str) -> Path:
        return self.root / "artifacts" / f"icsm_{base}" / probe_set

    def craft(self, base: str, dataset: str) -> Path:
        return self.root / "artifacts" / f"craft_{base}" / dataset

    def run(self, run_name: str) -> Path:
        return self.root / "runs" / run_name

    def eval(self, run_name: str) -> Path:
        return self.root / "evals" / run_name


def job_env(root: Path) -> dict[str, str]:
    """Environment every job exports so no library caches outside root."""
    lay = Layout(root)
    return {
        "VLAFORGET_ROOT": str(root),
        "HF_HOME": str(lay.hf_cache),
        "HF_DATASETS_CACHE": str(lay.hf_cache / "datasets"),
        "TRANSFORMERS_CACHE": str(lay.hf_cache),
        "TORCH_HOME": str(lay.torch_cache),
        "WANDB_DIR": str(lay.wandb),
        "TMPDIR": str(lay.tmp),
        "TFDS_DATA_DIR": str(root / "datasets" / "tfds"),
        "MPLCONFIGDIR": str(lay.tmp / "matplotlib"),
        # Concurrent jobs share the CPU cores: OpenMP threads that spin while waiting (the default)
        # slow every job sharing a core by 10-30x (measured: 2 s vs 65 ms per policy step).
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        **FRAMEWORK_ENV,
    }


# Which frameworks a job's libraries may load. transformers 4.40.1 imports TensorFlow whenever it is
# installed, and TF 2.21 + triton in one process segfaults (exit 139, no message: `import tensorflow,
# timm` alone). Only the cache stage (and the RLDS fixture writer) use TF, through tensorflow_datasets
# directly, which these switches do not affect. PYTHONFAULTHANDLER prints the Python stack of a
# crashing job into its log.
FRAMEWORK_ENV = {
    "USE_TF": "0",
    "USE_TORCH": "1",
    "USE_JAX": "0",
    "USE_FLAX": "0",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONFAULTHANDLER": "1",
}


def apply_job_env(root: Path) -> None:
    for k, v in job_env(root).items():
        os.environ[k] = v
    for d in (Layout(root).hf_cache, Layout(root).torch_cache, Layout(root).wandb, Layout(root).tmp):
        d.mkdir(parents=True, exist_ok=True)


def ensure_root(root: Path) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except PermissionError as e:
        raise PathPolicyError(
            f"cannot create or write the data root {root} ({e.strerror}). Create it with the right "
            f"owner (sudo mkdir -p {root} && sudo chown $USER {root}) or point the pipeline elsewhere "
            f"under the allowed root: VLAFORGET_ROOT=/opt/data/private/<you>/vlaforget or `root:` in "
            f"your config."
        ) from e
    return root
