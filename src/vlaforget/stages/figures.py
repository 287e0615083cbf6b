"""Recipe `vlaforget figures`: paper figures, PNG + PDF (report/figures.py)."""

from __future__ import annotations

from pathlib import Path

from ..report.figures import ablation, category_retention, pareto, training_curves


def add_args(p) -> None:
    p.add_argument("--ablation-table", required=True)
    p.add_argument("--evals", nargs="*", default=[], help="eval JSONs of the main runs and the teacher")
    p.add_argument("--upstream-suites", nargs="*", default=[])
    p.add_argument("--run-done", nargs="*", default=[], help="runs' final/done.json (metrics.jsonl beside)")
    p.add_argument("--out-dir", default="results/figures")


def main(args) -> int:
    out = Path(args.out_dir)
    upstream = [s for s in args.upstream_suites if s]
    run_dirs = []
    for p in args.run_done:
        d = Path(p).parent.parent  # {root}/runs/{run}/{id}/final/done.json -> {root}/runs/{run}/{id}
        if d not in run_dirs:
            run_dirs.append(d)
    written = (
        pareto(args.evals, upstream, out)
        + training_curves(run_dirs, out)
        + ablation(Path(args.ablation_table), out)
        + category_retention(args.evals, upstream, out)
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
