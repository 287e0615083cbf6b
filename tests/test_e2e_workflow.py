"""The micro end-to-end study: `snakemake --profile profiles/ci` runs every rule once on CPU (scripted
Meta-World demos -> tiny VLA -> probe / ICSM / anchors -> every method -> evals -> tables, figures),
then a second invocation has nothing to do."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import snakemake


@pytest.mark.slow
def test_ci_profile_runs_the_whole_study(tmp_path, workflow_copy):
    env = {
        "VLAFORGET_ROOT": str(tmp_path / "data" / "root"),
        "VLAFORGET_ALLOWED_ROOT": str(tmp_path / "data"),
        "VLAFORGET_NO_PROGRESS": "1",
    }
    r = snakemake(["--profile", "profiles/ci"], cwd=workflow_copy, env=env, timeout=3600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    root = tmp_path / "data" / "root"
    # config/ci.yaml: results_dir null -> {root}/results/ci-<id of what the tables were built from>
    (results,) = (root / "results").glob("ci-*")

    rows = list(csv.DictReader((results / "table_main.csv").open()))
    assert {r["method"] for r in rows} == {"teacher", "baseline", "icsm_hsw_thermostat", "craft"}
    for row in rows:
        ds = float(row["downstream_success_mean"])
        assert 0.0 <= ds <= 1.0
    for kind in ("fewshot", "ablation"):
        assert (results / f"table_{kind}.md").read_text().startswith(f"# Table: {kind}")
    for name in ("pareto", "training_curves", "ablation"):
        assert (results / "figures" / f"{name}.png").stat().st_size > 1000

    # every output at its config id's path (issue 29): one config here, so one id folder each
    (ev_file,) = (root / "evals" / "mw_downstream__baseline__full__s42" / "mw_downstream").glob("*.json")
    ev = json.loads(ev_file.read_text())
    assert ev["n_episodes"] >= 1 and 0.0 <= ev["success_rate"] <= 1.0
    (craft,) = [
        d for d in (root / "runs" / "mw_downstream__craft__full__s42").iterdir() if d.name != "checkpoints"
    ]
    assert (craft / "metrics.jsonl").exists()
    assert (root / "configs" / "train" / "mw_downstream__craft__full__s42" / f"{craft.name}.yaml").exists()
    # nothing generated inside the workflow copy
    assert not (workflow_copy / "runs").exists() and not (workflow_copy / "datasets").exists()
    assert not (workflow_copy / "results").exists()

    again = snakemake(["--profile", "profiles/ci", "-n"], cwd=workflow_copy, env=env)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert "builds" not in again.stderr, again.stderr[-3000:]  # no job would build beside another config
    (done_file,) = (root / "runs" / "mw_downstream__baseline__full__s42").glob("*/final/done.json")
    done = json.loads(done_file.read_text())
    assert done["config_id"] == done_file.parents[1].name and done["adapter_sha256"]
    (attempts,) = (root / "logs" / "train" / "mw_downstream__baseline__full__s42").glob("*.log.attempts")
    assert attempts.read_text().startswith("=== attempt")
