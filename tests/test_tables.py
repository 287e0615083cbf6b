"""Table math on synthetic eval JSONs: mean / std / 95 % t-CI over seeds, retention vs the teacher,
teacher row first, CSV + Markdown; figures render from the same inputs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlaforget.report import figures, tables

SUITE, UP = "mw_downstream", "mw_upstream"


def write_evals(root, runs: dict[str, dict]) -> list[str]:
    """runs: name -> {suite: success, 'vqa': acc, 'drift': d, 'cka': c}."""
    files = []
    for run, vals in runs.items():
        d = root / "evals" / run
        d.mkdir(parents=True)
        for suite in (SUITE, UP):
            if suite in vals:
                p = d / f"{suite}.json"
                p.write_text(
                    json.dumps(
                        {
                            "run": run,
                            "suite": suite,
                            "success_rate": vals[suite],
                            "n_episodes": 20,
                            "per_task": {},
                        }
                    )
                )
                files.append(str(p))
        p = d / "forgetting.json"
        p.write_text(
            json.dumps(
                {
                    "run": run,
                    "vqa_accuracy": vals["vqa"],
                    "vqa_kl": 0.1,
                    "drift_mean": vals["drift"],
                    "cka_mean": vals["cka"],
                    **{
                        k: vals[k]
                        for k in (
                            "drift_craft_layer",
                            "cka_craft_layer",
                            "drift_craft_layer_image",
                            "cka_craft_layer_image",
                        )
                        if k in vals
                    },
                }
            )
        )
        files.append(str(p))
    return files


@pytest.fixture
def evals(tmp_path):
    runs = {"teacher": {SUITE: 0.1, UP: 0.8, "vqa": 0.5, "drift": 0.0, "cka": 1.0}}
    down = {42: 0.6, 123: 0.7, 456: 0.8}
    up = {42: 0.4, 123: 0.6, 456: 0.8}
    for seed in (42, 123, 456):
        runs[f"{SUITE}__baseline__full__s{seed}"] = {
            SUITE: down[seed],
            UP: up[seed],
            "vqa": 0.25,
            "drift": 1.0 + seed / 1000,
            "cka": 0.5,
        }
    runs[f"{SUITE}__craft__full__s42"] = {SUITE: 0.5, UP: 0.8, "vqa": 0.5, "drift": 0.2, "cka": 0.9}
    return write_evals(tmp_path, runs)


def test_summarize_t_interval():
    s = tables.summarize([0.6, 0.7, 0.8])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(0.1)
    assert s["ci95"] == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-4)
    one = tables.summarize([0.5, None, float("nan")])
    assert one["n"] == 1 and one["mean"] == 0.5 and math.isnan(one["ci95"])
    assert tables.summarize([])["n"] == 0
    assert tables.t975(100) == pytest.approx(1.984, abs=1e-3) and tables.t975(1) == pytest.approx(
        12.706, abs=1e-3
    )


def test_build_table_rows_and_retention(evals):
    rows = tables.build_table(tables.load_evals(evals), "main", [UP])
    assert [r["method"] for r in rows] == ["teacher", "baseline", "craft"]
    t, b, c = rows
    assert t["upstream_retention_mean"] == pytest.approx(1.0) and t["n_seeds"] == 1
    assert b["n_seeds"] == 3 and b["downstream_success_mean"] == pytest.approx(0.7)
    # retention per seed = up / 0.8 -> 0.5, 0.75, 1.0
    assert b["upstream_retention_mean"] == pytest.approx(0.75)
    assert b["upstream_retention_std"] == pytest.approx(np.std([0.5, 0.75, 1.0], ddof=1))
    assert b["vqa_retention_mean"] == pytest.approx(0.5)
    assert b["drift_mean"] == pytest.approx(np.mean([1.042, 1.123, 1.456]))
    assert c["n_seeds"] == 1 and math.isnan(c["downstream_success_ci95"])
    assert c["upstream_retention_mean"] == pytest.approx(1.0)


def test_craft_layer_columns_mean_ci(tmp_path):
    """drift / CKA at the CRaFT layer (forgetting.json drift_craft_layer ...) are table columns with
    mean ± 95 % CI over seeds, in the CSV and the Markdown."""
    runs = {
        "teacher": {
            SUITE: 0.5,
            "vqa": 0.5,
            "drift": 0.0,
            "cka": 1.0,
            "drift_craft_layer": 0.0,
            "cka_craft_layer": 1.0,
            "drift_craft_layer_image": 0.0,
            "cka_craft_layer_image": 1.0,
        }
    }
    dcl = {1: 0.1, 2: 0.2, 3: 0.6}
    for seed in (1, 2, 3):
        runs[f"{SUITE}__craft__full__s{seed}"] = {
            SUITE: 0.5,
            "vqa": 0.5,
            "drift": 1.0,
            "cka": 0.5,
            "drift_craft_layer": dcl[seed],
            "cka_craft_layer": 0.9,
            "drift_craft_layer_image": 2 * dcl[seed],
            "cka_craft_layer_image": 0.8,
        }
    rows = tables.build_table(tables.load_evals(write_evals(tmp_path, runs)), "main", [])
    c = rows[1]
    assert c["drift_craft_layer_mean"] == pytest.approx(0.3) and c["drift_craft_layer_n"] == 3
    sd = np.std([0.1, 0.2, 0.6], ddof=1)
    assert c["drift_craft_layer_ci95"] == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)
    assert c["drift_craft_layer_image_mean"] == pytest.approx(0.6)
    assert c["cka_craft_layer_mean"] == pytest.approx(0.9) and c[
        "cka_craft_layer_image_mean"
    ] == pytest.approx(0.8)
    assert rows[0]["cka_craft_layer_mean"] == 1.0
    assert "drift_craft_layer_ci95" in tables.to_csv(rows).splitlines()[0]
    md = tables.to_markdown(rows, "main")
    assert "drift @CRaFT layer" in md and "CKA @CRaFT layer (image pool)" in md


def test_fewshot_groups_by_shots(tmp_path):
    files = write_evals(
        tmp_path,
        {
            "teacher": {SUITE: 0.0, "vqa": 0.4, "drift": 0, "cka": 1},
            f"{SUITE}__baseline__5shot__s1": {SUITE: 0.2, "vqa": 0.2, "drift": 1, "cka": 0.5},
            f"{SUITE}__baseline__10shot__s1": {SUITE: 0.4, "vqa": 0.2, "drift": 1, "cka": 0.5},
            f"{SUITE}__baseline__10shot__s2": {SUITE: 0.6, "vqa": 0.3, "drift": 1, "cka": 0.5},
        },
    )
    rows = tables.build_table(tables.load_evals(files), "fewshot", [])
    by = {(r["method"], r["shots"]): r for r in rows}
    assert by[("baseline", "10shot")]["downstream_success_mean"] == pytest.approx(0.5)
    assert by[("baseline", "5shot")]["n_seeds"] == 1
    assert math.isnan(by[("baseline", "5shot")]["upstream_success_mean"])  # no upstream suites
    md = tables.to_markdown(rows, "fewshot")
    assert md.splitlines()[4].startswith("| method | suite | shots | seeds |")
    assert "upstream success" not in md  # columns nobody measured are left out


def test_cli_writes_csv_and_markdown(evals, tmp_path):
    out = tmp_path / "results" / "table_main.csv"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlaforget.cli",
            "table",
            "--kind",
            "main",
            "--upstream-suites",
            UP,
            "--inputs",
            *evals,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == ["teacher", "baseline", "craft"]
    assert float(rows[1]["downstream_success_mean"]) == pytest.approx(0.7)
    assert rows[2]["downstream_success_ci95"] == ""  # one seed: no interval
    md = out.with_suffix(".md").read_text()
    assert "0.700 ± 0.248" in md  # 4.303 * 0.1 / sqrt(3)
    back = tables.read_table(out)
    assert back[1]["upstream_retention_mean"] == pytest.approx(0.75)


def test_eval_without_success_rate_is_named(tmp_path):
    p = tmp_path / "evals" / "teacher" / "x.json"
    p.parent.mkdir(parents=True)
    p.write_text("{}")
    with pytest.raises(ValueError, match="success_rate"):
        tables.load_evals([p])


def test_figures_render(evals, tmp_path):
    out = tmp_path / "figs"
    run_dirs = []
    for seed, slope in ((42, 1.0), (123, 0.5)):
        d = tmp_path / "runs" / f"{SUITE}__baseline__full__s{seed}"
        d.mkdir(parents=True)
        lines = [
            json.dumps(
                {"step": s, "train_loss": 2.0 - slope * s / 10, "action_accuracy": s / 10, "drift_d": 0.1 * s}
            )
            for s in range(0, 10, 2)
        ]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n{broken")
        run_dirs.append(d)
    assert len(figures.read_metrics(run_dirs[0] / "metrics.jsonl")) == 5
    table = tmp_path / "table_ablation.csv"
    table.write_text(tables.to_csv(tables.build_table(tables.load_evals(evals), "ablation", [UP])))
    written = (
        figures.pareto(evals, [UP], out)
        + figures.training_curves(run_dirs, out)
        + figures.ablation(table, out)
        + figures.category_retention(evals, [UP], out)
    )
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{e}"
        for n in ("pareto", "training_curves", "ablation", "category_retention")
        for e in ("png", "pdf")
    )
    assert all(p.stat().st_size > 1000 for p in written)
    # a rerun's figures are byte-identical: the PDFs carry no creation date (the committed
    # results/embedded PDFs changed on every `make demo` before)
    assert all(b"/CreationDate" not in p.read_bytes() for p in written if p.suffix == ".pdf")


def _mc(acc: dict[str, float]) -> dict:
    return {
        "accuracy": float(np.mean(list(acc.values()))),
        "by_category": {c: {"accuracy": a, "n": 10} for c, a in acc.items()},
    }


def test_retention_undefined_per_suite_and_category(tmp_path):
    """Teacher 0 on an upstream suite / a question category: 'retention undefined', never 0 or NaN."""
    up2 = "mw_upstream2"
    runs = {"teacher": {SUITE: 0.1, UP: 0.0, up2: 0.5, "mc": {"gripper": 0.8, "drawer": 0.0}}}
    for seed, (u2, g) in {1: (0.25, 0.4), 2: (0.5, 0.8)}.items():
        runs[f"{SUITE}__baseline__full__s{seed}"] = {
            SUITE: 0.9,
            UP: 0.2,
            up2: u2,
            "mc": {"gripper": g, "drawer": 0.3},
        }
    files = []
    for run, v in runs.items():
        d = tmp_path / "evals" / run
        d.mkdir(parents=True)
        for s in (SUITE, UP, up2):
            (d / f"{s}.json").write_text(json.dumps({"run": run, "suite": s, "success_rate": v[s]}))
            files.append(str(d / f"{s}.json"))
        (d / "forgetting.json").write_text(json.dumps({"run": run, "vqa_mc": _mc(v["mc"])}))
        files.append(str(d / "forgetting.json"))
    rows = tables.build_table(tables.load_evals(files), "main", [UP, up2])
    b = rows[1]
    assert b[f"upstream_retention[{UP}]_mean"] is tables.UNDEFINED
    assert b[f"upstream_retention[{up2}]_mean"] == pytest.approx(0.75)
    assert b["upstream_retention_mean"] == pytest.approx(0.75)  # over the suites the teacher succeeds on
    assert b["vqa_mc_retention[gripper]_mean"] == pytest.approx(0.75)
    assert b["vqa_mc_retention[gripper]_ci95"] == pytest.approx(
        float(__import__("scipy").stats.t.ppf(0.975, 1)) * np.std([0.5, 1.0], ddof=1) / math.sqrt(2)
    )
    assert b["vqa_mc_retention[drawer]_mean"] is tables.UNDEFINED
    md = tables.to_markdown(rows, "main")
    assert "retention undefined" in md and "nan" not in md.lower()
    assert "VQA-MC retention drawer" in md and f"upstream retention {UP}" in md
    csv_text = tables.to_csv(rows)
    out = tmp_path / "t.csv"
    out.write_text(csv_text)
    back = tables.read_table(out)
    assert list(csv.DictReader(out.open()))[1][f"upstream_retention[{UP}]_mean"] == "undefined"
    assert math.isnan(back[1]["vqa_mc_retention[drawer]_mean"])
    only_zero = tables.build_table(tables.load_evals(files), "main", [UP])
    assert only_zero[1]["upstream_retention_mean"] is tables.UNDEFINED
    written = figures.category_retention(files, [UP, up2], tmp_path / "f") + figures.pareto(
        files, [UP], tmp_path / "f"
    )
    assert all(p.stat().st_size > 1000 for p in written)


def test_success_per_task_columns_and_markdown_section(tmp_path):
    """Each eval JSON's per_task success becomes `task_success[task]` (mean ± CI over seeds, CSV);
    the Markdown shows them in a table of their own, where the teacher's row on its pretraining
    tasks is its instruction-following (issue 19)."""
    files = write_evals(
        tmp_path,
        {
            "teacher": {UP: 0.75, "vqa": 0.5, "drift": 0.0, "cka": 1.0},
            f"{SUITE}__baseline__full__s42": {UP: 0.25, "vqa": 0.5, "drift": 0.1, "cka": 0.9},
            f"{SUITE}__baseline__full__s123": {UP: 0.5, "vqa": 0.5, "drift": 0.1, "cka": 0.9},
        },
    )
    per_task = {
        "teacher": (1.0, 0.5),
        f"{SUITE}__baseline__full__s42": (0.5, 0.0),
        f"{SUITE}__baseline__full__s123": (0.75, 0.25),
    }
    for f in files:
        p = Path(f)
        if p.name == f"{UP}.json":
            d = json.loads(p.read_text())
            a, b = per_task[d["run"]]
            d["per_task"] = {"open-v3": {"success_rate": a, "n": 4}, "close-v3": {"success_rate": b, "n": 4}}
            p.write_text(json.dumps(d))
    rows = tables.build_table(tables.load_evals(files), "main", [UP])
    teacher, base = rows[0], rows[1]
    assert teacher["task_success[open-v3]_mean"] == 1.0 and teacher["task_success[close-v3]_mean"] == 0.5
    assert base["n_seeds"] == 2 and base["task_success[open-v3]_mean"] == pytest.approx(0.625)
    assert base["task_success[close-v3]_n"] == 2 and base["task_success[close-v3]_ci95"] > 0
    csv_head = tables.to_csv(rows).splitlines()[0].split(",")
    assert "task_success[open-v3]_mean" in csv_head and "task_success_mean" not in csv_head
    md = tables.to_markdown(rows, "main")
    main_part, per_task_part = md.split("## Closed-loop success per task")
    assert "open-v3" not in main_part  # the main table keeps its columns
    assert "| method | suite | seeds | close-v3 | open-v3 |" in per_task_part
    assert "| teacher | " in per_task_part and "0.625 ± " in per_task_part


def test_downstream_scene_vqa_is_its_own_column(tmp_path):
    """Issue 27.4: questions on the downstream scenes (forgetting.json vqa_mc_downstream) get their own
    accuracy / retention columns, per category too; the upstream-scene VQA-MC columns are unchanged."""
    runs = {
        "teacher": ({"scene": 1.0}, {"window_open": 0.8, "scene": 1.0}),
        f"{SUITE}__baseline__full__s1": ({"scene": 1.0}, {"window_open": 0.4, "scene": 1.0}),
        f"{SUITE}__baseline__full__s2": ({"scene": 1.0}, {"window_open": 0.6, "scene": 0.9}),
    }
    files = []
    for run, (up, down) in runs.items():
        d = tmp_path / "evals" / run
        d.mkdir(parents=True)
        for s in (SUITE, UP):
            (d / f"{s}.json").write_text(json.dumps({"run": run, "suite": s, "success_rate": 0.5}))
            files.append(str(d / f"{s}.json"))
        f = {"run": run, "vqa_mc": _mc(up), "vqa_mc_downstream": _mc(down)}
        (d / "forgetting.json").write_text(json.dumps(f))
        files.append(str(d / "forgetting.json"))
    rows = tables.build_table(tables.load_evals(files), "main", [UP])
    b = rows[1]
    assert b["vqa_mc_retention_mean"] == pytest.approx(1.0)
    assert b["vqa_mc_downstream_retention[window_open]_mean"] == pytest.approx(0.625)
    assert b["vqa_mc_downstream_retention_mean"] == pytest.approx(np.mean([0.7 / 0.9, 0.75 / 0.9]))
    md = tables.to_markdown(rows, "main")
    assert "VQA-MC retention (downstream scenes)" in md


def _eval_with_frames(path: Path, run: str, digests: list[str | None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    eps = [
        {"task": "t", "seed": 500 + i, "success": bool(i % 2), "first_digest": d}
        for i, d in enumerate(digests)
    ]
    path.write_text(json.dumps({"run": run, "suite": "up", "success_rate": 0.5, "episodes": eps}))
    return path


def test_evaluations_rendered_differently_are_refused(tmp_path):
    """Issue 27: a GPU driver's renderer and Mesa's draw other first frames of the same initial
    state; a table pairing such evaluations compared renderers. load_evals names both files."""
    a = _eval_with_frames(tmp_path / "a" / "up.json", "mw_downstream__baseline__full__s42", ["aa", "bb"])
    same = _eval_with_frames(tmp_path / "b" / "up.json", "mw_downstream__craft__full__s42", ["aa", "bb"])
    old = _eval_with_frames(tmp_path / "c" / "up.json", "mw_downstream__icsm__full__s42", [None, None])
    assert set(tables.load_evals([a, same, old])) == {
        "mw_downstream__baseline__full__s42",
        "mw_downstream__craft__full__s42",
        "mw_downstream__icsm__full__s42",
    }
    other = _eval_with_frames(tmp_path / "d" / "up.json", "mw_downstream__craft__full__s42", ["aa", "cc"])
    with pytest.raises(tables.RenderMismatch) as e:
        tables.load_evals([a, other])
    msg = str(e.value)
    assert str(a) in msg and str(other) in msg and "initial state 501" in msg and "renderer" in msg
