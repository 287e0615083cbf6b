"""Issue 27 items 3 and 5: the paper tables' statistics (report/stats.py) against known values, and the
compact paper table (report/paper.py, `vlaforget table`) on synthetic per-episode eval JSONs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from vlaforget.report import paper, stats
from vlaforget.report.tables import load_evals

# ----------------------------------------------------------------------------- formulas


def test_wilson_ci_known_values():
    # Wilson score interval, closed form: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    lo, hi = stats.binomial_ci(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = stats.binomial_ci(0, 20)  # Wilson: lower bound 0, upper z²/(n+z²) = 3.8415/23.8415
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.16113, abs=1e-4)
    z = 1.959963984540054
    k, n = 37, 60
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert stats.binomial_ci(k, n) == pytest.approx((c - h, c + h), abs=1e-12)
    assert all(math.isnan(x) for x in stats.binomial_ci(0, 0))


def test_holm_hand_example():
    # p = (0.01, 0.04, 0.03, 0.005), m = 4: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 =
    # 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = stats.holm([0.01, float("nan"), 0.02])  # NaN: not a test, not counted in m
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(3).uniform(0, 0.2, size=12)
    assert stats.holm(p) == pytest.approx(list(multitest.multipletests(p, method="holm")[1]))


def test_mcnemar_exact_constructed_table():
    # 2x2 of pairs: both 10, a only 7, b only 1, neither 2 -> p = 2 * P(X <= 1 | n=8, 1/2) = 2 * 9/256
    a = [1] * 10 + [1] * 7 + [0] * 1 + [0] * 2
    b = [1] * 10 + [0] * 7 + [1] * 1 + [0] * 2
    r = stats.mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"], r["n_pairs"]) == (7, 1, 20)
    assert r["p"] == pytest.approx(18 / 256)
    assert stats.mcnemar_exact([1, 0], [1, 0])["p"] == 1.0  # no discordant pair
    with pytest.raises(ValueError):
        stats.mcnemar_exact([1, 0], [1])


def test_paired_bootstrap_covers_true_difference():
    rng = np.random.default_rng(0)
    true = 0.1
    covered, n_trials = 0, 60
    for _ in range(n_trials):
        seed_effect = rng.normal(0.5, 0.2, size=10)  # shared per seed: pairing removes it
        x = seed_effect + true + rng.normal(0, 0.05, size=10)
        y = seed_effect + rng.normal(0, 0.05, size=10)
        r = stats.paired_bootstrap(x, y, n_resamples=2000)
        assert r["low"] <= r["diff"] <= r["high"]
        covered += r["low"] <= true <= r["high"]
    assert covered >= 0.85 * n_trials  # nominal 95 %; the percentile CI undercovers a little at n = 10
    # an unpaired CI on the same data would be ~4x wider: the pairing is used
    r = stats.paired_bootstrap(x, y)
    assert r["high"] - r["low"] < 0.1


def test_paired_bootstrap_small_n():
    one = stats.paired_bootstrap([0.5], [0.4])
    assert one["diff"] == pytest.approx(0.1) and math.isnan(one["low"]) and math.isnan(one["high"])
    same = stats.paired_bootstrap([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])  # all differences 0.1
    assert same["low"] == pytest.approx(0.1) and same["high"] == pytest.approx(0.1)
    two = stats.paired_bootstrap([0.5, 0.9], [0.4, 0.5])
    assert two["low"] == pytest.approx(0.1) and two["high"] == pytest.approx(0.4)
    assert stats.paired_bootstrap([0.5, 0.9, 0.1], [0.4, 0.5, 0.3]) == stats.paired_bootstrap(
        [0.5, 0.9, 0.1], [0.4, 0.5, 0.3]
    )  # seeded: the same bytes on a rerun


def test_pareto_front():
    pts = [(0.6, 0.5), (0.5, 0.7), (0.55, 0.55), (0.5, 0.5), (float("nan"), 1.0)]
    assert stats.pareto_front(pts) == [True, True, True, False, False]


# ----------------------------------------------------------------------------- the paper table


TASKS = ("t-a", "t-b")


def _episodes(outcomes: list[int], suite: str) -> list[dict]:
    half = len(outcomes) // 2
    return [
        {
            "task": TASKS[i >= half],
            "seed": 500000 + i % half,
            "index": i,
            "success": bool(o),
            "suite": suite,
            "error": None,
        }
        for i, o in enumerate(outcomes)
    ]


def write_run(root, run: str, down: list[int] | None, up: list[int], vqa: float = 0.9, drift: float = 0.2):
    d = root / run
    d.mkdir(parents=True)
    files = []
    for suite, outs in (("down", down), ("up", up)):
        if outs is None:
            continue
        p = d / f"{suite}.json"
        p.write_text(
            json.dumps(
                {
                    "run": run,
                    "suite": suite,
                    "success_rate": float(np.mean(outs)),
                    "n_episodes": len(outs),
                    "per_task": {},
                    "episodes": _episodes(outs, suite),
                }
            )
        )
        files.append(str(p))
    p = d / "forgetting.json"
    p.write_text(json.dumps({"run": run, "vqa_accuracy": vqa, "drift_mean": drift}))
    return files + [str(p)]


@pytest.fixture
def study(tmp_path):
    """Teacher 16/20 upstream; baseline forgets (6/20 upstream per seed), `good` keeps 14/20 on the
    same initial states: a large paired effect; `same` equals the baseline episode by episode."""
    rng = np.random.default_rng(1)
    files = write_run(tmp_path, "teacher", [0] * 10 + [1] * 10, [1] * 16 + [0] * 4)
    for seed in (1, 2, 3):
        down = list(rng.integers(0, 2, size=20))
        base_up = [1] * 6 + [0] * 14
        files += write_run(tmp_path, f"down__baseline__full__s{seed}", down, base_up, drift=0.3)
        files += write_run(tmp_path, f"down__good__full__s{seed}", down, [1] * (14 - seed) + [0] * (6 + seed))
        files += write_run(tmp_path, f"down__same__full__s{seed}", down, base_up, drift=0.3)
    return files


def test_paper_table_statistics(study):
    p = paper.build_paper(load_evals(study), "main", ["down", "up"])
    rows = {r["method"]: r for r in p["rows"]}
    assert p["rows"][0]["method"] == "teacher"
    good = rows["good"]
    # pooled over 3 seeds x 20 upstream episodes: (13 + 12 + 11) / 60, / teacher 16/20
    assert good["upstream_retention"]["k"] == 36 and good["upstream_retention"]["n"] == 60
    assert good["upstream_retention"]["value"] == pytest.approx(36 / 60 / 0.8)
    lo, hi = stats.binomial_ci(36, 60)
    assert good["upstream_retention"]["low"] == pytest.approx(lo / 0.8)
    assert good["upstream_retention"]["high"] == pytest.approx(hi / 0.8)
    c = good["comparison"]
    assert c["reference"] == "baseline" and c["n_seeds"] == 3
    assert c["upstream_diff"] == pytest.approx(np.mean([13, 12, 11]) / 20 / 0.8 - 6 / 20 / 0.8)
    assert (c["upstream_method_only"], c["upstream_reference_only"]) == (36 - 18, 0)
    assert c["upstream_p"] == pytest.approx(stats.mcnemar_exact([1] * 18, [0] * 18)["p"])
    assert c["downstream_method_only"] == c["downstream_reference_only"] == 0  # the same downstream episodes
    same = rows["same"]["comparison"]
    assert same["upstream_p"] == 1.0 and same["upstream_diff"] == 0.0
    # Holm over 4 tests (2 comparisons x 2 endpoints)
    assert p["n_tests"] == 4
    assert c["upstream_p_holm"] == pytest.approx(min(1.0, 4 * c["upstream_p"]))
    md = paper.to_paper_markdown(p)
    assert "Holm–Bonferroni over all 4 tests" in md
    good_line = next(line for line in md.splitlines() if line.startswith("| good"))
    assert good_line.count("*") == 1  # upstream significant, downstream not
    assert "| same" in md and "same†" not in md  # dominated by good (equal downstream, lower retention)
    assert len(md.splitlines()[4].split("|")) - 2 <= 8  # at most eight columns


def test_paper_table_one_seed_says_na(tmp_path):
    files = write_run(tmp_path, "teacher", [0, 1], [1, 1])
    files += write_run(tmp_path, "down__baseline__full__s1", [1, 1], [1, 0])
    files += write_run(tmp_path, "down__m__full__s1", [1, 0], [1, 1])
    md = paper.to_paper_markdown(paper.build_paper(load_evals(files), "main", ["down", "up"]))
    line = next(
        line for line in md.splitlines() if line.startswith("| m") and not line.startswith("| method")
    )
    assert "± n/a" in line and "[n/a]" in line


def test_caption_says_whether_general_skill_is_forgotten(tmp_path, study):
    """Issue 27.4: a table whose VQA retention never falls below 1 beyond its CI says "not forgotten
    at this budget"; one where a method's does names that method; one seed decides nothing."""
    md = paper.to_paper_markdown(paper.build_paper(load_evals(study), "main", ["down", "up"]))
    assert "General skill is not forgotten at this budget" in md  # every run keeps the teacher's 0.9
    files = write_run(tmp_path / "b", "teacher", [0, 1], [1, 1], vqa=0.9)
    for s, v in ((1, 0.60), (2, 0.62), (3, 0.58)):
        files += write_run(tmp_path / "b", f"down__baseline__full__s{s}", [1, 0], [1, 0], vqa=v)
        files += write_run(
            tmp_path / "b", f"down__keep__full__s{s}", [1, 0], [1, 0], vqa=0.9 + 0.01 * (s - 2)
        )
    note = paper.general_skill_note(paper.build_paper(load_evals(files), "main", ["down", "up"]))
    assert note.startswith("General skill is forgotten") and "baseline" in note and "keep" not in note
    assert "lowest mean VQA retention is 0.667" in note  # (0.60 + 0.62 + 0.58) / 3 / 0.9
    one = write_run(tmp_path / "c", "teacher", [0, 1], [1, 1]) + write_run(
        tmp_path / "c", "down__baseline__full__s1", [1, 0], [1, 0], vqa=0.1
    )
    assert "not decided" in paper.general_skill_note(
        paper.build_paper(load_evals(one), "main", ["down", "up"])
    )


