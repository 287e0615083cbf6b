"""Recipe `vlaforget cache`: an RLDS/TFDS dataset -> the random-access training cache +
dataset_statistics.json, manifest.json last (data/cache.py).
"""

from __future__ import annotations

import argparse

from ..data.cache import build_cache
from ..io import log
from ..settings import CacheStageSettings


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="cache stage config (vlaforget stage-config)")


def main(args) -> int:
    from ..stagefile import load_stage_config

    sc = CacheStageSettings.of(load_stage_config(args.config, "cache"))
    m = build_cache(
        sc.rlds_dir,
        sc.out_dir,
        sc.dataset,
        sc.image_size,
        sc.train_split,
        sc.image_key,
        sc.state_key,
        extra={"stage_code": sc.code},
        transform=sc.transform,
        heldout=sc.heldout,
    )
    if m.get("heldout_note"):
        log.warning("cache %s: %s", m["name"], m["heldout_note"])
    log.info(
        "cache %s: %d episodes (%d train, held out %s over %d tasks), %d transitions, %d tasks, actions: %s transform, %.1f s -> %s",
        m["name"],
        m["num_episodes"],
        m["num_train_episodes"],
        m["heldout_used"],
        len(m["heldout_tasks"]),
        m["num_transitions"],
        len(m["tasks"]),
        m["action_transform"]["name"],
        m["seconds"],
        sc.out_dir,
    )
    return 0
