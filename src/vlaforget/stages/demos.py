"""Recipe `vlaforget demos`: scripted Meta-World demonstrations of a dataset's tasks -> an RLDS
(TFDS) builder dir, then `{out_dir}/done.json` (data/metaworld_demos.py rolls out, data/rlds.py writes).
"""

from __future__ import annotations

import argparse
import os
import time

from ..data.metaworld_demos import generate, interleave
from ..io import log, provenance, write_json
from ..settings import DemosStageSettings


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="demos stage config (vlaforget stage-config)")


def main(args) -> int:
    from ..data.instructions import task_table
    from ..data.rlds import write_rlds
    from ..envs.metaworld import ACTION_DIM, ENV_STATE_DIM, STATE_DIM
    from ..stagefile import load_stage_config

    sc = load_stage_config(args.config, "demos")
    ds = DemosStageSettings.of(sc)  # unknown keys / wrong types: a ConfigError before any rollout
    out_dir = sc["out_dir"]
    tasks = list(sc["tasks"])
    n = int(sc["episodes_per_task"])
    size = int(sc["render_size"])
    t0 = time.time()
    log.info(
        "demos %s: %d tasks x %d episodes, camera %s @ %d px, %d workers",
        sc["dataset"],
        len(tasks),
        n,
        sc["camera"],
        size,
        ds.workers,
    )
    kept, counts = generate(
        tasks,
        n,
        int(sc["seed"]),
        camera=sc["camera"],
        render_size=size,
        max_steps=int(sc["max_steps"]),
        workers=ds.workers,
        instructions=ds.instructions or {},
        desc=f"demos {sc['dataset']}",
    )
    t_roll = time.time() - t0
    episodes = interleave(kept)
    info = write_rlds(
        out_dir,
        sc["dataset"],
        episodes,
        image_shape=(size, size, 3),
        state_dim=STATE_DIM,
        action_dim=ACTION_DIM,
        env_state_dim=ENV_STATE_DIM,
        description=f"Scripted Meta-World v3 demonstrations ({', '.join(tasks)}), "
        f"camera {sc['camera']} {size}px.",
    )
    t_total = time.time() - t0
    for t in tasks:
        log.info(
            "  %-26s kept %d / %d attempted (expert success %.0f%%), mean %.0f steps",
            t,
            counts[t]["kept"],
            counts[t]["attempted"],
            100 * counts[t]["expert_success_rate"],
            counts[t]["mean_steps"],
        )
    log.info(
        "demos %s: %d episodes, %d steps in %.1f s (rollouts %.1f s)",
        sc["dataset"],
        info["episodes"],
        info["steps"],
        t_total,
        t_roll,
    )
    write_json(
        os.path.join(out_dir, "done.json"),
        {
            "dataset": sc["dataset"],
            "builder_dir": info["builder_dir"],
            "episodes": info["episodes"],
            "steps": info["steps"],
            "shards": info["shards"],
            "tasks": counts,
            "instructions": task_table(tasks, ds.instructions or {}),
            "camera": sc["camera"],
            "render_size": size,
            "max_steps": sc["max_steps"],
            "seed": sc["seed"],
            "episodes_per_task": n,
            "workers": ds.workers,
            "order": "interleaved by task",
            "timing": {
                "total_seconds": t_total,
                "rollout_wall_seconds": t_roll,
                "write_seconds": t_total - t_roll,
            },
            "mujoco_gl": os.environ.get("MUJOCO_GL"),
            "stage_code": sc.get("code"),
            "provenance": provenance(),
        },
    )
    return 0
