"""Stage `train`."""

from __future__ import annotations

import json

from ..config import load_stage_config
from ..train.loop import log, run_training


def add_args(p):
    p.add_argument("--config", required=True, help="train stage config ({root}/configs/train/<run>.yaml)")
    p.add_argument("--dry-run-batches", type=int, default=0, metavar="N",
                   help="preflight: N batches through forward and every backward pass (CRaFT's retention "
                        "gradient, HSW), anchor / probe checks, no optimizer step; writes dry_run.json, then stops")


def main(args) -> int:
    sc = load_stage_config(args.config, "train")
    res = run_training(sc, dry_run_batches=int(getattr(args, "dry_run_batches", 0) or 0))
    if res:
        log.info("finished %s: %s", sc["run_id"], json.dumps(res.get("final_metrics", {}))[:300])
    return 0

