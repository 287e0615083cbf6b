"""The lifelong table (`vlaforget table --kind lifelong --chain-suites S1 S2 ... --inputs EVALS
--run-dirs RUN_DIRS --out table_lifelong.csv`): LIBERO's FWT, NBT and AUC of runs chained over
suites (study.chain; docs/evaluation.md "LIBERO's lifelong metrics").

A chain of K suites for one (method, seed) is K runs: stage 1 = `{S1}__{method}__full__s{seed}` (from
the teacher), stage k > 1 = `{Sk}__{method}__chain{k}__s{seed}` (continues stage k-1's adapter). Every
stage is evaluated on every chain suite, so the success matrix M has K + 1 rows (row 0: the teacher,
row k: after stage k) and K columns. For suite k:
  curve c_{k,k,e}: M[k-1][k] (before the first update on it, LIBERO's e = 0), then the stage's
  periodic evaluations (`eval_success_rate` in its metrics.jsonl, train.eval_every, in step order),
  then M[k][k] (the final adapter, full eval protocol);
  the kept checkpoint is the final adapter, so NBT_k uses M[k][k] (metrics.libero_lifelong_metrics
  `kept`); c_{t,k} = M[t][k] for t > k.
One row per method (mean, std, 95 % t-CI over seeds), a Markdown copy with the mean success matrix of
each method, and a JSON beside them with every seed's matrix, curves and metrics.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..eval.metrics import libero_lifelong_metrics
from ..study import parse_run_name, run_name
from .tables import summarize, teacher_of

METRICS = [("fwt", "FWT ↑"), ("nbt", "NBT ↓"), ("auc", "AUC ↑"), ("final_acc", "final mean success")]


class LifelongInputError(UserError, ValueError):
    """A chain's evaluation is missing (a stage not evaluated on a chain suite)."""


def stage_runs(suites: list[str], method: str, seed: int) -> list[str]:
    return [run_name(method, s, "full" if k == 0 else f"chain{k + 1}", seed) for k, s in enumerate(suites)]


def chains_in(evals: dict, suites: list[str]) -> list[tuple[str, int]]:
    """(method, seed) of every chain whose later stages appear among the evaluated runs, in order."""
    out = []
    for run in evals:
        if run == "teacher":
            continue
        r = parse_run_name(run)
        if r["shots"].startswith("chain") and (r["method"], r["seed"]) not in out:
            out.append((r["method"], r["seed"]))
    return out


def success_matrix(evals: dict, suites: list[str], runs: list[str]) -> np.ndarray:
    """(K+1) x K: row 0 the teacher (eval.initial_states per_seed: on the chain's seed's states), row k
    the run of stage k, each on every chain suite."""
    rows = []
    seed = parse_run_name(runs[0])["seed"] if runs else None
    for run in ["teacher"] + runs:
        ev = (
            teacher_of(evals.get("teacher"), seed)
            if run == "teacher" and seed is not None
            else evals.get(run)
        )
        got = (ev or {}).get("suites") or {}
        missing = [s for s in suites if got.get(s) is None]
        if missing:
            raise LifelongInputError(
                f"{run} has no closed-loop success on {missing}: the lifelong table "
                "needs every chain stage evaluated on every chain suite "
                "(evals/{run}/{suite}.json)"
            )
        rows.append([float(got[s]) for s in suites])
    return np.asarray(rows, dtype=np.float64)


def read_periodic(run_dir: str | Path | None) -> list[float]:
    """The periodic closed-loop successes a run logged while training (metrics.jsonl), in step order."""
    if run_dir is None:
        return []
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    recs = []
    for line in f.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("eval_success_rate") is not None:
                recs.append((int(rec.get("step", 0)), float(rec["eval_success_rate"])))
    by_step = dict(recs)  # a resumed run may log a step twice: the last record wins
    return [by_step[s] for s in sorted(by_step)]


