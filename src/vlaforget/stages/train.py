"""Recipe `vlaforget train`: one training run from its stage config (train/loop.py's run_training),
with the periodic closed-loop evaluator built here from eval/ (train/ does not import eval/).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..precision import exact_fp32
from ..settings import EvalSettings, MethodSettings, TrainSettings
from ..stagefile import load_stage_config
from ..train.loop import log, run_training


def add_args(p):
    p.add_argument("--config", required=True, help="train stage config ({root}/configs/train/<run>.yaml)")
    p.add_argument(
        "--dry-run-batches",
        type=int,
        default=0,
        metavar="N",
        help="preflight: N batches through forward and every backward pass (CRaFT's retention "
        "gradient, HSW), anchor / probe checks, no optimizer step; writes dry_run.json, then stops",
    )


def periodic_evaluator(sc: dict) -> Callable[[Any, Any], float] | None:
    """The closed-loop success rate on the run's `periodic_eval` block (every train.eval_every
    steps; early stopping reads it), or None when the run has no periodic evaluation."""
    ts = TrainSettings.of(sc["train"])
    if not ts.eval_every:
        return None
    from ..eval.closed_loop import evaluate_model

    n = ts.eval_episodes_per_task
    block = EvalSettings.of(sc["periodic_eval"], "periodic_eval")

    def evaluate(backend, model) -> float:
        return float(evaluate_model(backend, block, model=model, episodes_per_task=n)["success_rate"])

    return evaluate


def main(args) -> int:
    sc = load_stage_config(args.config, "train")
    TrainSettings.of(sc["train"])  # unknown keys / wrong types: a ConfigError before anything loads
    MethodSettings.of(sc.get("method") or {})
    exact_fp32((sc.get("model") or {}).get("dtype"))  # no TF32 for an fp32 model on CUDA (precision.py)
    res = run_training(
        sc, dry_run_batches=int(getattr(args, "dry_run_batches", 0) or 0), evaluator=periodic_evaluator(sc)
    )
    if res:
        log.info("finished %s: %s", sc["run_id"], json.dumps(res.get("final_metrics", {}))[:300])
    return 0
