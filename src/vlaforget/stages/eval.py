"""Recipe `vlaforget eval`: closed-loop evaluation of a run (or the teacher) on one suite
(eval/closed_loop.py builds the episodes and the policy, eval/rollout.py runs them); out_file last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..eval.closed_loop import BackendPolicy, build_episodes, load_stats, log
from ..eval.rollout import run_episodes
from ..gpus import pick_device
from ..io import provenance, write_json
from ..precision import exact_fp32
from ..settings import EvalSettings
from ..stagefile import load_stage_config


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="stage config (vlaforget stage-config eval RUN@SUITE)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--num-envs",
        type=int,
        default=None,
        help="override eval.num_envs (0 = the batch-1 sequential reference loop)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def main(args) -> int:
    sc = load_stage_config(args.config, "eval")
    e = EvalSettings.of(sc["eval"])
    out_file = Path(sc["out_file"])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    exact_fp32((sc.get("model") or {}).get("dtype"))  # no TF32 for an fp32 model on CUDA (precision.py)
    if e.videos_per_task > 0:
        from ..eval.video import check_video_backend

        check_video_backend()  # before any rollout: a missing ffmpeg must not cost the episodes
    t0 = time.perf_counter()
    fac, episodes, protocol = build_episodes(sc["world"], sc["suite"], e)

    from ..models import load_backend

    stats = load_stats(e)
    model_block = dict(sc["model"])
    if stats is None:
        model_block.setdefault("unnorm_key", e.unnorm_dataset)
        log.info("no statistics file at %s: using the model's own statistics", e.stats_path)
    backend = load_backend(model_block, device=device, adapter_dir=sc.get("adapter_dir"), stats=stats)
    load_s = time.perf_counter() - t0
    policy = BackendPolicy(backend, image_size=e.image_size, center_crop=e.center_crop)
    num_envs = e.num_envs if args.num_envs is None else args.num_envs
    video_dir = out_file.parent / "videos" / out_file.stem  # evals/{run}/{suite}/videos/{config id}
    log.info(
        "eval %s on %s: %d episodes, %d envs, device %s",
        sc["run_name"],
        sc["suite"],
        len(episodes),
        num_envs,
        device,
    )
    res = run_episodes(
        fac,
        policy,
        episodes,
        num_envs=num_envs,
        video_dir=video_dir,
        fps=30 if protocol["world"] == "libero" else 20,
        desc=f"eval {sc['suite']}",
        groups=e.pipeline_groups,
    )
    res["timing"]["load_s"] = round(load_s, 3)
    out = {
        "run": sc["run_name"],
        "suite": sc["suite"],
        "world": sc["world"],
        "adapter_dir": sc.get("adapter_dir"),
        "device": device,
        "protocol": protocol,
        "episodes_per_task": e.episodes_per_task,
        "center_crop": e.center_crop,
        "stats": "suite" if stats is not None else "model",
        **res,
        "provenance": {**provenance(), "stage_code": sc.get("code")},
    }
    write_json(out_file, out)  # the completion file, last
    log.info(
        "%s@%s: success %.3f over %d episodes (%.1f ms/env step)",
        sc["run_name"],
        sc["suite"],
        out["success_rate"],
        out["n_episodes"],
        res["timing"]["ms_per_env_step"],
    )
    return 0
