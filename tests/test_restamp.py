"""Issue 30's once-only change of code hashes (text → syntax tree), as `vlaforget migrate-root` carries
a data root over it: a file recorded with its old text hash is today's code when a version of it with
that hash (today's file, or one in git history) has today's syntax tree — formatting, comments and
docstrings are not code — and only then: a real edit still counts as a code change."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlaforget import codedeps, migrate, restamp

REL = "methods/hsw.py"


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    dest = tmp_path / "lib" / "vlaforget"
    shutil.copytree(codedeps.PKG_DIR, dest, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codedeps, "PKG_DIR", dest)
    monkeypatch.setattr(migrate, "_VERSIONS", None)
    return dest


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


def _configs(old_raw: bytes, new_raw: bytes) -> tuple[dict, dict]:
    """(old stage config's code record: the text hash, today's: the syntax-tree digest)."""
    old = {"code": "old", "code_files": {REL: restamp.legacy_digest(old_raw)}}
    new = {"code": "new", "code_files": {REL: codedeps.source_digest(new_raw)[:8]}}
    return old, new


def test_the_same_text_hashed_the_old_way_is_not_a_code_change(pkg):
    raw = (pkg / REL).read_bytes()
    assert migrate._code_changes(*_configs(raw, raw)) == []


def test_a_real_edit_is_a_code_change(pkg):
    raw = (pkg / REL).read_bytes()
    edited = raw + b"\n_X = 1\n"  # made from an edited file; today's file is the original
    assert migrate._code_changes(*_configs(edited, raw)) == [REL]


def test_a_reformatted_library_is_recognised_through_git_history(pkg):
    """The old root was made from the committed text; the library is then reformatted (ruff, line
    length 60, single quotes): the old text hash matches only git's version, whose tree is today's."""
    _git(pkg.parent, "init", "-q")
    _git(pkg.parent, "add", "-A")
    _git(pkg.parent, "commit", "-q", "-m", "old")
    committed = (pkg / REL).read_bytes()
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
            "--config",
            "format.quote-style='single'",
            str(pkg / REL),
        ],
        check=True,
    )
    today = (pkg / REL).read_bytes()
    assert today != committed and restamp.legacy_digest(today) != restamp.legacy_digest(committed)
    assert migrate._code_changes(*_configs(committed, today)) == []
    # without the history the old text is nowhere: the file counts as changed
    shutil.rmtree(pkg.parent / ".git")
    migrate._VERSIONS = None
    assert migrate._code_changes(*_configs(committed, today)) == [REL]


def test_files_that_left_the_closure_or_were_split_from_config_are_not_code_changes(pkg):
    """Issue 30 split config.py: a stage reads its config through stagefile.py and no longer imports
    config.py / validation.py (and what only they import). A root recorded with those files moves;
    a file today's stage still imports, edited, still counts."""
    raw = (pkg / REL).read_bytes()
    old, new = _configs(raw, raw)
    old["code_files"].update(
        {"config.py": "0badc0de", "validation.py": "0badc0de", "data/cache.py": "0badc0de"}
    )
    new["code_files"].update({"stagefile.py": codedeps.code_digest(pkg / "stagefile.py")[:8]})
    assert migrate._code_changes(old, new) == []
    assert migrate._code_changes(*_configs(raw + b"\n_X = 1\n", raw)) == [REL]
