"""`vlaforget plan`: the study grid, the cost arithmetic, profile reading, the pilot preset."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlaforget import plan
from vlaforget.config import load_config

REPO = Path(__file__).resolve().parents[1]

TABLE = {  # round numbers so the expected values can be computed by hand
    "train": {
        "gpu": "h200",
        "micro_s": {2: 0.5, 16: 1.0},
        "method_factor": {"baseline": 1.0, "method": 1.1, "craft": 2.0},
    },
    "policy": {"gpu": "h100", "call_ms": 100.0, "ms_per_sample": 10.0},
    "libero_env_ms": 20.0,
    "eval_startup_s": 40.0,
    "probe_icsm_s": 60.0,
    "job_startup_s": 100.0,
}


@pytest.fixture(autouse=True)
def _default_roots(monkeypatch):
    """The real study's own roots (other tests' training runs leave VLAFORGET_ROOT in the environment);
    nothing is written there: the plan only reads the config."""
    monkeypatch.delenv("VLAFORGET_ROOT", raising=False)
    monkeypatch.delenv("VLAFORGET_ALLOWED_ROOT", raising=False)


def cfg(*overlays):
    return load_config(REPO / "config" / "config.yaml", *[REPO / "config" / o for o in overlays])


def test_real_study_grid_is_81_runs_and_42500_episodes():
    c = cfg("profile_4090.yaml")
    runs = plan.study_runs(c)
    assert len(runs) == 81 and len(set(runs)) == 81  # 36 main + 18 few-shot + 27 ablation (6 shared)
    p = plan.make_plan(c, "h200", 1, TABLE)
    assert p["rules"]["train"]["jobs"] == 81
    assert p["rules"]["eval"]["jobs"] == 85  # 81 runs + the teacher on 4 suites (no upstream suites set)
    assert p["eval_episodes"] == 85 * 10 * 50


def test_micro_step_is_max_of_host_floor_and_scaled_gpu_work():
    # on the measuring GPU: GPU work 1.0 s at 16 -> 0.25 s at 4, below the 0.5 s host floor
    assert plan.micro_step_s(16, "h200", TABLE) == pytest.approx(1.0)
    assert plan.micro_step_s(4, "h200", TABLE) == pytest.approx(0.5)
    r = 989.0 / 165.2  # published TFLOP/s ratio H200 : RTX 4090
    assert plan.micro_step_s(16, "rtx4090", TABLE) == pytest.approx(r)
    assert plan.micro_step_s(4, "rtx4090", TABLE) == pytest.approx(max(0.5, 0.25 * r))
    with pytest.raises(plan.PlanError, match="--gpu"):
        plan.micro_step_s(16, "tpu", TABLE)


def test_train_and_eval_hours_by_hand():
    c = cfg("profile_4090.yaml")
    c["train"].update(max_steps=1000, batch_size=16, grad_accum=2, nproc=1)
    run_b = "libero_spatial_no_noops__baseline__full__s42"
    run_c = "libero_spatial_no_noops__craft__full__s42"
    assert plan.train_hours(c, run_b, "h200", TABLE) == pytest.approx((1000 * 2 * 1.0 + 100) / 3600)
    assert plan.train_hours(c, run_c, "h200", TABLE) == pytest.approx((1000 * 2 * 2.0 + 100) / 3600)
    c["train"]["nproc"] = 4  # DDP: every GPU is busy for the whole run
    assert plan.train_hours(c, run_b, "h200", TABLE) == pytest.approx(4 * (1000 * 2 * 1.0 + 100) / 3600)
    assert plan.train_hours(c, run_b, "h200", TABLE, measured_step={"baseline": 3.0}) == pytest.approx(
        4 * (1000 * 3.0 + 100) / 3600
    )
    # eval: libero_spatial = 10 tasks x 50 episodes, cap 220, 10 wait steps, 8 envs -> 63 waves
    c["eval"]["num_envs"] = 8
    call = (100 + 10 * 8) / 1000  # on the H100 the policy was measured on
    want = (63 * (220 * (call + 0.02) + 10 * 0.02) + 40 + 100) / 3600
    assert plan.eval_hours(c, "libero_spatial_no_noops", "h100", TABLE) == pytest.approx(want)
    half = (63 * (110 * (call + 0.02) + 10 * 0.02) + 40 + 100) / 3600
    assert plan.eval_hours(c, "libero_spatial_no_noops", "h100", TABLE, step_fraction=0.5) == pytest.approx(
        half
    )


def test_total_and_wall_clock():
    c = cfg("profile_4090.yaml", "pilot.yaml")
    p1 = plan.make_plan(c, "h200", 1, TABLE)
    p8 = plan.make_plan(c, "h200", 8, TABLE)
    total = sum(r["gpu_hours"] for r in p1["rules"].values())
    assert p1["total_gpu_hours"] == pytest.approx(total, abs=0.1)
    assert p1["total_gpu_hours"] == p8["total_gpu_hours"]
    serial = p1["rules"]["probe+icsm"]["gpu_hours"] + p1["rules"]["craft_anchors"]["gpu_hours"]
    assert p8["wall_clock_days"] == pytest.approx((serial + (total - serial) / 8) / 24, abs=0.01)
    assert p1["wall_clock_days"] == pytest.approx(total / 24, abs=0.01)


def test_read_profile():
    assert plan.read_profile(REPO / "profiles" / "4090") == {
        "name": "4090",
        "configfiles": ["config/profile_4090.yaml"],
        "gpus": 1,
        "gpu_model": "rtx4090",
    }
    v = plan.read_profile(REPO / "profiles" / "v100x8")
    assert v["gpus"] == 8 and v["gpu_model"] == "v100"
    s = plan.read_profile(REPO / "profiles" / "slurm")
    assert s["gpu_model"] == "v100" and s["gpus"] is None  # a cluster: --gpus N


def test_steps_from_runs(tmp_path):
    for name, method, times in [
        ("a", {"craft": {"enabled": True}}, [9.0, 5.0, 6.0, 7.0]),
        ("b", {"hsw": {"enabled": True}}, [9.0, 2.0, 2.0, 3.0]),
    ]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(json.dumps({"method": method}))
        (d / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "step_time_s": t}) + "\n" for i, t in enumerate(times))
        )
    assert plan.steps_from_runs(tmp_path, {}) == {"craft": 6.0, "method": 2.0}  # step 1 (start-up) left out


def test_plan_cli_prints_rules_and_total(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlaforget.cli",
            "plan",
            "--profile",
            "profiles/4090",
            "--json",
            str(tmp_path / "p.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "81 training runs" in out.stdout and "| **total** |" in out.stdout and "ESTIMATE" in out.stdout
    p = json.loads((tmp_path / "p.json").read_text())
    assert set(p["rules"]) == {"probe+icsm", "craft_anchors", "train", "eval", "forgetting"}
    assert math.isclose(p["total_gpu_hours"], sum(r["gpu_hours"] for r in p["rules"].values()), abs_tol=0.2)
    bad = subprocess.run(
        [sys.executable, "-m", "vlaforget.cli", "plan", "--profile", "profiles/slurm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert bad.returncode == 2 and "--gpus" in bad.stderr


def test_pilot_is_three_runs_within_a_day_on_a_4090():
    c = cfg("profile_4090.yaml", "pilot.yaml")
    runs = plan.study_runs(c)
    assert sorted(r.split("__")[1] for r in runs) == ["baseline", "craft", "icsm_hsw_thermostat"]
    assert plan.make_plan(c, "rtx4090", 1)["wall_clock_days"] < 1.0  # with the measured table


@pytest.mark.slow
@pytest.mark.parametrize(
    "overlays,target",
    [
        (["config/profile_4090.yaml", "config/pilot.yaml"], "results/table_main.csv"),
        (["config/profile_4090.yaml"], "all"),
    ],
)
def test_plan_counts_the_jobs_snakemake_would_run(tmp_path, overlays, target):
    """The plan's grid is the workflow's: its job counts per rule equal a Snakemake dry run's."""
    from test_workflow_dryrun import copy_workflow, dry

    wf = copy_workflow(tmp_path / "wf")
    env = {"VLAFORGET_ROOT": "", "VLAFORGET_ALLOWED_ROOT": ""}
    out = dry([target, "--profile", "profiles/4090", "--configfiles", *overlays], wf, env)
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", out[out.index("Job stats") :], re.MULTILINE))
    p = plan.make_plan(
        load_config(REPO / "config" / "config.yaml", *[REPO / o for o in overlays]), "h200", 1, TABLE
    )
    for rule in ("train", "eval", "forgetting", "craft_anchors"):
        assert int(stats[rule]) == p["rules"][rule]["jobs"], rule
    assert int(stats["probe"]) + int(stats["icsm"]) == p["rules"]["probe+icsm"]["jobs"]
    # the dry-run itself prints the plan of this config on the profile's GPU (one RTX 4090)
    c = load_config(REPO / "config" / "config.yaml", *[REPO / o for o in overlays])
    want = plan.make_plan(c, "rtx4090", 1)
    assert "vlaforget plan for this dry-run (profile 4090)" in out
    assert f"| **total** | | **{want['total_gpu_hours']:.1f}** |" in out
    assert f"wall-clock >= {want['wall_clock_days']:.1f} days on 1 GPU(s)" in out


