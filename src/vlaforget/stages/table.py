"""Recipe `vlaforget table`: eval JSONs -> the wide data table (csv + md, report/tables.py) and the
compact paper table (`*_paper.md`, `.tex`) with its comparisons (`*_stats.csv`, report/paper.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..io import atomic_write_text
from ..report.paper import build_paper, to_latex, to_paper_markdown, to_stats_csv
from ..report.tables import build_table, load_evals, to_csv, to_markdown


def add_args(p) -> None:
    p.add_argument("--kind", required=True, choices=["main", "fewshot", "ablation", "lifelong"])
    p.add_argument("--chain-suites", nargs="*", default=[], help="lifelong: study.chain.suites, in order")
    p.add_argument(
        "--run-dirs", nargs="*", default=[], help="lifelong: run dirs (periodic evals in metrics.jsonl)"
    )
    p.add_argument("--inputs", nargs="*", default=[], help="eval JSON files (runs and the teacher)")
    p.add_argument("--upstream-suites", nargs="*", default=[], help="suites that measure upstream retention")
    p.add_argument(
        "--ablation-bases",
        nargs="*",
        default=[],
        metavar="ABLATION=BASE",
        help="ablation table: the method each ablation is compared with (config ablations.*.base)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="CSV path; beside it: .md, the paper table _paper.md and .tex, comparisons _stats.csv",
    )


def main(args) -> int:
    if args.kind == "lifelong":  # report/lifelong.py: FWT, NBT, AUC of chained runs
        return lifelong_table(args)
    upstream = [s for s in args.upstream_suites if s]
    evals = load_evals(args.inputs)
    rows = build_table(evals, args.kind, upstream)
    bases = dict(b.split("=", 1) for b in (args.ablation_bases or []) if b)
    paper = build_paper(evals, args.kind, upstream, bases)
    out = Path(args.out)
    paths = paper_paths(out)
    atomic_write_text(paths["paper_md"], to_paper_markdown(paper))
    atomic_write_text(paths["tex"], to_latex(paper))
    atomic_write_text(paths["stats"], to_stats_csv(paper))
    atomic_write_text(out.with_suffix(".md"), to_markdown(rows, args.kind))
    atomic_write_text(out, to_csv(rows))
    print(f"wrote {out} ({len(rows)} rows), {out.with_suffix('.md')}, " + ", ".join(map(str, paths.values())))
    return 0


def paper_paths(csv_path) -> dict[str, Path]:
    """The paper table's files beside the data table `table_{kind}.csv` (workflow/rules/report.smk)."""
    out = Path(csv_path)
    return {
        "paper_md": out.with_name(f"{out.stem}_paper.md"),
        "tex": out.with_suffix(".tex"),
        "stats": out.with_name(f"{out.stem}_stats.csv"),
    }


def lifelong_table(args) -> int:
    """`--kind lifelong`: the success matrix of every chain, FWT / NBT / AUC per method."""
    import json

    from ..report.lifelong import LifelongInputError, build, to_csv, to_markdown

    suites = [s for s in (args.chain_suites or []) if s]
    if len(suites) < 2:
        raise LifelongInputError("table --kind lifelong needs --chain-suites with two or more suites")
    # runs/{run}/{config id}: keyed by the run name (a legacy runs/{run} too)
    run_dirs = {
        (Path(d).parent.name if re.fullmatch(r"[0-9a-f]{12}", Path(d).name) else Path(d).name): d
        for d in (args.run_dirs or [])
        if d
    }
    rows, detail = build(load_evals(args.inputs), suites, run_dirs)
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".md"), to_markdown(rows, suites))
    atomic_write_text(out.with_suffix(".json"), json.dumps(detail, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out, to_csv(rows))
    print(
        f"wrote {out} ({len(rows)} methods, {len(detail)} chains), {out.with_suffix('.md')}, "
        f"{out.with_suffix('.json')}"
    )
    return 0
