"""Stage `demos`: scripted Meta-World demonstrations written as an RLDS dataset (TFDS format).

For each task, episodes with seeds `seed, seed+1, ...` are rolled out with Meta-World's scripted
expert until `episodes_per_task` succeed; failed episodes are skipped and counted. The kept set is
"the first N successful seeds" of each task, so the dataset is the same for any number of workers.
Episodes are stored interleaved across tasks (episode k of every task, then k+1, ...), so openvla's
"first 95 % of episodes = train" split leaves the last episodes of *every* task held out.

Output: TFDS builder dir `{out_dir}/1.0.0/` (LIBERO *_no_noops field names, plus
`observation/env_state` and `episode_metadata/task`), then `{out_dir}/done.json` last.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np

from ..io import progress

_ENVS: dict[tuple, Any] = {}  # per-process env cache: building an env costs ~0.2 s, reset is cheap


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def rollout(job: dict[str, Any]) -> dict[str, Any]:
    """One expert episode of (task, seed). Images come back JPEG-encoded (small to pickle)."""
    from ..envs.metaworld import MetaWorldEnv
    from ..imaging import encode_jpeg
    from .instructions import sample_instruction

    rand = float(job.get("randomization", 1.0))
    key = (job["task"], job["camera"], job["render_size"], job["max_steps"], rand)
    env = _ENVS.get(key)
    if env is None:
        env = _ENVS[key] = MetaWorldEnv(
            job["task"],
            job["seed"],
            camera=job["camera"],
            render_size=job["render_size"],
            max_steps=job["max_steps"],
            randomization=rand,
        )
    t0 = time.perf_counter()
    obs = env.reset(job["seed"])
    images, states, env_states, actions = [], [], [], []
    success = done = False
    while not done:
        action = env.expert_action(obs)
        images.append(encode_jpeg(obs["image"]))
        states.append(obs["state"])
        env_states.append(obs["env_state"])
        actions.append(action)
        obs, success, done = env.step(action)
    return {
        "task": job["task"],
        "seed": job["seed"],
        "success": bool(success),
        "steps": len(actions),
        "seconds": time.perf_counter() - t0,
        "images": images,
        "states": np.stack(states),
        "env_states": np.stack(env_states),
        "actions": np.stack(actions),
        "instruction": sample_instruction(job["task"], job["seed"], job.get("instructions")),
    }


def generate(
    tasks: list[str],
    episodes_per_task: int,
    seed: int,
    *,
    camera: str = "corner3",
    render_size: int = 64,
    max_steps: int = 150,
    workers: int = 1,
    instructions: dict | None = None,
    max_attempts_factor: float = 3.0,
    desc: str = "demos",
    randomization: float = 1.0,
) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Roll out episodes until each task has `episodes_per_task` successes (first N successful seeds).

    Returns (kept episodes per task in seed order, per-task counts). Raises RuntimeError when a
    task's expert fails too often to reach N within `max_attempts_factor * N + 10` seeds.
    """
    base = {
        "camera": camera,
        "render_size": render_size,
        "max_steps": max_steps,
        "instructions": instructions or {},
        "randomization": float(randomization),
    }
    results: dict[str, dict[int, dict]] = {t: {} for t in tasks}
    next_seed = {t: seed for t in tasks}
    limit = int(max_attempts_factor * episodes_per_task) + 10
    pool = None
    if workers > 1:
        pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)
    bar = progress(total=episodes_per_task * len(tasks), desc=desc, unit="ep")
    try:
        while True:
            jobs = []
            for t in tasks:
                ok = sum(r["success"] for r in results[t].values())
                need = episodes_per_task - ok
                if need <= 0:
                    continue
                if next_seed[t] - seed >= limit:
                    fails = len(results[t]) - ok
                    raise RuntimeError(
                        f"task {t}: the scripted expert succeeded in only {ok} of {len(results[t])} "
                        f"episodes ({fails} failed within max_steps={max_steps}). Raise "
                        f"data.metaworld.max_steps, lower episodes_per_task, or drop {t} from "
                        f"data.metaworld.datasets."
                    )
                # Ask for what is missing plus a margin for the expected failures.
                n = min(need + need // 8, limit - (next_seed[t] - seed))
                jobs += [dict(base, task=t, seed=s) for s in range(next_seed[t], next_seed[t] + n)]
                next_seed[t] += n
            if not jobs:
                break
            it = pool.imap_unordered(rollout, jobs) if pool else map(rollout, jobs)
            for r in it:
                results[r["task"]][r["seed"]] = r
                kept = sum(x["success"] for x in results[r["task"]].values())
                if r["success"] and kept <= episodes_per_task:
                    bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    kept: dict[str, list[dict]] = {}
    counts: dict[str, dict] = {}
    for t in tasks:
        ordered = [results[t][s] for s in sorted(results[t])]
        chosen, tried = [], []
        for r in ordered:  # count attempts only up to the N-th success: independent of batching
            tried.append(r)
            if r["success"]:
                chosen.append(r)
                if len(chosen) == episodes_per_task:
                    break
        failed = [r["seed"] for r in tried if not r["success"]]
        kept[t] = chosen
        counts[t] = {
            "kept": len(chosen),
            "attempted": len(tried),
            "failed": len(failed),
            "failed_seeds": failed,
            "expert_success_rate": len(chosen) / max(1, len(tried)),
            "mean_steps": float(np.mean([r["steps"] for r in chosen])),
            "max_steps_used": int(max(r["steps"] for r in chosen)),
            "seeds": [r["seed"] for r in chosen],
            "rollout_seconds": float(sum(r["seconds"] for r in tried)),
        }
    return kept, counts


def interleave(kept: dict[str, list[dict]]) -> list[dict]:
    """Episode k of every task, then k+1, ...: every task is spread over the whole file order."""
    out = []
    n = max(len(v) for v in kept.values())
    for k in range(n):
        for eps in kept.values():
            if k < len(eps):
                out.append(eps[k])
    return out
