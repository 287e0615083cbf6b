"""Issue 13 items 2-3: every job's environment keeps TensorFlow out of transformers (USE_TF=0 and kin),
a job killed by a signal says where its log is and what to try, and `job_python` picks the jobs'
interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlaforget.jobs import JobPythonError, check_job_python, crash_guard, job_python
from vlaforget.paths import job_env


def test_job_env_keeps_tensorflow_out_of_transformers(tmp_path):
    env = job_env(tmp_path)
    assert env["USE_TF"] == "0" and env["USE_TORCH"] == "1" and env["USE_JAX"] == "0"
    assert env["PYTHONFAULTHANDLER"] == "1"
    assert "TF_CPP_MIN_LOG_LEVEL" in env


REAL_PY = Path(__file__).resolve().parents[1] / ".venv-real" / "bin" / "python"


@pytest.mark.parametrize("python", ["driver", "real-env"])
def test_non_cache_stage_modules_do_not_import_tensorflow(tmp_path, python):
    """Only the cache stage may load TF: importing what the other stages run must not pull it in
    (also in the real-study env, with transformers 4.40.1 and TF installed, when present)."""
    exe = sys.executable
    if python == "real-env":
        if not REAL_PY.exists():
            pytest.skip("no .venv-real (make real-env)")
        exe = str(REAL_PY)
    code = (
        "import sys, vlaforget.cli, vlaforget.models, vlaforget.data.cache, vlaforget.data.probe, "
        "vlaforget.eval.closed_loop, vlaforget.eval.forgetting, vlaforget.train.loop, vlaforget.stages.model, "
        "vlaforget.stages.probe, vlaforget.stages.icsm, vlaforget.stages.craft_anchors, vlaforget.stages.train, "
        "vlaforget.stages.eval, vlaforget.stages.forgetting; "
        "from vlaforget.models.tiny import random_tiny_backend; random_tiny_backend(); "
        "print('tensorflow' in sys.modules)"
    )
    env = {
        **job_env(tmp_path),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run([exe, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def _run(line: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {line}"], capture_output=True, text=True, check=False
    )


def test_segfaulting_job_names_its_log_and_what_to_try(tmp_path):
    log = tmp_path / "logs" / "probe.log"
    log.parent.mkdir()
    crash = f"{sys.executable} -c 'import os, signal; os.kill(os.getpid(), signal.SIGSEGV)' >> {log} 2>&1"
    r = _run(crash_guard(crash, str(log), "probe", "vlaforget probe --config X.yaml"))
    assert r.returncode == 139
    msg = r.stderr
    assert str(log) in msg and "signal 11" in msg and "SEGV" in msg
    assert "USE_TF=0" in msg and "vlaforget probe --config X.yaml" in msg
    assert "killed by signal 11" in log.read_text()  # also at the end of the log


def test_failing_or_passing_job_keeps_its_status_without_crash_message(tmp_path):
    log = tmp_path / "x.log"
    r = _run(crash_guard(f"{sys.executable} -c 'raise SystemExit(3)' >> {log} 2>&1", str(log), "train", "r"))
    assert r.returncode == 3 and "killed by signal" not in r.stderr
    r = _run(crash_guard(f"true >> {log} 2>&1", str(log), "train", "r"))
    assert r.returncode == 0 and r.stderr == ""


def test_then_runs_only_after_success_and_keeps_the_status(tmp_path):
    """`then` (a report job's record) runs only when the command succeeded; the line exits with the
    command's status either way."""
    log, rec = tmp_path / "x.log", tmp_path / "record.json"
    then = f"printf '%s' done > {rec}"
    r = _run(
        crash_guard(
            f"{sys.executable} -c 'raise SystemExit(3)' >> {log} 2>&1", str(log), "table", "r", then=then
        )
    )
    assert r.returncode == 3 and not rec.exists()
    r = _run(crash_guard(f"true >> {log} 2>&1", str(log), "table", "r", then=then))
    assert r.returncode == 0 and rec.read_text() == "done"


def test_job_python_relative_to_repo_and_checked(tmp_path):
    assert job_python({"job_python": None}, tmp_path, "/usr/bin/python3") == "/usr/bin/python3"
    assert job_python({"job_python": ".venv-real/bin/python"}, tmp_path, "x") == str(
        tmp_path / ".venv-real/bin/python"
    )
    with pytest.raises(JobPythonError, match="make real-env"):
        check_job_python(str(tmp_path / ".venv-real/bin/python"))
    check_job_python(sys.executable)
