"""Shared fixtures: a private data root per test, the repo's study configs, small helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("VLAFORGET_NO_PROGRESS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """A data root under tmp_path; VLAFORGET_ALLOWED_ROOT / VLAFORGET_ROOT point at it."""
    allowed = tmp_path / "data"
    root = allowed / "vlaforget"
    allowed.mkdir()
    monkeypatch.setenv("VLAFORGET_ALLOWED_ROOT", str(allowed))
    monkeypatch.setenv("VLAFORGET_ROOT", str(root))
    return root


@pytest.fixture
def demo_config(tmp_root):
    """config/config.yaml + config/demo.yaml, validated, with the root under tmp."""
    from vlaforget.config import load_config

    return load_config(REPO / "config" / "config.yaml", REPO / "config" / "demo.yaml")


def copy_workflow(dest: Path) -> Path:
    """A copy of the workflow (Snakefile, rules, configs, profiles) so Snakemake's .snakemake/ and
    results/ land under tmp, not in the repo."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "Snakefile", dest / "Snakefile")
    for d in ("workflow", "config", "profiles", "envs"):
        shutil.copytree(REPO / d, dest / d, symlinks=True)
    # A snapshot of the library too (used through PYTHONPATH by `snakemake()` below), so the stage
    # configs' code hashes cannot change under a test while someone edits src/.
    shutil.copytree(
        REPO / "src" / "vlaforget", dest / "src" / "vlaforget", ignore=shutil.ignore_patterns("__pycache__")
    )
    return dest


def snakemake(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300):
    """`python -m snakemake ARGS` in a subprocess (the Python API ignores profiles)."""
    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    if (Path(cwd) / "src" / "vlaforget").is_dir():
        e["PYTHONPATH"] = str(Path(cwd) / "src") + os.pathsep + e.get("PYTHONPATH", "")
    # Snakemake's block per job (the tests read the planned outputs from it), not the one-line console
    e.setdefault("VLAFORGET_CONSOLE", "blocks")
    if env:
        e.update(env)
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def workflow_copy(tmp_path):
    return copy_workflow(tmp_path / "wf")


@pytest.fixture(autouse=True)
def _restore_environ():
    """A test that trains in-process (train.loop applies the job environment: VLAFORGET_ROOT, HF_HOME,
    …) must not leak it into later tests, which would read another test's root."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
