"""`vlaforget restamp`: a data root made under the old text hash of code is carried over to the
syntax-tree hash without rerunning what it can prove unchanged (formatting, comments, docstrings),
and only that: a real code edit still reruns its jobs and everything downstream."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlaforget import codedeps, freshness, restamp
from vlaforget import config as vfc

OLD_MTIME = 1_600_000_000


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    dest = tmp_path / "lib" / "vlaforget"
    shutil.copytree(vfc.PKG_DIR, dest, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(vfc, "PKG_DIR", dest)
    vfc._CODE_HASHES.clear()
    vfc._SC_CACHE.clear()
    yield dest
    vfc._CODE_HASHES.clear()
    vfc._SC_CACHE.clear()


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


def _jobs(cfg) -> list[tuple[str, str]]:
    """Train, eval and forgetting of three runs (baseline, HSW + Thermostat, CRaFT) and every job
    upstream of them."""
    suite = "mw_downstream"
    runs = [vfc.run_name(m, suite, "full", 42) for m in ("baseline", "icsm_hsw_thermostat", "craft")]
    todo = (
        [("train", r) for r in runs]
        + [("eval", f"{r}@{suite}") for r in runs]
        + [("forgetting", r) for r in runs]
    )
    jobs: list[tuple[str, str]] = []
    while todo:
        job = todo.pop()
        if job not in jobs:
            jobs.append(job)
            todo += [(st, k) for _, st, k in vfc._upstream(cfg, *job)]
    return sorted(jobs)


def _old_root(cfg, root: Path, monkeypatch) -> dict:
    """Every job of _jobs finished under the old scheme: stage configs with text hashes, outputs
    recording their ids, a train run's checkpoint folder under its old run id; mtimes in the past."""
    with monkeypatch.context() as m:
        m.setattr(
            codedeps,
            "code_digest",
            lambda f: hashlib.sha256(restamp.legacy_source(Path(f).read_bytes()).encode()).hexdigest(),
        )
        vfc._CODE_HASHES.clear()
        vfc._SC_CACHE.clear()
        old = {job: vfc.stage_config(cfg, *job) for job in _jobs(cfg)}
    vfc._CODE_HASHES.clear()
    vfc._SC_CACHE.clear()
    for (stage, key), sc in old.items():
        p = root / "configs" / stage / f"{key}.yaml"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(sc, sort_keys=True))
        comp = freshness.completion_file(sc)
        comp.parent.mkdir(parents=True, exist_ok=True)
        if comp.suffix == ".json":
            comp.write_text(json.dumps({"run_id": sc["run_id"]} if stage == "train" else {"x": 1}))
        else:
            comp.write_bytes(b"anchors")
        freshness.stamp(sc)
        if stage == "train":
            ck = Path(sc["out_dir"]) / "checkpoints" / sc["run_id"] / "segments.json"
            ck.parent.mkdir(parents=True)
            ck.write_text("[]")
        for f in (p, comp):
            os.utime(f, (OLD_MTIME, OLD_MTIME))
    return old


def _stale(cfg, root: Path) -> dict:
    return {
        job: freshness.stale_reason(root / "configs" / job[0] / f"{job[1]}.yaml", vfc.stage_config(cfg, *job))
        for job in _jobs(cfg)
    }


def test_a_reformatted_library_reruns_nothing_after_restamp(pkg, demo_config, tmp_root, monkeypatch):
    """The old root was made from the committed text; the library is then reformatted (ruff, line
    length 60): the old text hashes match only git's versions, whose trees equal today's."""
    _git(pkg.parent, "init", "-q")
    _git(pkg.parent, "add", "-A")
    _git(pkg.parent, "commit", "-q", "-m", "old")
    old = _old_root(demo_config, tmp_root, monkeypatch)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "format",
            "--quiet",
            "--no-cache",
            "--isolated",
            "--line-length",
            "60",
            str(pkg),
        ],
        check=True,
    )
    vfc._CODE_HASHES.clear()
    vfc._SC_CACHE.clear()
    assert all(_stale(demo_config, tmp_root).values())  # the hash change alone would rerun every job

    rep = restamp.restamp_root(tmp_root, dry_run=True)
    assert len(rep["restamped"]) == len(old) and rep["left"] == {}
    assert all(_stale(demo_config, tmp_root).values())  # a dry run writes nothing
    rep = restamp.restamp_root(tmp_root)
    assert len(rep["restamped"]) == len(old) and rep["left"] == {}

    assert _stale(demo_config, tmp_root) == {job: None for job in old}
    for (stage, key), sc in old.items():
        for f in (tmp_root / "configs" / stage / f"{key}.yaml", freshness.completion_file(sc)):
            assert f.stat().st_mtime == OLD_MTIME, f  # Snakemake's mtimes see nothing new
        if stage == "train":
            now = vfc.stage_config(demo_config, stage, key)
            assert now["run_id"] != sc["run_id"]
            ck = Path(sc["out_dir"]) / "checkpoints"
            assert (ck / now["run_id"] / "segments.json").exists() and not (ck / sc["run_id"]).exists()
            assert json.loads(freshness.completion_file(sc).read_text())["run_id"] == now["run_id"]
    # idempotent
    assert restamp.restamp_root(tmp_root)["restamped"] == []


def test_a_real_edit_still_reruns_its_jobs_and_their_dependents(pkg, demo_config, tmp_root, monkeypatch):
    """No git here: the current files' text is the evidence. An edit of the HSW plug-in reruns the
    HSW run, its evals and its forgetting job; everything else is re-stamped."""
    old = _old_root(demo_config, tmp_root, monkeypatch)
    (pkg / "train" / "plugins" / "hsw.py").write_text(
        (pkg / "train" / "plugins" / "hsw.py").read_text() + "\n_X = 1\n"
    )
    vfc._CODE_HASHES.clear()
    vfc._SC_CACHE.clear()
    rep = restamp.restamp_root(tmp_root)
    hsw = vfc.run_name("icsm_hsw_thermostat", "mw_downstream", "full", 42)
    left = {Path(f).stem for f in rep["left"]}
    assert left == {hsw, f"{hsw}@mw_downstream"}  # train, eval and forgetting of that run
    assert any("train/plugins/hsw.py" in why for why in rep["left"].values())
    stale = {job for job, why in _stale(demo_config, tmp_root).items() if why}
    assert stale == {("train", hsw), ("eval", f"{hsw}@mw_downstream"), ("forgetting", hsw)}
    assert len(rep["restamped"]) == len(old) - 3 and len(old) > 12
