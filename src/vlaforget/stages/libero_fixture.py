"""Recipe `vlaforget libero-fixture`: a tiny LIBERO-format RLDS fixture in openvla's layout
(data/libero_rlds.py; synthetic, or rendered by the LIBERO simulator).
"""

from __future__ import annotations

import argparse

from ..data.libero_rlds import DATASET_SUFFIX, SUITES, write_libero_fixture


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="rlds_dir to write {suite}_no_noops/1.0.0/ under")
    p.add_argument(
        "--suites",
        nargs="+",
        default=["libero_spatial"],
        help=f"suites (with or without {DATASET_SUFFIX}): {', '.join(SUITES)}",
    )
    p.add_argument("--tasks", type=int, default=2, help="tasks per suite (LIBERO's first N)")
    p.add_argument("--episodes", type=int, default=3, help="episodes per task")
    p.add_argument("--steps", type=int, default=24, help="base episode length (+0..steps/4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=2, help="tfrecord shards per dataset")
    p.add_argument(
        "--source",
        choices=("synthetic", "libero"),
        default="synthetic",
        help="synthetic (numpy, deterministic) or the real LIBERO simulator",
    )
    p.add_argument(
        "--libero-python",
        default=None,
        help="Python with LIBERO for --source libero (default: this one, else $VLAFORGET_LIBERO_PYTHON)",
    )


def main(args) -> int:
    write_libero_fixture(
        args.out,
        args.suites,
        n_tasks=args.tasks,
        episodes_per_task=args.episodes,
        steps=args.steps,
        seed=args.seed,
        shards=args.shards,
        source=args.source,
        python=args.libero_python,
    )
    return 0
