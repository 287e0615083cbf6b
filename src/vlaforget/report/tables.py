"""Paper tables (`vlaforget table --kind main|fewshot|ablation --inputs EVAL_JSONS... --out X.csv`).

One row per method x suite (x shots): mean, standard deviation, 95 % t confidence interval and n over
seeds of downstream success, upstream success, visual-question accuracy, retention ratios against the
teacher (its own row, first), representation drift and CKA. A Markdown copy (`mean ± ci95`) sits
beside the CSV.

Inputs are the eval stages' JSON files, `{root}/evals/{run}/{suite}.json` (closed loop: run, suite,
success_rate, n_episodes, per_task) and `{root}/evals/{run}/forgetting.json` (run, vqa_accuracy,
vqa_kl, drift_mean, cka_mean, ...).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..config import parse_run_name
from ..io import atomic_write_text, read_json

# (column, label in the Markdown table). Retention = run / teacher, per seed, then aggregated.
METRICS = [
    ("downstream_success", "downstream success"),
    ("upstream_success", "upstream success"),
    ("upstream_retention", "upstream retention"),
    ("vqa_accuracy", "VQA acc."),
    ("vqa_retention", "VQA retention"),
    ("vqa_kl", "VQA KL"),
    ("drift", "drift"),
    ("cka", "CKA"),
]

# Two-sided 95 % Student-t quantiles t_{0.975, df}; beyond 30 the normal 1.96 is close enough.
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t975(df: int) -> float:
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def summarize(values) -> dict:
    """mean, sample std, 95 % t-CI half-width and n of the finite values."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": float("nan"), "n": 0}
    mean = float(v.mean())
    if n == 1:
        return {"mean": mean, "std": float("nan"), "ci95": float("nan"), "n": 1}
    std = float(v.std(ddof=1))
    return {"mean": mean, "std": std, "ci95": t975(n - 1) * std / math.sqrt(n), "n": n}


def _num(x):
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def load_evals(paths) -> dict[str, dict]:
    """{run: {"suites": {suite: success_rate}, "forgetting": {...}}} from eval JSON files.

    The run and suite come from the JSON (`run`, `suite`), else from the path evals/{run}/{suite}.json.
    """
    runs: dict[str, dict] = defaultdict(lambda: {"suites": {}, "forgetting": None})
    for p in paths:
        p = Path(p)
        d = read_json(p)
        run = d.get("run") or d.get("run_name") or p.parent.name
        if p.name == "forgetting.json":
            runs[run]["forgetting"] = d
        else:
            suite = d.get("suite") or p.stem
            if "success_rate" not in d:
                raise ValueError(f"{p}: closed-loop eval JSON without 'success_rate' (re-run the eval rule)")
            runs[run]["suites"][suite] = _num(d["success_rate"])
    return dict(runs)


def run_metrics(ev: dict, suite: str | None, upstream: list[str], teacher: dict | None) -> dict:
    """Per-run metric values (None where not measured)."""
    up = [ev["suites"].get(s) for s in upstream if s != suite and ev["suites"].get(s) is not None]
    f = ev.get("forgetting") or {}
    out = {
        "downstream_success": ev["suites"].get(suite) if suite else None,
        "upstream_success": float(np.mean(up)) if up else None,
        "vqa_accuracy": _num(f.get("vqa_accuracy")),
        "vqa_kl": _num(f.get("vqa_kl")),
        "drift": _num(f.get("drift_mean")),
        "cka": _num(f.get("cka_mean")),
    }
    if teacher is not None:
        t_up = [
            teacher["suites"].get(s) for s in upstream if s != suite and teacher["suites"].get(s) is not None
        ]
        out["upstream_retention"] = _ratio(out["upstream_success"], float(np.mean(t_up)) if t_up else None)
        out["vqa_retention"] = _ratio(
            out["vqa_accuracy"], _num((teacher.get("forgetting") or {}).get("vqa_accuracy"))
        )
    else:
        out["upstream_retention"] = out["vqa_retention"] = None
    return out


