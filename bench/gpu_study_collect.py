"""Copy a study's per-run JSON out of its (id-addressed, issue 29) data root into the committed
`raw/` layout that bench/gpu_study_tables.sh rebuilds the tables from:

    raw/<run>/{mw_upstream,mw_downstream,forgetting}.json, raw/<run>/train_metrics.jsonl,
    raw/teacher[__s<seed>]/..., raw/teacher/model_done.json

    .venv/bin/python bench/gpu_study_collect.py ROOT RAW_DIR [--runs-like SUBSTRING ...]

Each eval folder must hold one result (one config id): a root that evaluated a run under two
configs is refused, naming both files, so a table is never built from a mix.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def one(folder: Path, pattern: str) -> Path | None:
    found = sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))
    if len(found) > 1:
        sys.exit(f"{folder}: {len(found)} results ({', '.join(p.name for p in found)}): one config per root")
    return found[0] if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("raw", type=Path)
    ap.add_argument("--runs-like", nargs="*", default=[], help="keep only runs whose name holds one of these")
    a = ap.parse_args()
    n = 0
    for run_dir in sorted((a.root / "evals").iterdir()):
        run = run_dir.name
        if a.runs_like and not run.startswith("teacher") and not any(s in run for s in a.runs_like):
            continue
        out = a.raw / run
        for suite_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            src = one(suite_dir, "*.json")
            if src is None:
                continue
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / f"{suite_dir.name}.json")
            n += 1
        runs = a.root / "runs" / run
        if runs.is_dir():
            metrics = [one(d, "metrics.jsonl") for d in sorted(runs.iterdir()) if d.is_dir()]
            metrics = [m for m in metrics if m is not None]
            if len(metrics) > 1:
                sys.exit(f"{runs}: {len(metrics)} trained configs: one config per root")
            if metrics and out.is_dir():
                shutil.copyfile(metrics[0], out / "train_metrics.jsonl")
    model = sorted((a.root / "models").glob("*/*/done.json"))
    if len(model) == 1:
        (a.raw / "teacher").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model[0], a.raw / "teacher" / "model_done.json")
    print(f"{n} eval results copied into {a.raw}")


if __name__ == "__main__":
    main()