def test_ablation_reference_is_the_base_method(tmp_path):
    files = write_run(tmp_path, "teacher", [0, 1], [1, 1])
    for m in ("full", "no_x", "craft", "craft_no_y"):
        for s in (1, 2):
            files += write_run(tmp_path, f"down__{m}__full__s{s}", [1, 0], [1, s - 1])
    p = paper.build_paper(
        load_evals(files), "ablation", ["down", "up"], {"no_x": "full", "craft_no_y": "craft"}
    )
    refs = {r["method"]: r.get("reference") for r in p["rows"]}
    assert refs == {"teacher": None, "full": "", "no_x": "full", "craft": "", "craft_no_y": "craft"}
    assert "(vs full)" in paper.to_paper_markdown(p)


def test_latex_is_booktabs(study):
    tex = paper.to_latex(paper.build_paper(load_evals(study), "main", ["down", "up"]))
    lines = tex.splitlines()
    for cmd in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert lines.count(cmd) == 1
    assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
    body = lines[lines.index(r"\toprule") + 1 : lines.index(r"\bottomrule")]
    for line in body:
        if line == r"\midrule":
            continue
        assert line.endswith(r" \\")
        assert len(re.split(r"(?<!\\)&", line)) == len(spec), line  # one cell per column
        assert line.count("$") % 2 == 0, line  # math mode closed
    assert "_" not in tex.replace(r"\_", "")  # every underscore escaped
    assert tex.count("{") == tex.count("}")


def test_cli_writes_paper_files(study, tmp_path):
    out = tmp_path / "res" / "table_main.csv"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlaforget.cli",
            "table",
            "--kind",
            "main",
            "--upstream-suites",
            "down",
            "up",
            "--inputs",
            *study,
            "--out",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    for name in (
        "table_main.csv",
        "table_main.md",
        "table_main_paper.md",
        "table_main.tex",
        "table_main_stats.csv",
    ):
        assert (out.parent / name).exists(), name
    st = (out.parent / "table_main_stats.csv").read_text().splitlines()
    assert st[0].startswith("table,method,suite,shots,reference") and len(st) == 3
