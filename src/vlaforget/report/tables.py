"""Paper tables (`vlaforget table --kind main|fewshot|ablation --inputs EVAL_JSONS... --out X.csv`).

One row per method x suite (x shots): mean, standard deviation, 95 % t confidence interval and n over
seeds of downstream success, upstream success, visual-question accuracy (free answer and multiple
choice), retention ratios against the teacher (its own row, first; per upstream suite and per question
category too), the KL of the answer distributions, representation drift and CKA. A Markdown copy
(`mean ± ci95`) sits beside the CSV; docs/evaluation.md defines every column.

Retention against a teacher that scores 0 is *undefined*: the cell reads "retention undefined" in the
Markdown and "undefined" in the CSV (never 0, never NaN); a metric nobody measured is "–" / blank.

With eval.initial_states per_seed the teacher's closed-loop evals are per seed (`teacher__s{seed}`):
each run's retention divides by the teacher on its own seed's states (teacher_of), the teacher row
pools every block (fold_teacher_blocks).

Inputs are the eval stages' JSON files, `{root}/evals/{run}/{suite}.json` (closed loop: run, suite,
success_rate, n_episodes, per_task) and `{root}/evals/{run}/forgetting.json` (run, vqa_accuracy,
vqa_kl, drift_mean, cka_mean, drift_craft_layer, cka_craft_layer, ...).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import read_json
from ..study import parse_run_name

# (column, label in the Markdown table). Retention = run / teacher, per seed, then aggregated.
METRICS = [
    ("downstream_success", "downstream success"),
    ("upstream_success", "upstream success"),
    ("upstream_retention", "upstream retention"),
    ("vqa_accuracy", "VQA acc."),
    ("vqa_retention", "VQA retention"),
    ("vqa_kl", "VQA KL"),
    ("vqa_mc_accuracy", "VQA-MC acc."),
    ("vqa_mc_retention", "VQA-MC retention"),
    ("vqa_mc_kl", "VQA-MC KL"),
    # questions on the downstream suite's scenes (eval.forgetting.downstream_vqa_suites: the window)
    ("vqa_mc_downstream_accuracy", "VQA-MC acc. (downstream scenes)"),
    ("vqa_mc_downstream_retention", "VQA-MC retention (downstream scenes)"),
    ("drift", "drift"),
    ("cka", "CKA"),
    ("drift_craft_layer", "drift @CRaFT layer"),
    ("cka_craft_layer", "CKA @CRaFT layer"),
    ("drift_craft_layer_image", "drift @CRaFT layer (image pool)"),
    ("cka_craft_layer_image", "CKA @CRaFT layer (image pool)"),
    ("task_success", "success"),
]
# Columns that exist only per key (`task_success[drawer-open-v3]`: closed-loop success per task, from
# the eval JSON's per_task); the Markdown puts them in a table of their own, after the main one.
PER_KEY_ONLY = {"task_success"}


class _Undefined:
    """A retention whose denominator (the teacher's score) is 0."""

    def __repr__(self):
        return "UNDEFINED"


UNDEFINED = _Undefined()
UNDEFINED_CSV, UNDEFINED_MD = "undefined", "retention undefined"


def t975(df: int) -> float:
    """Two-sided 95 % Student-t quantile t_{0.975, df} (scipy.stats.t)."""
    if df < 1:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def summarize(values) -> dict:
    """mean, sample std, 95 % t-CI half-width and n of the finite values.

    Values that are UNDEFINED (teacher scored 0) are not numbers; if nothing else is there the
    summary says so (`undefined`: True) instead of NaN."""
    values = list(values)
    undefined = any(x is UNDEFINED for x in values)
    v = np.array([x for x in values if x is not None and x is not UNDEFINED and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return {
            "mean": float("nan"),
            "std": float("nan"),
            "ci95": float("nan"),
            "n": 0,
            "undefined": undefined,
        }
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
    """a / b; UNDEFINED where b (the teacher) is 0; None where either is unmeasured."""
    if a is None or b is None:
        return None
    if b == 0:
        return UNDEFINED
    return a / b


class RenderMismatch(UserError, ValueError):
    """Two evaluations in one table saw different first frames of the same initial state."""


def check_first_frames(seen: dict, d: dict, path: Path) -> None:
    """Every evaluation of one (suite, task, initial state) must start from the same image: the first
    frame depends on the state and the renderer only, never on the model. Different digests mean
    another renderer (a GPU driver's EGL and Mesa's draw Meta-World differently, issue 27:
    docs/benchmarks.md "why the CPU and the GPU disagree") or another camera / image size, and a
    paired test across them would compare renderers, not methods. `seen` maps (suite, task, seed)
    to (digest, file) over the files read so far; episodes without a digest (older files) pass."""
    suite = d.get("suite")
    for e in d.get("episodes") or []:
        dig = e.get("first_digest")
        if not dig or e.get("seed") is None:
            continue
        key = (suite, str(e.get("task")), e.get("seed"))
        first = seen.setdefault(key, (dig, path))
        if first[0] != dig:
            raise RenderMismatch(
                f"{path} and {first[1]} start {key[1]} (initial state {key[2]}, suite {suite}) from "
                f"different images ({dig} vs {first[0]}): they were rendered differently (another "
                "renderer: a GPU driver's EGL vs Mesa's, or another camera / image size), so their "
                "episodes cannot be paired. Build the table from evaluations made on one kind of "
                "machine (re-run the eval jobs of the odd ones there), or make two tables."
            )


def load_evals(paths) -> dict[str, dict]:
    """{run: {"suites": {suite: success_rate}, "forgetting": {...}}} from eval JSON files.

    The run and suite come from the JSON (`run`, `suite`), else from the path evals/{run}/{suite}.json.
    Evaluations whose first frames of one initial state differ are refused (check_first_frames).
    """
    runs: dict[str, dict] = defaultdict(
        lambda: {"suites": {}, "forgetting": None, "tasks": {}, "episodes": {}}
    )
    first_frames: dict = {}
    for p in paths:
        p = Path(p)
        d = read_json(p)
        # evals/{run}/{suite}/{config id}.json, evals/{run}/forgetting/{config id}.json (stageconfig.job_dir)
        by_id = bool(re.fullmatch(r"[0-9a-f]{12}", p.stem))
        run = d.get("run") or d.get("run_name") or (p.parents[1].name if by_id else p.parent.name)
        if p.name == "forgetting.json" or (by_id and p.parent.name == "forgetting"):
            runs[run]["forgetting"] = d
        else:
            suite = d.get("suite") or (p.parent.name if by_id else p.stem)
            if "success_rate" not in d:
                raise ValueError(f"{p}: closed-loop eval JSON without 'success_rate' (re-run the eval rule)")
            check_first_frames(first_frames, {**d, "suite": suite}, p)
            runs[run]["suites"][suite] = _num(d["success_rate"])
            runs[run]["episodes"][suite] = episode_outcomes(d)
            for task, blk in sorted((d.get("per_task") or {}).items()):
                runs[run]["tasks"][task] = _num(blk.get("success_rate"))
    return fold_teacher_blocks(dict(runs))


def fold_teacher_blocks(evals: dict[str, dict]) -> dict[str, dict]:
    """eval.initial_states per_seed: the teacher's evals on each seed's initial states
    (`teacher__s{seed}`) go into evals["teacher"]["blocks"][seed] (teacher_of reads them: a run's
    retention divides by the teacher on the same states), and evals["teacher"]'s own success is
    pooled over every block (the teacher row). Without such evals: evals unchanged."""
    blocks = {}
    for run in list(evals):
        m = re.fullmatch(r"teacher__s(\d+)", run)
        if m:
            blocks[int(m.group(1))] = evals.pop(run)
    if not blocks:
        return evals
    pooled = pool_blocks([blocks[s] for s in sorted(blocks)])
    teacher = evals.get("teacher") or {}
    evals["teacher"] = {**pooled, "forgetting": teacher.get("forgetting"), "blocks": blocks}
    return evals


def pool_blocks(blocks: list[dict]) -> dict:
    """One teacher over several blocks of initial states: per suite and task, the success rate over
    all their episodes (each block weighted by its episodes), the episodes of all."""
    out: dict = {"suites": {}, "tasks": {}, "episodes": {}}
    for key in ("suites", "tasks"):
        for name in dict.fromkeys(n for b in blocks for n in b.get(key) or {}):
            vals, weights = [], []
            for b in blocks:
                v = (b.get(key) or {}).get(name)
                if v is None:
                    continue
                eps = (b.get("episodes") or {}).get(name) if key == "suites" else None
                vals.append(v)
                weights.append(len(eps) if eps else 1)
            out[key][name] = float(np.average(vals, weights=weights)) if vals else None
    for b in blocks:
        for suite, eps in (b.get("episodes") or {}).items():
            out["episodes"].setdefault(suite, {}).update(eps)
    return out


def teacher_of(teacher: dict | None, seeds) -> dict | None:
    """The teacher a run (or runs) of these training seeds is compared with: per_seed initial states
    (load_evals' `blocks`), the teacher on those seeds' blocks only (one seed: its block; several:
    pooled), its forgetting metrics kept; shared states: the teacher itself. A seed without a
    teacher block gets no closed-loop teacher (retention unmeasured, never another seed's states)."""
    if teacher is None or not teacher.get("blocks"):
        return teacher
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    got = [teacher["blocks"][s] for s in seeds if s in teacher["blocks"]]
    if len(got) < len(seeds):
        return {"suites": {}, "tasks": {}, "episodes": {}, "forgetting": teacher.get("forgetting")}
    return {**pool_blocks(got), "forgetting": teacher.get("forgetting")}


def episode_outcomes(d: dict) -> dict[tuple, bool]:
    """{(task, initial-state seed): success} of one closed-loop eval JSON's episodes (report/paper.py
    pairs runs on these keys). An episode without a seed is keyed by its index in the file; one that
    ended in a simulator error counts as a failure, as in the eval's success_rate."""
    out = {}
    for i, e in enumerate(d.get("episodes") or []):
        out[(str(e.get("task")), e.get("seed") if e.get("seed") is not None else f"#{e.get('index', i)}")] = (
            bool(e.get("success"))
        )
    return out


def run_metrics(ev: dict, suite: str | None, upstream: list[str], teacher: dict | None) -> dict:
    """Per-run metric values (None where not measured, UNDEFINED where the teacher scored 0).

    Upstream retention: per suite `upstream_retention[s]` = run / teacher on s; the summary
    `upstream_retention` = mean run success / mean teacher success over the upstream suites the
    teacher succeeds on (UNDEFINED if it scores 0 on all)."""
    ups = [s for s in upstream if s != suite and ev["suites"].get(s) is not None]
    up = [ev["suites"][s] for s in ups]
    f = ev.get("forgetting") or {}
    mc = f.get("vqa_mc") or {}
    out = {
        "downstream_success": ev["suites"].get(suite) if suite else None,
        "upstream_success": float(np.mean(up)) if up else None,
        "vqa_accuracy": _num(f.get("vqa_accuracy")),
        "vqa_kl": _num(f.get("vqa_kl")),
        "vqa_mc_accuracy": _num(mc.get("accuracy")),
        "vqa_mc_kl": _num(mc.get("kl")),
        "drift": _num(f.get("drift_mean")),
        "cka": _num(f.get("cka_mean")),
        "drift_craft_layer": _num(f.get("drift_craft_layer")),
        "cka_craft_layer": _num(f.get("cka_craft_layer")),
        "drift_craft_layer_image": _num(f.get("drift_craft_layer_image")),
        "cka_craft_layer_image": _num(f.get("cka_craft_layer_image")),
    }
    for s in ups:
        out[f"upstream_success[{s}]"] = ev["suites"][s]
    for task, rate in (ev.get("tasks") or {}).items():
        out[f"task_success[{task}]"] = rate
    for cat, blk in sorted((mc.get("by_category") or {}).items()):
        out[f"vqa_mc_accuracy[{cat}]"] = _num(blk.get("accuracy"))
    dmc = f.get("vqa_mc_downstream") or {}
    out["vqa_mc_downstream_accuracy"] = _num(dmc.get("accuracy"))
    for cat, blk in sorted((dmc.get("by_category") or {}).items()):
        out[f"vqa_mc_downstream_accuracy[{cat}]"] = _num(blk.get("accuracy"))
    if teacher is not None:
        tf = teacher.get("forgetting") or {}
        tmc = tf.get("vqa_mc") or {}
        tdmc = tf.get("vqa_mc_downstream") or {}
        if dmc:
            out["vqa_mc_downstream_retention"] = _ratio(
                out["vqa_mc_downstream_accuracy"], _num(tdmc.get("accuracy"))
            )
            for cat, blk in sorted((dmc.get("by_category") or {}).items()):
                tb = (tdmc.get("by_category") or {}).get(cat) or {}
                out[f"vqa_mc_downstream_retention[{cat}]"] = _ratio(
                    _num(blk.get("accuracy")), _num(tb.get("accuracy"))
                )
        t_up = {s: teacher["suites"].get(s) for s in ups if teacher["suites"].get(s) is not None}
        for s in ups:
            out[f"upstream_retention[{s}]"] = _ratio(ev["suites"][s], t_up.get(s))
        live = [s for s in t_up if t_up[s] > 0]
        if not t_up:
            out["upstream_retention"] = None
        elif not live:
            out["upstream_retention"] = UNDEFINED
        else:
            out["upstream_retention"] = float(np.mean([ev["suites"][s] for s in live])) / float(
                np.mean([t_up[s] for s in live])
            )
        out["vqa_retention"] = _ratio(out["vqa_accuracy"], _num(tf.get("vqa_accuracy")))
        out["vqa_mc_retention"] = _ratio(out["vqa_mc_accuracy"], _num(tmc.get("accuracy")))
        for cat, blk in sorted((mc.get("by_category") or {}).items()):
            tb = (tmc.get("by_category") or {}).get(cat) or {}
            out[f"vqa_mc_retention[{cat}]"] = _ratio(_num(blk.get("accuracy")), _num(tb.get("accuracy")))
    else:
        out["upstream_retention"] = out["vqa_retention"] = out["vqa_mc_retention"] = None
    return out


def metric_list(rows_or_metrics) -> list[tuple[str, str]]:
    """METRICS plus the per-suite / per-category columns present (upstream_retention[libero_spatial] ...)."""
    extra: list[str] = []
    for m in rows_or_metrics:
        for k in m:
            base = k.split("[", 1)[0]
            if "[" in k and k.endswith(("]", "]_mean")) and base in dict(METRICS):
                col = k[: k.index("]") + 1]
                if col not in extra:
                    extra.append(col)
    out = []
    for col, lab in METRICS:
        if col not in PER_KEY_ONLY:
            out.append((col, lab))
        for e in sorted(x for x in extra if x.split("[", 1)[0] == col):
            out.append((e, f"{lab} {e[e.index('[') + 1 : -1]}"))
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
        groups[key].append(run_metrics(ev, r["suite"], upstream, teacher_of(teacher, r["seed"])))
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
    for col, _ in metric_list(per_seed):
        s = summarize([m.get(col) for m in per_seed])
        row[f"{col}_mean"] = UNDEFINED if s.get("undefined") else s["mean"]
        row[f"{col}_std"], row[f"{col}_ci95"], row[f"{col}_n"] = s["std"], s["ci95"], s["n"]
    return row


def columns(rows: list[dict] | None = None) -> list[str]:
    cols = ["table", "method", "suite", "shots", "n_seeds"]
    for col, _ in metric_list(rows or []):
        cols += [f"{col}_mean", f"{col}_std", f"{col}_ci95", f"{col}_n"]
    return cols


def to_csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    cols = columns(rows)
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt_csv(r.get(k)) for k in cols})
    return buf.getvalue()


def _fmt_csv(x):
    if x is UNDEFINED:
        return UNDEFINED_CSV
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.6g}"
    return x


