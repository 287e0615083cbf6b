"""Benchmark: GPU memory and time of one batched policy call at OpenVLA-7B shape, per batch size.

    python3 bench/policy_memory.py --batches 1 8 16 32 48 64 --out policy_memory.json

The evaluation engine makes one `BackendPolicy` call per control step over `eval.num_envs` envs, so
the batch is N. This measures, for each N, the peak GPU memory of that call (weights included) and
its time (median of `--reps` calls after one warm-up), with the 7B-shape random-init model in bf16
(`seven_b_shape_backend`: Llama-2-7B decoder + a SigLIP-so400m-shaped tower; OpenVLA's fused
DINOv2 + SigLIP tower has ~0.3 B more parameters, ~0.6 GB in bf16). Random 224 px images and
LIBERO-like instructions; the cost does not depend on the weights. Use it to size `eval.num_envs`
for a GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--action-dim", type=int, default=7)
    p.add_argument("--out", default=None)
    a = p.parse_args()

    import numpy as np
    import torch

    from vlaforget.eval.closed_loop import BackendPolicy
    from vlaforget.models.tiny import seven_b_shape_backend

    torch.manual_seed(0)
    backend = seven_b_shape_backend(device="cuda", dtype=torch.bfloat16, action_dim=a.action_dim)
    backend.model.eval()
    policy = BackendPolicy(backend, image_size=224)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    rng = np.random.default_rng(0)
    words = "pick up the black bowl next to the plate and place it on the cookie box".split()
    rows = []
    for b in a.batches:
        images = rng.integers(0, 256, size=(b, 224, 224, 3), dtype=np.uint8)
        instr = [" ".join(words[: 8 + i % 7]) for i in range(b)]
        row = {"batch": b}
        try:
            policy(images, instr)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(a.reps):
                t = time.perf_counter()
                policy(images, instr)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            ms = 1000 * statistics.median(times)
            row.update(
                ms_per_call=round(ms, 1),
                ms_per_sample=round(ms / b, 2),
                peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
            )
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
        out = {
            "bench": "policy_memory",
            "device": torch.cuda.get_device_name(0),
            "model": "7B shape (random init, bf16)",
            "weights_gib": round(weights / 2**30, 2),
            "results": rows,
        }
        if a.out:
            Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
