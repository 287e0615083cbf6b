"""One data root, many checkouts (issue 29): every output is named by the config that made it, so no
driver ever reports another config's result as its own. Each test here failed on the layout where a
run's outputs lived at one path per run name (runs/{run}/) and reruns were forced by rewriting or
touching shared stage-config files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import copy_workflow, snakemake

RUN = "mw_downstream__icsm_hsw_thermostat__full__s42"
# The smallest study that still builds table_main through every stage: one run of the full method.
SMALL = """\
results_dir: results          # per checkout (the repo's results/)
study:
  methods: [icsm_hsw_thermostat]
  fewshot_methods: []
  ablations: []
"""


# table_main up to its training run (the evaluations add minutes on a shared CPU and nothing to the
# question; tests/test_workflow_dryrun.py: a table is rebuilt from the invoking config's evals)
TRAIN = ["table_main", "--until", "train"]


def _checkout(dest: Path, *overlays: str) -> Path:
    """A clone of the workflow (its own .snakemake and results/) with config/small.yaml (+ overlays)."""
    wf = copy_workflow(dest)
    (wf / "config" / "small.yaml").write_text(SMALL + "".join(overlays))
    return wf


def _files(wf: Path) -> list[str]:
    return ["--profile", "profiles/ci", "--configfiles", "config/demo.yaml", "config/ci.yaml", "config/small.yaml"]


def _expected_train_id(wf: Path, env: dict) -> str:
    """The config id this checkout's own library gives the run (whatever the layout)."""
    code = ("import sys; from vlaforget.config import load_config, stage_config; from vlaforget.io import config_id; "
            "cfg = load_config('config/config.yaml', 'config/demo.yaml', 'config/ci.yaml', 'config/small.yaml'); "
            f"print(config_id(stage_config(cfg, 'train', '{RUN}')))")
    e = {**os.environ, **env, "PYTHONPATH": str(wf / "src")}
    r = subprocess.run([sys.executable, "-c", code], cwd=wf, env=e, capture_output=True, text=True, check=True)
    return r.stdout.strip()


def _ids_of_run(root: Path) -> set[str]:
    """Config ids recorded by every finished training of RUN under the root, wherever it lies."""
    return {json.loads(p.read_text()).get("config_id") for p in (root / "runs" / RUN).rglob("final/done.json")}


def _env(tmp_path: Path) -> dict:
    return {"VLAFORGET_ROOT": str(tmp_path / "data" / "root"), "VLAFORGET_ALLOWED_ROOT": str(tmp_path / "data"),
            "VLAFORGET_SKIP_PREFLIGHT": "1"}


@pytest.mark.slow
def test_a_b_a_each_checkout_keeps_its_results(tmp_path):
    """A trains; B (train.lora.r 3), then C (an edit of methods/hsw.py) retrain on the same root; A,
    with its .snakemake kept, must still find its own run and rerun nothing: on the old layout it
    printed "reruns: train.lora.r 3 -> 2", then "Nothing to be done" and served B's adapter."""
    env = _env(tmp_path)
    root = Path(env["VLAFORGET_ROOT"])
    a = _checkout(tmp_path / "a")
    b = _checkout(tmp_path / "b", "train:\n  lora:\n    r: 3\n")
    c = _checkout(tmp_path / "c")
    hsw = c / "src" / "vlaforget" / "methods" / "hsw.py"
    hsw.write_text(hsw.read_text() + "\n\ndef _a_new_helper():\n    return 1\n")  # FAULT: a code change
    ida, idb, idc = (_expected_train_id(w, env) for w in (a, b, c))
    assert len({ida, idb, idc}) == 3

    r = snakemake([*TRAIN, *_files(a)], cwd=a, env=env, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    for other, want in ((b, idb), (c, idc)):
        r = snakemake([*TRAIN, *_files(other)], cwd=other, env=env, timeout=1500)
        assert r.returncode == 0, r.stderr[-3000:]
        assert want in _ids_of_run(root)
        # A comes back, .snakemake kept: its own result, its own table
        r = snakemake([*TRAIN, *_files(a)], cwd=a, env=env, timeout=1500)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ida in _ids_of_run(root), f"A's run was replaced by another config's: {_ids_of_run(root)}"
        assert "Nothing to be done" in r.stdout + r.stderr, "switching back must rerun nothing"

    # copying the finished root elsewhere (cp -a) reruns nothing
    moved = tmp_path / "data" / "copy"
    shutil.copytree(root, moved, symlinks=True)
    r = snakemake(["-n", *TRAIN, *_files(a)], cwd=a, env={**env, "VLAFORGET_ROOT": str(moved)})
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, r.stdout[-3000:]


@pytest.mark.slow
def test_two_drivers_on_one_root_never_exit_0_with_another_configs_run(tmp_path):
    """Two checkouts (lora r 2 / r 3) start the same run 3 s apart on one root: whichever driver exits
    0 has its own run (on the old layout B's driver exited 0 with A's adapter in 2 of 3 trials)."""
    env = _env(tmp_path)
    root = Path(env["VLAFORGET_ROOT"])
    a = _checkout(tmp_path / "a")
    b = _checkout(tmp_path / "b", "train:\n  lora:\n    r: 3\n")
    ida, idb = _expected_train_id(a, env), _expected_train_id(b, env)
    # the shared upstream first (same config in both): the race is on the run
    r = snakemake(["table_main", "--until", "icsm", *_files(a)], cwd=a, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    e = {**os.environ, **env, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    procs = []
    for wf in (a, b):
        procs.append(subprocess.Popen([sys.executable, "-m", "snakemake", *TRAIN, *_files(wf)], cwd=wf,
                                      env={**e, "PYTHONPATH": str(wf / "src")}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        time.sleep(3)
    rcs = [p.wait(timeout=900) for p in procs]
    for wf, rc, want in ((a, rcs[0], ida), (b, rcs[1], idb)):
        if rc == 0:
            assert want in _ids_of_run(root), f"{wf.name} exited 0 without its own run: {_ids_of_run(root)}"
    assert 0 in rcs  # at least one finished