def to_markdown(rows: list[dict], kind: str) -> str:
    measured = [
        (c, lab)
        for c, lab in metric_list(rows)
        if any(r.get(f"{c}_n") or r.get(f"{c}_mean") is UNDEFINED for r in rows)
    ]
    measured, dropped = _drop_duplicates(rows, measured)
    per_key = [(c, lab) for c, lab in measured if c.split("[", 1)[0] in PER_KEY_ONLY]
    lines = [
        f"# Table: {kind}",
        "",
        (
            "Mean ± 95 % t-CI over seeds (teacher: the base model, one evaluation). "
            '"retention undefined": the teacher scores 0 there. Columns: docs/evaluation.md. '
            f"The paper table: table_{kind}_paper.md."
        ),
        "",
    ]
    if dropped:
        lines += [
            "Left out, equal to another column in every row (they stay in the CSV): "
            + "; ".join(f"{lab} (= {other})" for lab, other in dropped)
            + ".",
            "",
        ]
    lines += _md_table(rows, kind, [u for u in measured if u not in per_key])
    if per_key:
        lines += [
            "",
            "## Closed-loop success per task",
            "",
            "The teacher's row on its pretraining tasks is its instruction-following.",
            "",
        ]
        lines += _md_table(rows, kind, [(c, c[c.index("[") + 1 : -1]) for c, _ in per_key])
    return "\n".join(lines) + "\n"


