"""Issue 13 item 5: the rehearsal profile runs the REAL config's DAG (world libero, LIBERO-format RLDS,
the LIBERO simulator, all methods and ablations, the three tables) on tiny inputs with the tiny backend;
the short evaluation protocol is set by study-level keys (eval.libero.n_tasks / max_steps)."""

from __future__ import annotations

import re

import yaml
from conftest import REPO, copy_workflow
from test_workflow_dryrun import dry, env_for, planned, trained_runs

from vlaforget import config as vfc
from vlaforget import stageconfig as vsc

CONFIGS = [REPO / "config" / "config.yaml", REPO / "config" / "rehearsal.yaml"]


def test_short_eval_protocol_from_study_level_keys(tmp_root):
    cfg = vfc.load_config(*CONFIGS)
    e = vsc.stage_config(cfg, "eval", "teacher@libero_spatial_no_noops")["eval"]
    assert e["n_tasks"] == 1 and e["max_steps"] == 8 and e["episodes_per_task"] == 1
    assert "tasks" not in e  # a LIBERO block: the suite's own tasks and language


def test_tiny_teacher_for_world_libero_pretrains_on_its_own_suite(tmp_root):
    cfg = vfc.load_config(*CONFIGS)
    sc = vsc.stage_config(cfg, "model", cfg["model"]["base"])
    assert sc["upstream"]["name"] == "libero_goal_no_noops"
    assert {b["name"] for b in sc["corpus_datasets"]} >= {"libero_spatial_no_noops", "libero_goal_no_noops"}
    # the fixture (in a folder named by what it is made from), not data.rlds_dir
    assert vsc.rlds_root(cfg).parent == vsc.layout(cfg).root / "datasets" / "rlds" / "fixture"


def test_rehearsal_differs_from_the_real_config_only_in_sizes_and_data_source():
    real = yaml.safe_load(CONFIGS[0].read_text())
    reh = yaml.safe_load(CONFIGS[1].read_text())
    assert reh.get("world", real["world"]) == "libero"
    for key in ("methods", "fewshot_methods", "ablations"):
        assert key not in reh["study"]  # all three methods and all eight ablations of the real study
    assert "ablations" not in reh  # the real ablation definitions
    assert set(reh["methods"]) <= set(real["methods"])  # only sizes of real methods (thermostat cadence)