def test_dry_run_summary_of_a_gpu_profile():
    """The plan figure a dry-run prints: only for dry-runs of profiles with a GPU model and count,
    the same table as `vlaforget plan` for the invocation's merged config."""
    c = cfg("profile_4090.yaml", "pilot.yaml")
    argv = ["snakemake", "-n", "--profile", "profiles/4090", "--configfiles", "config/pilot.yaml"]
    text = plan.dry_run_summary(c, argv, {}, repo=REPO)
    want = plan.make_plan(c, "rtx4090", 1)
    assert text == plan.format_plan(want, "vlaforget plan for this dry-run (profile 4090)")
    assert f"**{want['total_gpu_hours']:.1f}**" in text and "rtx4090 x 1" in text
    v = cfg("profile_v100x8.yaml")
    t8 = plan.dry_run_summary(v, ["snakemake", "--dry-run", "--profile=profiles/v100x8"], {}, repo=REPO)
    assert f"**{plan.make_plan(v, 'v100', 8)['total_gpu_hours']:.1f}**" in t8 and "v100 x 8" in t8
    assert (
        plan.dry_run_summary(c, ["snakemake", "-pn"], {"SNAKEMAKE_PROFILE": "profiles/4090"}, repo=REPO)
        == text
    )
    assert (
        plan.dry_run_summary(c, ["snakemake", "--profile", "profiles/4090"], {}, repo=REPO) is None
    )  # a real run
    assert (
        plan.dry_run_summary(c, ["snakemake", "-n", "--profile", "profiles/demo"], {}, repo=REPO) is None
    )  # no GPU
    assert (
        plan.dry_run_summary(c, ["snakemake", "-n", "--profile", "profiles/slurm"], {}, repo=REPO) is None
    )  # no gpu=N
    assert plan.dry_run_summary(c, ["snakemake", "-n"], {}, repo=REPO) is None
