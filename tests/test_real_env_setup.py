"""Issue 13 item 2: one install for the real study's jobs (make real-env = libero_setup --stack openvla).
An existing venv keeps its torch (installing LIBERO into the user's env once replaced it with torch
2.13.0 and broke torchvision), torchvision is matched to torch and installed so it cannot swap it, and
a torchvision that cannot load (a RuntimeError, not an ImportError) is reported with its fix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vlaforget.envs import libero_setup as S


@pytest.fixture
def fake_venv(tmp_path, monkeypatch):
    """A venv whose python exists and whose installed versions come from `installed`; pip calls recorded."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    installed = {"torch": "2.2.0+cu121"}
    calls: list[list[str]] = []
    monkeypatch.setattr(S, "installed_version", lambda v, d: installed.get(d))
    monkeypatch.setattr(S, "run", lambda cmd, **kw: calls.append(list(cmd)))
    return venv, installed, calls


def _pip_args(calls):
    return [c[c.index("install") + 1 :] for c in calls if "install" in c]


def test_existing_venv_keeps_its_torch(fake_venv):
    venv, _installed, calls = fake_venv
    S.ensure_venv(venv, "python3", S.NUMPY_PIN)
    flat = [a for c in _pip_args(calls) for a in c]
    assert not any(a.startswith("torch==") or a == "torch" for a in flat), flat
    assert (venv / "vlaforget-constraints.txt").read_text().split() == ["torch==2.2.0"]
    assert all("-c" in c for c in _pip_args(calls))  # every install is constrained to that torch


def test_openvla_stack_pins_and_matching_torchvision(fake_venv):
    venv, _installed, calls = fake_venv
    S.ensure_venv(venv, "python3", S.NUMPY_PIN, stack="openvla")
    args = _pip_args(calls)
    tv = [c for c in args if any(a.startswith("torchvision") for a in c)]
    assert tv and "--no-deps" in tv[0] and "torchvision==0.17.*" in tv[0]
    flat = [a for c in args for a in c]
    for pin in ("transformers==4.40.1", "tokenizers==0.19.1", "timm==0.9.16", "peft==0.11.1"):
        assert pin in flat
    assert any(a.startswith("tensorflow-datasets") for a in flat) and any(a.startswith("wandb") for a in flat)


def test_empty_venv_gets_the_requested_torch(fake_venv):
    venv, installed, calls = fake_venv
    installed.clear()
    S.ensure_venv(venv, "python3", "", torch_spec="torch==2.13.0")
    assert ["-q", "torch==2.13.0"] == _pip_args(calls)[0]


def test_matching_torchvision():
    assert S.matching_torchvision("2.13.0+cpu") == "torchvision==0.28.*"
    assert S.matching_torchvision("2.2.0") == "torchvision==0.17.*"


def test_broken_torchvision_is_removed_with_the_fix(fake_venv, monkeypatch):
    venv, installed, calls = fake_venv
    installed["torchvision"] = "0.28.0"
    err = "RuntimeError: operator torchvision::nms does not exist"

    def fake_run(cmd, capture_output=False, text=False, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", f"Traceback...\n{err}\n")

    monkeypatch.setattr(S.subprocess, "run", fake_run)
    msg = S.check_torchvision(venv)
    assert msg and "torchvision::nms" in msg and "TORCH_INDEX" in msg
    assert any("uninstall" in c for c in calls)


def test_makefile_real_env_target_uses_the_openvla_stack():
    mk = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "real-env:" in mk and "--stack openvla" in mk
