"""Disk safety: paths outside the allowed root are refused with the fix, large repo files are listed
with where to move them, an uncreatable root says which override to set."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import yaml
from conftest import REPO

from vlaforget import disk


def test_scan_large_files_skips_venv_and_git(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * 2048)
    (tmp_path / "small.txt").write_bytes(b"x" * 10)
    for d in (".venv", ".git"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "huge").write_bytes(b"x" * 4096)
    found = disk.scan_large_files(tmp_path, limit_bytes=1024)
    assert [p.name for p, _ in found] == ["big.bin"]


def test_report_lists_what_to_move_and_where(tmp_root, demo_config, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "model.safetensors").write_bytes(b"x" * 3000)
    buf = io.StringIO()
    r = disk.report(demo_config, scan_dir=repo, limit_gb=1e-6, out=buf)
    text = buf.getvalue()
    assert r["ok"]  # big files warn; the policy itself is fine
    assert "model.safetensors" in text and f"mv '{repo / 'model.safetensors'}'" in text
    assert str(tmp_root / "models") in text
    assert tmp_root.is_dir()  # the root was created


def test_path_outside_allowed_root_is_refused(tmp_root, demo_config, tmp_path):
    cfg = dict(demo_config)
    cfg["data"] = dict(cfg["data"], rlds_dir="/workspace/datasets")
    problems = disk.check_paths(cfg)
    assert len(problems) == 1
    assert "data.rlds_dir" in problems[0] and "VLAFORGET_ALLOWED_ROOT" in problems[0]
    r = disk.report(cfg, scan_dir=tmp_path / "none", out=io.StringIO())
    assert not r["ok"]


def test_uncreatable_root_names_the_override(tmp_path, monkeypatch, demo_config):
    if os.geteuid() == 0:
        # root ignores directory permissions: put a file where a directory is needed instead
        blocker = tmp_path / "data" / "blocker"
        blocker.write_text("not a dir")
        monkeypatch.setenv("VLAFORGET_ROOT", str(blocker / "root"))
    else:
        ro = tmp_path / "data" / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        monkeypatch.setenv("VLAFORGET_ROOT", str(ro / "root"))
    buf = io.StringIO()
    r = disk.report(demo_config, scan_dir=tmp_path / "none", out=buf)
    assert not r["ok"] and "VLAFORGET_ROOT=" in buf.getvalue()


def test_cli_exit_codes(tmp_root, tmp_path):
    env = dict(os.environ)
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlaforget.cli",
            "check-disk",
            "--configfile",
            str(REPO / "config" / "config.yaml"),
            str(REPO / "config" / "demo.yaml"),
            "--scan",
            str(tmp_path / "empty"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "[check-disk] OK" in ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"rlds_dir": "/somewhere/else"}}))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlaforget.cli",
            "check-disk",
            "--configfile",
            str(REPO / "config" / "config.yaml"),
            str(bad),
            "--scan",
            str(tmp_path / "empty"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == 1
    assert "data.rlds_dir = /somewhere/else is outside the allowed root" in r.stderr
