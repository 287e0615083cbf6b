"""Recipe `vlaforget table`: eval JSONs -> a paper table, csv + md (report/tables.py).
"""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_text
from ..report.tables import build_table, load_evals, to_csv, to_markdown


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