def chain_metrics(M: np.ndarray, periodic: list[list[float]] | None = None) -> dict:
    """FWT / NBT / AUC of one chain from its (K+1) x K success matrix (+ periodic evals per stage)."""
    K = M.shape[1]
    if M.shape != (K + 1, K):
        raise ValueError(f"success matrix must be (K+1) x K, got {M.shape}")
    periodic = periodic or [[] for _ in range(K)]
    curves = [[M[k, k]] + list(periodic[k]) + [M[k + 1, k]] for k in range(K)]
    kept = [M[k + 1, k] for k in range(K)]
    out = libero_lifelong_metrics(curves, M[1:], kept=kept)
    out["final_acc"] = float(M[K].mean())
    out["curves"] = [[float(x) for x in c] for c in curves]
    return out


def build(
    evals: dict, suites: list[str], run_dirs: dict[str, str] | None = None
) -> tuple[list[dict], list[dict]]:
    """(rows: one per method over its seeds, detail: one per chain with matrix and metrics)."""
    run_dirs = run_dirs or {}
    detail = []
    for method, seed in chains_in(evals, suites):
        runs = stage_runs(suites, method, seed)
        M = success_matrix(evals, suites, runs)
        m = chain_metrics(M, [read_periodic(run_dirs.get(r)) for r in runs])
        detail.append(
            {"method": method, "seed": seed, "runs": runs, "suites": suites, "matrix": M.tolist(), **m}
        )
    rows = []
    for method in dict.fromkeys(d["method"] for d in detail):
        ds = [d for d in detail if d["method"] == method]
        row = {
            "method": method,
            "chain": " > ".join(suites),
            "n_seeds": len(ds),
            "matrix_mean": np.mean([d["matrix"] for d in ds], axis=0).tolist(),
        }
        for col, _ in METRICS:
            s = summarize([d[col] for d in ds])
            row.update(
                {
                    f"{col}_mean": s["mean"],
                    f"{col}_std": s["std"],
                    f"{col}_ci95": s["ci95"],
                    f"{col}_n": s["n"],
                }
            )
        rows.append(row)
    return rows, detail


def columns() -> list[str]:
    cols = ["table", "method", "chain", "n_seeds"]
    for col, _ in METRICS:
        cols += [f"{col}_mean", f"{col}_std", f"{col}_ci95", f"{col}_n"]
    return cols


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns(), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                k: (
                    ""
                    if isinstance(v, float) and math.isnan(v)
                    else f"{v:.6g}"
                    if isinstance(v, float)
                    else v
                )
                for k, v in {**r, "table": "lifelong"}.items()
            }
        )
    return buf.getvalue()


def _cell(m, ci) -> str:
    if m is None or math.isnan(m):
        return "–"
    return f"{m:.3f}" if ci is None or math.isnan(ci) else f"{m:.3f} ± {ci:.3f}"


def to_markdown(rows: list[dict], suites: list[str]) -> str:
    head = ["method", "seeds"] + [lab for _, lab in METRICS]
    caption = (
        f"Runs chained over {' > '.join(suites)} (LIBERO's lifelong protocol): stage k continues "
        "training stage k-1's adapter on suite k. Mean ± 95 % t-CI over seeds. FWT, NBT, AUC: "
        "docs/evaluation.md."
    )
    lines = ["# Table: lifelong", "", caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [r["method"], str(r["n_seeds"])] + [_cell(r[f"{c}_mean"], r[f"{c}_ci95"]) for c, _ in METRICS]
            )
            + " |"
        )
    for r in rows:
        lines += [
            "",
            f"Success matrix, {r['method']} (mean over seeds; row: after that stage, column: suite)",
            "",
            "| after | " + " | ".join(suites) + " |",
            "|" + "---|" * (len(suites) + 1),
        ]
        for i, vals in enumerate(r["matrix_mean"]):
            lab = "teacher" if i == 0 else f"stage {i} ({suites[i - 1]})"
            lines.append(f"| {lab} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"
