"""A job refuses to run when the package's code is not the code its stage config (its id) was made for.

Session 14 saw it: src/ edited while Snakemake ran, and 15 evaluations of the new code were filed under
the old code's ids. These tests edit a copy of the package for real (tests/conftest.py copy_workflow)
and run the stage command in it, as the workflow's job would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import copy_workflow

RUN = "mw_downstream__icsm_hsw_thermostat__full__s42"

WRITE = """
import sys
from vlaforget.config import load_config
from vlaforget.io import config_id
from vlaforget.stageconfig import stage_config
from vlaforget.stagefile import stage_config_text
from vlaforget.paths import resolve_root
cfg = load_config('config/config.yaml', 'config/demo.yaml', 'config/ci.yaml')
stage, key = sys.argv[1], sys.argv[2]
sc = stage_config(cfg, stage, key)
f = resolve_root() / 'configs' / stage / key / (config_id(sc) + '.yaml')
f.parent.mkdir(parents=True, exist_ok=True)
f.write_text(stage_config_text(sc))
print(f)
"""

CHECK = (
    "import sys; from vlaforget.stagefile import check_code, load_stage_config; "
    "check_code(load_stage_config(sys.argv[1]), sys.argv[1])"
)


def _env(wf: Path, tmp_path: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(wf / "src"),
        "VLAFORGET_ROOT": str(tmp_path / "data" / "root"),
        "VLAFORGET_ALLOWED_ROOT": str(tmp_path / "data"),
        "VLAFORGET_SKIP_PREFLIGHT": "1",
    }


def _py(wf: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=wf, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_job_refuses_code_edited_after_its_config_was_written(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    env = _env(wf, tmp_path)
    r = _py(wf, env, "-c", WRITE, "train", RUN)
    assert r.returncode == 0, r.stderr
    cfg = r.stdout.strip().splitlines()[-1]
    assert _py(wf, env, "-c", CHECK, cfg).returncode == 0  # the code it was written for

    loop = wf / "src" / "vlaforget" / "train" / "loop.py"
    original = loop.read_text()
    loop.write_text(original + "\n# a comment is not code\n")
    r = _py(wf, env, "-c", CHECK, cfg)
    assert r.returncode == 0, r.stderr  # comments and docstrings change no id, so no refusal

    loop.write_text(original + "\nEDITED_WHILE_SNAKEMAKE_RAN = 1\n")
    r = _py(wf, env, "-m", "vlaforget.cli", "train", "--config", cfg)
    assert r.returncode != 0
    assert "train/loop.py" in r.stderr and "Nothing was run" in r.stderr, r.stderr
    assert not (tmp_path / "data" / "root" / "runs").exists()  # no run folder, no checkpoint, no output

    # a module the train job does not import changes nothing for it
    loop.write_text(original)
    (wf / "src" / "vlaforget" / "export.py").write_text(
        (wf / "src" / "vlaforget" / "export.py").read_text() + "\nX = 1\n"
    )
    assert _py(wf, env, "-c", CHECK, cfg).returncode == 0


def test_every_job_of_the_study_passes_on_the_code_it_was_planned_with(tmp_root, monkeypatch):
    """No false refusal: every stage config of the demo study (an early-stopping run's included, whose
    code adds the periodic evaluation), written as the workflow writes it and read back as its job
    reads it (the file's {root}, the driver's non-semantic values), passes on the code that planned it."""
    import json

    from conftest import REPO

    from vlaforget import codedeps
    from vlaforget.config import deep_merge, load_config
    from vlaforget.io import config_id
    from vlaforget.stageconfig import stage_configs
    from vlaforget.stagefile import (
        NON_SEMANTIC_ENV,
        check_code,
        load_stage_config,
        non_semantic_values,
        stage_config_text,
    )

    base = load_config(*(REPO / "config" / f for f in ("config.yaml", "demo.yaml")))
    early = deep_merge(base, {"train": {"eval_every": 10, "early_stopping_patience": 2}})
    stages, periodic = set(), 0
    for cfg in (base, early):
        for (stage, key), sc in stage_configs(cfg).items():
            f = tmp_root / "configs" / stage / key / f"{config_id(sc)}.yaml"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(stage_config_text(sc))
            monkeypatch.setenv(NON_SEMANTIC_ENV, json.dumps(non_semantic_values(sc)))
            check_code(load_stage_config(f, stage), f)
            stages.add(stage)
            periodic += stage == "train" and "periodic_eval" in codedeps.train_code_parts(sc)
    assert {"demos", "cache", "model", "probe", "icsm", "train", "eval", "forgetting"} <= stages
    assert periodic > 0  # the early-stopping runs were among them