def _drop_duplicates(rows: list[dict], used: list[tuple[str, str]]):
    """Columns whose (mean, CI) equal an earlier column's in every row (upstream success and its copy
    for the only upstream suite; VQA and VQA-MC accuracy where every answer is one token) go."""

    def key(c):
        return tuple((repr(r.get(f"{c}_mean")), repr(r.get(f"{c}_ci95"))) for r in rows)

    kept, dropped, seen = [], [], {}
    for c, lab in used:
        k = key(c)
        if k in seen and c.split("[", 1)[0] not in PER_KEY_ONLY:
            dropped.append((lab, seen[k]))
        else:
            seen.setdefault(k, lab)
            kept.append((c, lab))
    return kept, dropped


def _md_table(rows: list[dict], kind: str, used: list[tuple[str, str]]) -> list[str]:
    show_shots = kind == "fewshot" or len({r["shots"] for r in rows if r["method"] != "teacher"}) > 1
    head = ["method", "suite"] + (["shots"] if show_shots else []) + ["seeds"] + [lab for _, lab in used]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["suite"]] + ([r["shots"]] if show_shots else []) + [str(r["n_seeds"])]
        for c, _ in used:
            m, ci = r.get(f"{c}_mean", float("nan")), r.get(f"{c}_ci95", float("nan"))
            if m is UNDEFINED:
                cells.append(UNDEFINED_MD)
            elif math.isnan(m):
                cells.append("–")
            elif math.isnan(ci):
                cells.append(f"{m:.3f}")
            else:
                cells.append(f"{m:.3f} ± {ci:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
                    out[k] = float(v) if v not in ("", None, UNDEFINED_CSV) else float("nan")
            rows.append(out)
    return rows