def test_rehearsal_dag_runs_every_real_rule(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    out = dry(["--profile", "profiles/rehearsal", "-p"], wf, env_for(tmp_path))
    jobs = planned(out)
    for rule in (
        "libero_fixture",
        "cache",
        "model",
        "probe",
        "icsm",
        "craft_anchors",
        "train",
        "eval",
        "forgetting",
        "libero_vqa",
        "table",
        "figures",
    ):
        assert jobs.get(rule), rule
    assert "demos" not in jobs  # LIBERO data comes as RLDS, not from Meta-World demos
    ablations = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["study"]["ablations"]
    runs = trained_runs(out)
    for a in ablations + ["baseline", "icsm_hsw_thermostat", "craft"]:
        assert f"libero_spatial_no_noops__{a}__full__s42" in runs, a
    assert "libero_spatial_no_noops__craft__1shot__s42" in runs
    root = str(tmp_path / "data" / "root")
    assert all(o.startswith((root + "/results/", root + "/reports/")) for o in jobs["table"])
    assert "/.venv-real/bin/python -m vlaforget.cli eval --config" in out  # the real study's job env
    assert re.search(
        r"libero-fixture --out \S+/datasets/rlds/fixture/\w+ --suites libero_spatial_no_noops libero_goal_no_noops "
        r"--tasks 2 --episodes 3 --steps 16 --seed 0 --shards 2 --source synthetic",
        out,
    )


def test_rehearsal_generates_and_scores_the_libero_question_set(tmp_path, monkeypatch):
    """Issue 18 item 2 on the real path: the question set is generated from the LIBERO simulator once
    (in the real study's job env) and every forgetting job, teacher included, scores it."""
    wf = copy_workflow(tmp_path / "wf")
    out = dry(["--profile", "profiles/rehearsal", "-p"], wf, env_for(tmp_path))
    root = str(tmp_path / "data" / "root")
    (manifest,) = planned(out)["libero_vqa"]  # {root}/vqa/libero/{hash of what it is made from}/
    assert re.fullmatch(rf"{root}/vqa/libero/\w+/manifest.json", manifest)
    assert re.search(
        r"/\.venv-real/bin/python -m vlaforget\.cli libero-vqa --out \S+/vqa/libero/\w+ "
        r"--suites libero_spatial --n 12 --seed 0 --states-per-task 1 --tasks-per-suite 2",
        out,
    )
    forgetting = [
        b for b in re.split(r"\n(?=(?:local)?rule \w+:)", out) if b.strip().startswith("rule forgetting:")
    ]
    assert len(forgetting) == len(planned(out)["forgetting"]) >= 2
    assert all(manifest in b.split("output:")[0] for b in forgetting)  # every forgetting job waits for it
    for k, v in env_for(tmp_path).items():
        monkeypatch.setenv(k, v)
    sc = vsc.stage_config(vfc.load_config(*CONFIGS), "forgetting", "teacher")
    assert sc["vqa_jsonl"] == manifest.replace("manifest.json", "questions.jsonl")
    real = yaml.safe_load(CONFIGS[0].read_text())["eval"]["forgetting"]["libero_vqa"]
    reh = yaml.safe_load(CONFIGS[1].read_text())["eval"]["forgetting"]["libero_vqa"]
    assert set(reh) - set(real) <= {"tasks_per_suite"} and set(reh["suites"]) <= set(
        real["suites"]
    )  # sizes only


# --- the OpenVLA-architecture variant (profiles/rehearsal-openvla, config/rehearsal-openvla.yaml) ---

OPENVLA_CONFIGS = CONFIGS + [REPO / "config" / "rehearsal-openvla.yaml"]


def test_openvla_variant_changes_only_the_model(tmp_root):
    """The variant is the rehearsal with the model swapped for OpenVLA's architecture: same data
    fixture, methods, ablations, sizes and eval protocol."""
    variant = yaml.safe_load(OPENVLA_CONFIGS[2].read_text())
    assert set(variant) <= {"study_name", "model", "data", "train"}
    assert set(variant.get("train", {})) <= {"max_steps", "batch_size", "save_steps"}  # sizes only
    assert set(variant["data"]) == {"image_size"} and variant["data"]["image_size"] == 224
    cfg = vfc.load_config(*OPENVLA_CONFIGS, overrides={"model": {"path": str(tmp_root / "openvla-tiny")}})
    assert cfg["model"]["backend"] == "openvla" and not cfg["model"].get("tiny")
    assert cfg["data"]["fixture"] == vfc.load_config(*CONFIGS)["data"]["fixture"]
    profile = yaml.safe_load((REPO / "profiles" / "rehearsal-openvla" / "config.v8+.yaml").read_text())
    assert profile["configfiles"] == ["config/rehearsal.yaml", "config/rehearsal-openvla.yaml"]


def test_openvla_variant_dag_runs_every_real_rule_with_the_openvla_model(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    ckpt = tmp_path / "data" / "openvla-tiny"
    out = dry(
        ["--profile", "profiles/rehearsal-openvla", "-p", "--config", f"model={{path: {ckpt}}}"],
        wf,
        env_for(tmp_path),
    )
    jobs = planned(out)
    for rule in (
        "libero_fixture",
        "cache",
        "model",
        "probe",
        "icsm",
        "craft_anchors",
        "train",
        "eval",
        "forgetting",
        "table",
        "figures",
    ):
        assert jobs.get(rule), rule
    assert (
        len(trained_runs(out)) == 15
    )  # 3 methods, their 1-shot runs, 9 ablations (hsw_own_params: issue 26)
    model_cfgs = tmp_path / "data" / "root" / "configs" / "model" / "openvla-tiny"
    assert re.search(
        rf"{model_cfgs}/\w{{12}}\.yaml", out
    )  # the model stage checks the checkpoint (no pretraining)


def test_make_rehearsal_openvla_skips_with_its_reason_without_openvla_code(tmp_path):
    import os
    import shutil
    import subprocess

    if shutil.which("make") is None:
        import pytest

        pytest.skip("no make")
    env = {k: v for k, v in os.environ.items() if k != "VLAFORGET_OPENVLA_CODE"}
    r = subprocess.run(
        ["make", "-s", "rehearsal-openvla"], cwd=REPO, env=env, check=False, capture_output=True, text=True
    )
    assert r.returncode == 0 and "skipped: VLAFORGET_OPENVLA_CODE is not set" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(
        ["make", "-s", "rehearsal-openvla", f"OPENVLA_CODE={tmp_path}"],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "lacks configuration_prismatic.py" in r.stdout, r.stdout + r.stderr
