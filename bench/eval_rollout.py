"""Benchmark: batched closed-loop rollouts vs the batch-1 sequential reference loop.

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_rollout.py --num-envs 0 1 2 4 --episodes 2 --max-steps 40

A random-init tiny VLA (config/demo.yaml sizes; speed does not depend on the weights) drives
Meta-World tasks (demo downstream suite) through `vlaforget.eval.rollout.run_episodes`. For each
N (0 = sequential reference loop, in-process, batch-1 policy calls) it reports wall time, ms per env
step, the policy / env split and the mean batch, and checks that every episode gives the same
trajectory (final-frame digest) as the reference loop. `--out FILE` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-envs", type=int, nargs="+", default=[0, 2])
    p.add_argument("--tasks", nargs="+", default=["drawer-close-v3", "button-press-v3"])
    p.add_argument("--episodes", type=int, default=2, help="episodes per task")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="cap on policy steps (default: 40 for Meta-World, the suite's openvla cap for LIBERO)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--shape",
        choices=["tiny", "7b"],
        default="tiny",
        help="7b: random-init model of OpenVLA-7B's shapes on the GPU (bf16), 224 px input",
    )
    p.add_argument("--render-size", type=int, default=None, help="camera size (default: demo config)")
    p.add_argument(
        "--sequential-episodes",
        type=int,
        default=None,
        help="N = 0 runs only the first K episodes of each task (the same seeds as the "
        "batched modes): the batch-1 loop's cost per episode does not change with K",
    )
    p.add_argument(
        "--groups",
        type=int,
        nargs="+",
        default=[1],
        help="pipeline groups tried for each N > 0 (1 = all envs step together)",
    )
    p.add_argument(
        "--benchmark",
        choices=["metaworld", "libero"],
        default="metaworld",
        help="libero: the real LIBERO simulator, openvla's protocol (init states 0..K-1 per task "
        "as the episodes, 10 wait steps, 256 px camera → 224 px); needs LIBERO installed",
    )
    p.add_argument("--suite", default="libero_spatial", help="LIBERO suite (--benchmark libero)")
    p.add_argument("--num-tasks", type=int, default=None, help="LIBERO: the suite's first K tasks only")
    p.add_argument(
        "--libero-config", default=None, help="LIBERO config dir (LIBERO_CONFIG_PATH); created if missing"
    )
    a = p.parse_args()

    import torch
    import yaml

    from vlaforget.data.instructions import canonical_instruction
    from vlaforget.envs.metaworld import MetaWorldFactory, configure_rendering
    from vlaforget.eval.closed_loop import BackendPolicy
    from vlaforget.eval.rollout import make_episodes, run_episodes
    from vlaforget.models.tiny import random_tiny_backend

    configure_rendering()
    torch.set_num_threads(a.threads)
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    tiny = demo["model"]["tiny"]
    mw = demo["data"]["metaworld"]
    action_dim = 7 if a.benchmark == "libero" else 4
    if a.shape == "7b":
        from vlaforget.models.tiny import seven_b_shape_backend

        torch.manual_seed(0)
        backend = seven_b_shape_backend(device="cuda", dtype=torch.bfloat16, action_dim=action_dim)
        backend.model.eval()
        policy = BackendPolicy(backend, image_size=224)
    else:
        backend = random_tiny_backend(tiny, action_dim=action_dim, seed=0)
        policy = BackendPolicy(backend, image_size=tiny["image_size"])
    if a.benchmark == "libero":
        from vlaforget.envs import libero as L

        L.ensure_libero_config(a.libero_config)  # the workers inherit LIBERO_CONFIG_PATH
        tasks = L.suite_tasks(a.suite, a.libero_config)[: a.num_tasks]
        a.tasks = [t["name"] for t in tasks]
        cap = a.max_steps or L.max_steps_for(a.suite)
        fac = L.LiberoFactory(
            a.suite, config_dir=a.libero_config, resolution=256, image_size=224, max_steps=cap
        )
        eps = make_episodes(
            a.tasks,
            {t["name"]: t["language"] for t in tasks},
            a.episodes,
            lambda t, i: i,
            suite=a.suite,
            max_steps=cap,
        )
    else:
        cap = a.max_steps or 40
        fac = MetaWorldFactory(
            camera=mw["camera"], render_size=a.render_size or mw["render_size"], max_steps=cap
        )
        eps = make_episodes(
            a.tasks, {t: canonical_instruction(t) for t in a.tasks}, a.episodes, lambda t, i: 500000 + i
        )
    rows, ref = [], None
    runs = [(n, g) for n in a.num_envs for g in ([1] if n == 0 else a.groups)]
    for n, g in runs:
        run_eps = eps
        if n == 0 and a.sequential_episodes:
            run_eps = [e for e in eps if e.index < a.sequential_episodes]
        with _DeviceMemory() as mem:  # device-wide: the policy plus the workers' EGL contexts
            res = run_episodes(fac, policy, run_eps, num_envs=n, groups=g)
        digests = {(e["task"], e["seed"]): e["final_digest"] for e in res["episodes"]}
        if ref is None:
            ref = digests
        t = res["timing"]
        steady = t["wall_s"] - t["startup_s"]
        row = {
            **t,
            "success_rate": res["success_rate"],
            "same_trajectories_as_first": sum(digests.get(k) == v for k, v in ref.items()),
            "compared": len(set(ref) & set(digests)),
            "n_episodes": len(run_eps),
            "mean_episode_steps": t["env_steps"] / len(run_eps),
            "episodes_per_hour": 3600 * len(run_eps) / t["wall_s"],
            "episodes_per_hour_after_startup": 3600 * len(run_eps) / steady,
            "num_envs": n,
            "groups": g,
            "peak_device_memory_used_gib": mem.peak_gib,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:  # after every run: a device call cut off at its limit keeps the finished rows
            Path(a.out).write_text(json.dumps(_header(a, torch, mw, cap, rows), indent=2) + "\n")
    return 0


class _DeviceMemory:
    """Peak memory in use on GPU 0 by all processes (cudaMemGetInfo, polled every 0.2 s)."""

    def __init__(self):
        self.peak_gib = None

    def __enter__(self):
        import threading

        import torch

        if not torch.cuda.is_available():
            return self
        self._stop = threading.Event()
        self._peak = 0

        def poll():
            while not self._stop.is_set():
                free, total = torch.cuda.mem_get_info(0)
                self._peak = max(self._peak, total - free)
                self._stop.wait(0.2)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join()
            self.peak_gib = round(self._peak / 2**30, 2)
        return False


def _header(a, torch, mw, cap: int, rows: list) -> dict:
    return {
        "bench": "eval_rollout",
        "benchmark": a.benchmark,
        "suite": a.suite if a.benchmark == "libero" else None,
        "tasks": a.tasks,
        "episodes_per_task": a.episodes,
        "max_steps": cap,
        "threads": a.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
        "model": "7B shape (random init, bf16, cuda)"
        if a.shape == "7b"
        else "tiny (config/demo.yaml sizes, random init)",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "render_size": 256 if a.benchmark == "libero" else a.render_size or mw["render_size"],
        "results": rows,
    }


if __name__ == "__main__":
    sys.exit(main())
