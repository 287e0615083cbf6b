"""Recipe `vlaforget libero-vqa`: visual questions generated from the LIBERO simulator's scene state
(data/libero_vqa.py): questions.jsonl + images + manifest.json.
"""

from __future__ import annotations

import argparse

from ..data.libero_vqa import generate, log


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (questions.jsonl, images/, manifest.json)")
    p.add_argument(
        "--suites",
        nargs="+",
        default=["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"],
    )
    p.add_argument("--n", type=int, default=600, help="questions kept (balanced per category and answer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--states-per-task", type=int, default=2, help="held-out init states per task (from 49 down)"
    )
    p.add_argument(
        "--tasks-per-suite", type=int, default=None, help="first N tasks of each suite (default all)"
    )
    p.add_argument("--config-dir", default=None, help="LIBERO config folder (default LIBERO_CONFIG_PATH)")


def main(args) -> int:
    man = generate(
        args.out, args.suites, args.n, args.seed, args.states_per_task, args.tasks_per_suite, args.config_dir
    )
    log.info("libero-vqa: %d questions (%s) in %s s", man["n"], man["counts"], man["seconds"])
    return 0
