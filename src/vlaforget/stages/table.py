"""Recipe `vlaforget table`: eval JSONs -> a paper table, csv + md (report/tables.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..io import atomic_write_text
from ..report.tables import build_table, load_evals, to_csv, to_markdown


def add_args(p) -> None:
    p.add_argument("--kind", required=True, choices=["main", "fewshot", "ablation", "lifelong"])
    p.add_argument("--chain-suites", nargs="*", default=[], help="lifelong: study.chain.suites, in order")
    p.add_argument("--run-dirs", nargs="*", default=[],
                   help="lifelong: run dirs (periodic evals in metrics.jsonl)")
    p.add_argument("--inputs", nargs="*", default=[], help="eval JSON files (runs and the teacher)")
    p.add_argument("--upstream-suites", nargs="*", default=[], help="suites that measure upstream retention")
    p.add_argument("--out", required=True, help="CSV path; the Markdown copy goes beside it (.md)")


def main(args) -> int:
    if args.kind == "lifelong":  # report/lifelong.py: FWT, NBT, AUC of chained runs
        return lifelong_table(args)
    upstream = [s for s in args.upstream_suites if s]
    rows = build_table(load_evals(args.inputs), args.kind, upstream)
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".md"), to_markdown(rows, args.kind))
    atomic_write_text(out, to_csv(rows))
    print(f"wrote {out} ({len(rows)} rows) and {out.with_suffix('.md')}")
    return 0



def lifelong_table(args) -> int:
    """`--kind lifelong`: the success matrix of every chain, FWT / NBT / AUC per method."""
    import json

    from ..report.lifelong import LifelongInputError, build, to_csv, to_markdown

    suites = [s for s in (args.chain_suites or []) if s]
    if len(suites) < 2:
        raise LifelongInputError("table --kind lifelong needs --chain-suites with two or more suites")
    # runs/{run}/{config id}: keyed by the run name (a legacy runs/{run} too)
    run_dirs = {(Path(d).parent.name if re.fullmatch(r"[0-9a-f]{12}", Path(d).name) else Path(d).name): d
                for d in (args.run_dirs or []) if d}
    rows, detail = build(load_evals(args.inputs), suites, run_dirs)
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".md"), to_markdown(rows, suites))
    atomic_write_text(out.with_suffix(".json"), json.dumps(detail, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out, to_csv(rows))
    print(f"wrote {out} ({len(rows)} methods, {len(detail)} chains), {out.with_suffix('.md')}, "
          f"{out.with_suffix('.json')}")
    return 0