def build_table(evals: dict[str, dict], kind: str, upstream: list[str]) -> list[dict]:
    """Rows: teacher per suite first, then method x suite (x shots) aggregated over seeds."""
    teacher = evals.get("teacher")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    order: list[tuple] = []
    suites: list[str] = []
    for run, ev in evals.items():
        if run == "teacher":
            continue
        r = parse_run_name(run)
        key = (r["method"], r["suite"], r["shots"])
        if key not in groups:
            order.append(key)
        groups[key].append(run_metrics(ev, r["suite"], upstream, teacher))
        if r["suite"] not in suites:
            suites.append(r["suite"])
    rows = []
    if teacher is not None:
        for suite in suites or [None]:
            m = run_metrics(teacher, suite, upstream, teacher)
            rows.append(_row("teacher", suite, "-", [m]))
    for key in order:
        rows.append(_row(key[0], key[1], key[2], groups[key]))
    for r in rows:
        r["table"] = kind
    return rows


def _row(method, suite, shots, per_seed: list[dict]) -> dict:
    row = {"method": method, "suite": suite or "-", "shots": shots, "n_seeds": len(per_seed)}
    for col, _ in METRICS:
        s = summarize([m.get(col) for m in per_seed])
        row[f"{col}_mean"], row[f"{col}_std"] = s["mean"], s["std"]
        row[f"{col}_ci95"], row[f"{col}_n"] = s["ci95"], s["n"]
    return row


def columns() -> list[str]:
    cols = ["table", "method", "suite", "shots", "n_seeds"]
    for col, _ in METRICS:
        cols += [f"{col}_mean", f"{col}_std", f"{col}_ci95", f"{col}_n"]
    return cols


def to_csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns(), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt_csv(r.get(k)) for k in columns()})
    return buf.getvalue()


def _fmt_csv(x):
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.6g}"
    return x


def to_markdown(rows: list[dict], kind: str) -> str:
    used = [(c, lab) for c, lab in METRICS if any(r[f"{c}_n"] for r in rows)]
    show_shots = kind == "fewshot" or len({r["shots"] for r in rows if r["method"] != "teacher"}) > 1
    head = ["method", "suite"] + (["shots"] if show_shots else []) + ["seeds"] + [lab for _, lab in used]
    lines = [
        f"# Table: {kind}",
        "",
        "Mean ± 95 % t-CI over seeds (teacher: the base model, one evaluation).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["method"], r["suite"]] + ([r["shots"]] if show_shots else []) + [str(r["n_seeds"])]
        for c, _ in used:
            m, ci = r[f"{c}_mean"], r[f"{c}_ci95"]
            if math.isnan(m):
                cells.append("–")
            elif math.isnan(ci):
                cells.append(f"{m:.3f}")
            else:
                cells.append(f"{m:.3f} ± {ci:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_table(path: str | Path) -> list[dict]:
    """Rows of a table CSV with numbers parsed (NaN for blanks)."""
    import csv

    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            out = {}
            for k, v in r.items():
                if k in ("table", "method", "suite", "shots"):
                    out[k] = v
                else:
                    out[k] = float(v) if v not in ("", None) else float("nan")
            rows.append(out)
    return rows


def add_args(p) -> None:
    p.add_argument("--kind", required=True, choices=["main", "fewshot", "ablation"])
    p.add_argument("--inputs", nargs="*", default=[], help="eval JSON files (runs and the teacher)")
    p.add_argument("--upstream-suites", nargs="*", default=[], help="suites that measure upstream retention")
    p.add_argument("--out", required=True, help="CSV path; the Markdown copy goes beside it (.md)")


def main(args) -> int:
    upstream = [s for s in args.upstream_suites if s]
    rows = build_table(load_evals(args.inputs), args.kind, upstream)
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".md"), to_markdown(rows, args.kind))
    atomic_write_text(out, to_csv(rows))
    print(f"wrote {out} ({len(rows)} rows) and {out.with_suffix('.md')}")
    return 0
