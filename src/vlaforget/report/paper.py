"""Compact paper tables (`table_{kind}_paper.md`, `table_{kind}.tex`) and their comparisons
(`table_{kind}_stats.csv`), from the same eval JSONs as the wide data table (report/tables.py).

One row per method x suite (x shots), at most eight columns: downstream success and upstream retention
(pooled over every episode of every seed, Wilson 95 % CI), general-skill retention (VQA accuracy run /
teacher) and representation drift (mean ± 95 % t-CI over seeds), and the paired per-seed difference in
upstream retention against the row's reference (percentile bootstrap 95 % CI over seeds). The reference
is plain LoRA (`baseline`) in the main and few-shot tables, and in the ablation table each ablation's
base method (the full method is the reference row). Significance marks: exact McNemar tests on the
episodes of shared initial states (every run of a seed is evaluated on the same initial states; pairs
are made within a seed, so eval.initial_states per_seed pairs on each seed's own block),
Holm–Bonferroni over every comparison of the table. Methods on the Pareto front of (downstream success,
upstream retention) within their suite / shots are marked too: the comparison at matched downstream
success the data allow (the embedded study has no periodic closed-loop evaluation during training).
docs/evaluation.md "Statistics" gives the reasons.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict

import numpy as np

from ..study import parse_run_name
from .stats import LEVEL, binomial_ci, holm, mcnemar_exact, paired_bootstrap, pareto_front
from .tables import UNDEFINED, run_metrics, summarize, teacher_of

ALPHA = 0.05
SIG, FRONT = "*", "†"
ENDPOINTS = ("downstream", "upstream")  # the two McNemar tests of each comparison


def _pooled(evs: list[dict], suites: list[str]) -> tuple[int, int]:
    """Successes and episodes of these runs on these suites."""
    k = n = 0
    for ev in evs:
        for s in suites:
            eps = (ev.get("episodes") or {}).get(s) or {}
            k += sum(eps.values())
            n += len(eps)
    return k, n


def _pairs(
    evs_a: dict[int, dict], evs_b: dict[int, dict], suites: list[str]
) -> tuple[list[bool], list[bool]]:
    """Outcomes of a and b on the same (seed, suite, task, initial state), seeds both have."""
    a, b = [], []
    for seed in sorted(set(evs_a) & set(evs_b)):
        for s in suites:
            ea = (evs_a[seed].get("episodes") or {}).get(s) or {}
            eb = (evs_b[seed].get("episodes") or {}).get(s) or {}
            for key in sorted(set(ea) & set(eb), key=str):
                a.append(ea[key])
                b.append(eb[key])
    return a, b


def _reference(method: str, kind: str, bases: dict[str, str], present: set[str]) -> str | None:
    if kind == "ablation":
        ref = bases.get(method)
    else:
        ref = "baseline" if method != "baseline" else None
    return ref if ref in present else None


def build_paper(
    evals: dict[str, dict], kind: str, upstream: list[str], bases: dict[str, str] | None = None
) -> dict:
    """{"rows": [...], "comparisons": [...], "n_tests": m}. bases: ablation -> the method it ablates."""
    bases = bases or {}
    teacher = evals.get("teacher")
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for run, ev in evals.items():
        if run == "teacher":
            continue
        r = parse_run_name(run)
        groups[(r["method"], r["suite"], r["shots"])][r["seed"]] = ev
    suites = list(dict.fromkeys(k[1] for k in groups))
    rows = []
    if teacher is not None:
        for suite in suites or [None]:
            rows.append(_row("teacher", suite, "-", {0: teacher}, teacher, upstream))
    for (method, suite, shots), by_seed in groups.items():
        rows.append(_row(method, suite, shots, by_seed, teacher, upstream))
    comps = []
    present_by = defaultdict(set)
    for method, suite, shots in groups:
        present_by[(suite, shots)].add(method)
    for row in rows:
        if row["method"] == "teacher":
            continue
        key = (row["suite"], row["shots"])
        ref = _reference(row["method"], kind, bases, present_by[key])
        row["reference"] = ref or ""
        if ref is None:
            continue
        comps.append(
            _compare(row, groups[(row["method"],) + key], groups[(ref,) + key], ref, teacher, upstream)
        )
    pvals = [c[f"{e}_p"] for c in comps for e in ENDPOINTS]
    adj = holm(pvals)
    for i, c in enumerate(comps):
        for j, e in enumerate(ENDPOINTS):
            c[f"{e}_p_holm"] = adj[i * len(ENDPOINTS) + j]
    by_row = {(c["method"], c["suite"], c["shots"]): c for c in comps}
    for row in rows:
        row["comparison"] = by_row.get((row["method"], row["suite"], row["shots"]))
    for key in present_by:
        members = [r for r in rows if r["method"] != "teacher" and (r["suite"], r["shots"]) == key]
        pts = [(r["downstream"]["rate"], _finite(r["upstream_retention"]["value"])) for r in members]
        for r, on in zip(members, pareto_front(pts)):
            r["pareto"] = on
    return {
        "kind": kind,
        "rows": rows,
        "comparisons": comps,
        "n_tests": sum(not math.isnan(p) for p in pvals),
    }


def _finite(x) -> float:
    return float("nan") if x is None or x is UNDEFINED else float(x)


def _row(method, suite, shots, by_seed: dict[int, dict], teacher, upstream) -> dict:
    evs = [by_seed[s] for s in sorted(by_seed)]
    ups = [s for s in upstream if s != suite]
    k, n = _pooled(evs, [suite] if suite else [])
    lo, hi = binomial_ci(k, n)
    dn = {"k": k, "n": n, "rate": k / n if n else float("nan"), "low": lo, "high": hi}
    uk, un = _pooled(evs, ups)
    ret = {"k": uk, "n": un, "value": None, "low": float("nan"), "high": float("nan")}
    # the teacher on these seeds' initial states (per_seed: their blocks, pooled; the teacher's own
    # row: every block); per seed, each seed's own
    seed_teacher = {s: teacher if method == "teacher" else teacher_of(teacher, s) for s in by_seed}
    if method != "teacher":
        teacher = teacher_of(teacher, sorted(by_seed))
    if teacher is not None and un:
        live = [s for s in ups if teacher["suites"].get(s)]
        tk, tn = _pooled([teacher], ups)
        if tn and not live:
            ret["value"] = UNDEFINED
        elif tn:
            # pooled over the suites the teacher succeeds on (as the wide table's upstream_retention)
            uk, un = _pooled(evs, live)
            tk, tn = _pooled([teacher], live)
            t_rate = tk / tn
            lo, hi = binomial_ci(uk, un)
            ret.update(
                k=uk, n=un, value=uk / un / t_rate, low=lo / t_rate, high=hi / t_rate, teacher_rate=t_rate
            )
    per_seed = [run_metrics(by_seed[s], suite, upstream, seed_teacher[s]) for s in sorted(by_seed)]
    return {
        "method": method,
        "suite": suite or "-",
        "shots": shots,
        "n_seeds": len(evs) if method != "teacher" else 1,
        "downstream": dn,
        "upstream_retention": ret,
        "vqa_retention": summarize([m.get("vqa_retention") for m in per_seed]),
        "drift": summarize([m.get("drift") for m in per_seed]),
        "pareto": False,
    }


def _compare(row, runs: dict[int, dict], ref_runs: dict[int, dict], ref: str, teacher, upstream) -> dict:
    suite = row["suite"]
    ups = [s for s in upstream if s != suite]
    seeds = sorted(set(runs) & set(ref_runs))

    def per_seed(col, rs):
        return [_finite(run_metrics(rs[s], suite, upstream, teacher_of(teacher, s)).get(col)) for s in seeds]

    c = {
        "method": row["method"],
        "suite": suite,
        "shots": row["shots"],
        "reference": ref,
        "n_seeds": len(seeds),
    }
    for e, col, suites in (
        ("downstream", "downstream_success", [suite]),
        ("upstream", "upstream_retention", ups),
    ):
        x, y = np.array(per_seed(col, runs)), np.array(per_seed(col, ref_runs))
        ok = ~(np.isnan(x) | np.isnan(y))
        bs = paired_bootstrap(x[ok], y[ok])
        mc = mcnemar_exact(*_pairs(runs, ref_runs, suites))
        c.update(
            {
                f"{e}_diff": bs["diff"],
                f"{e}_diff_low": bs["low"],
                f"{e}_diff_high": bs["high"],
                f"{e}_method_only": mc["a_only"],
                f"{e}_reference_only": mc["b_only"],
                f"{e}_pairs": mc["n_pairs"],
                f"{e}_p": mc["p"] if mc["n_pairs"] else float("nan"),
            }
        )
    return c


# ----------------------------------------------------------------------------- rendering


def _f(x, d=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _interval(v, lo, hi, tex: bool) -> str:
    if v is UNDEFINED:
        return "undefined"
    if v is None or math.isnan(v):
        return "–" if not tex else "--"
    return f"{v:.3f} [{_f(lo, 2)}, {_f(hi, 2)}]"


def _pm(s: dict, tex: bool, one_eval: bool = False) -> str:
    """mean ± t-CI; "± n/a" for a single seed (no CI from one value), the mean alone for the teacher."""
    if s.get("undefined") and not s["n"]:
        return "undefined"
    if not s["n"]:
        return "–" if not tex else "--"
    pm = r"$\pm$" if tex else "±"
    if math.isnan(s["ci95"]):
        return f"{s['mean']:.3f}" + ("" if one_eval else f" {pm} n/a")
    return f"{s['mean']:.3f} {pm} {s['ci95']:.3f}"


def _diff(c: dict | None, tex: bool) -> str:
    if not c or math.isnan(c["upstream_diff"]):
        return "–" if not tex else "--"
    minus = "$-$" if tex else "−"

    def sign(x):
        return ("+" if x >= 0 else minus) + f"{abs(x):.3f}"

    lo, hi = c["upstream_diff_low"], c["upstream_diff_high"]
    ci = "[n/a]" if math.isnan(lo) else f"[{sign(lo)}, {sign(hi)}]"
    return f"{sign(c['upstream_diff'])} {ci}"


def _mark(c: dict | None, endpoint: str, tex: bool) -> str:
    if not c or not (c.get(f"{endpoint}_p_holm", 1.0) <= ALPHA):
        return ""
    return r"$^{*}$" if tex else SIG


def _layout(paper: dict) -> tuple[list[str], bool, bool]:
    rows = paper["rows"]
    show_suite = len({r["suite"] for r in rows}) > 1
    show_shots = paper["kind"] == "fewshot" or len({r["shots"] for r in rows if r["method"] != "teacher"}) > 1
    head = (
        ["method"]
        + (["suite"] if show_suite else [])
        + (["shots"] if show_shots else [])
        + [
            "seeds",
            "downstream success",
            "upstream retention",
            "VQA retention",
            "drift",
            "Δ upstream retention vs reference",
        ]
    )
    return head, show_suite, show_shots


def _cells(r: dict, show_suite: bool, show_shots: bool, tex: bool) -> list[str]:
    c = r.get("comparison")
    name = r["method"] + ((r"$^{\dagger}$" if tex else FRONT) if r.get("pareto") else "")
    if tex:
        name = name.replace("_", r"\_")
    ref = (
        f" (vs {r['reference']})"
        if r.get("reference") and r.get("reference") != "baseline" and not tex
        else ""
    )
    dn, up = r["downstream"], r["upstream_retention"]
    cells = [name + ref] + ([r["suite"].replace("_", r"\_") if tex else r["suite"]] if show_suite else [])
    cells += [r["shots"]] if show_shots else []
    cells += [
        str(r["n_seeds"]),
        _interval(dn["rate"], dn["low"], dn["high"], tex) + _mark(c, "downstream", tex),
        _interval(up["value"], up["low"], up["high"], tex) + _mark(c, "upstream", tex),
        _pm(r["vqa_retention"], tex, r["method"] == "teacher"),
        _pm(r["drift"], tex, r["method"] == "teacher"),
        _diff(c, tex),
    ]
    return cells


def general_skill_note(paper: dict) -> str:
    """One sentence on whether general skill was forgotten, read off the rows' VQA retention: a row
    has forgotten when its 95 % t-CI over seeds lies wholly below 1. When no row has, the table says
    "not forgotten at this budget" (issue 27 item 4), which a reader would otherwise have to infer
    from a column of 0.99s; where it does happen is a question of budget (docs/evaluation.md
    "General skill at this budget")."""
    rows = [r for r in paper["rows"] if r["method"] != "teacher" and r["vqa_retention"].get("n")]
    if not rows:
        return ""
    below = [r for r in rows if _upper(r["vqa_retention"]) < 1.0]
    unsure = [r for r in rows if math.isnan(_upper(r["vqa_retention"]))]
    if below:
        names = ", ".join(
            dict.fromkeys(
                r["method"] + (f" {r['shots']}" if r["shots"] not in ("full", "-") else "") for r in below
            )
        )
        low = min(r["vqa_retention"]["mean"] for r in below)
        # the size says whether it matters: with ten seeds a 0.3 % loss is already outside the CI
        return (
            f"General skill is forgotten (VQA retention's CI below 1) by: {names}; "
            f"the lowest mean VQA retention is {low:.3f}. "
        )
    if unsure:
        return "VQA retention: one seed per row, no CI, so forgetting of general skill is not decided. "
    return (
        "General skill is not forgotten at this budget: no row's VQA retention CI lies below 1 "
        '(where it is: docs/evaluation.md "General skill at this budget"). '
    )


def _upper(s: dict) -> float:
    if not s.get("n") or math.isnan(s.get("ci95", float("nan"))):
        return float("nan")
    return s["mean"] + s["ci95"]


def caption(paper: dict) -> str:
    seeds = sorted({r["n_seeds"] for r in paper["rows"] if r["method"] != "teacher"})
    ref = (
        "each ablation against the method it ablates (the full method is the reference row)"
        if paper["kind"] == "ablation"
        else "each method against plain LoRA (baseline)"
    )
    return (
        f"Table {paper['kind']}: {'/'.join(map(str, seeds)) or 'no'} seed(s) per row. Downstream success "
        f"and upstream retention (run / teacher upstream success) pooled over all episodes of all seeds, "
        f"Wilson {LEVEL:.0%} CI; VQA retention (run / teacher VQA accuracy) and drift (normalised covariance "
        f"drift vs the teacher) mean ± {LEVEL:.0%} t-CI over seeds (n/a: one seed). "
        f"Δ upstream retention: mean paired per-seed difference, {ref}, percentile bootstrap {LEVEL:.0%} CI "
        f"(n/a below two seeds). {SIG}: exact McNemar test on the episodes of shared initial states, "
        f"p ≤ {ALPHA} after Holm–Bonferroni over all {paper['n_tests']} tests of this table "
        f"(downstream and upstream per comparison). {FRONT}: on the Pareto front of (downstream success, "
        f"upstream retention) within its suite / shots. Teacher: the base model, one evaluation. "
        + general_skill_note(paper)
        + f'p values: table_{paper["kind"]}_stats.csv; definitions: docs/evaluation.md "Statistics".'
    )


def to_paper_markdown(paper: dict) -> str:
    head, ss, sh = _layout(paper)
    lines = [
        f"# Table: {paper['kind']} (paper)",
        "",
        caption(paper),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in paper["rows"]:
        lines.append("| " + " | ".join(_cells(r, ss, sh, tex=False)) + " |")
    return "\n".join(lines) + "\n"


def _tex_escape(s: str) -> str:
    return (
        s.replace("\\", r"\textbackslash{}")
        .replace("_", r"\_")
        .replace("%", r"\%")
        .replace("&", r"\&")
        .replace("#", r"\#")
        .replace("Δ", r"$\Delta$")
        .replace("±", r"$\pm$")
        .replace("–", "--")
        .replace("≤", r"$\le$")
        .replace("†", r"$^{\dagger}$")
        .replace("−", "$-$")
    )


def to_latex(paper: dict) -> str:
    """A booktabs table (\\toprule / \\midrule / \\bottomrule), one line per row."""
    head, ss, sh = _layout(paper)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\caption{" + _tex_escape(caption(paper)) + "}",
        rf"\label{{tab:{paper['kind']}}}",
        r"\begin{tabular}{l" + "l" * (len(head) - 1) + "}",
        r"\toprule",
        " & ".join(_tex_escape(h) for h in head) + r" \\",
        r"\midrule",
    ]
    for r in paper["rows"]:
        lines.append(" & ".join(_cells(r, ss, sh, tex=True)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


STATS_COLUMNS = ["table", "method", "suite", "shots", "reference", "n_seeds"] + [
    f"{e}_{k}"
    for e in ENDPOINTS
    for k in ("diff", "diff_low", "diff_high", "method_only", "reference_only", "pairs", "p", "p_holm")
]


def to_stats_csv(paper: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=STATS_COLUMNS, lineterminator="\n")
    w.writeheader()
    for c in paper["comparisons"]:
        w.writerow(
            {
                k: (
                    f"{v:.6g}"
                    if isinstance(v, float) and not math.isnan(v)
                    else ""
                    if isinstance(v, float)
                    else v
                )
                for k, v in ({"table": paper["kind"]} | c).items()
                if k in STATS_COLUMNS
            }
        )
    return buf.getvalue()
