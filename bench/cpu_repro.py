"""Issue 27 item 7: are the embedded study's CPU numbers the same on another x86 machine?

Pretrains the tiny VLA at config/demo.yaml's size and recipe (random init, synthetic demonstrations,
no VQA) for STEPS steps and prints a digest of the final weights, the last loss and the kernel families
torch reports. Run it under different CPU kernel settings (docs/benchmarks.md "Issue 27: CPU
reproducibility"):

    .venv/bin/python bench/cpu_repro.py STEPS [BATCH [THREADS]]   # this machine's own kernels
    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 DNNL_MAX_CPU_ISA=AVX2 .venv/bin/python bench/cpu_repro.py 100
    MKL_ENABLE_INSTRUCTIONS=AVX2 ...                              # what an AVX2-only machine's MKL does
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import yaml

from vlaforget.models.tiny import random_tiny_backend
from vlaforget.train.pretrain import pretrain


def main(steps: int, batch: int | None = None, threads: int | None = None) -> None:
    with open("config/demo.yaml") as f:
        demo = yaml.safe_load(f)
    tiny, pcfg = demo["model"]["tiny"], dict(demo["model"]["pretrain"])
    torch.set_num_threads(int(threads or pcfg.pop("threads", 2)))
    pcfg.pop("threads", None)
    if batch:
        pcfg["batch_size"] = batch
    if os.environ.get("VLAFORGET_DETERMINISTIC") == "1":
        torch.use_deterministic_algorithms(True)
    backend = random_tiny_backend(tiny, action_dim=4, seed=0)
    rng = np.random.default_rng(0)
    words = ["open the drawer", "close the drawer", "open the faucet", "close the faucet"]
    size = int(tiny["image_size"])
    data = [
        {
            "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "instruction": words[i % 4],
            "action": rng.uniform(-1, 1, 4).astype(np.float32),
        }
        for i in range(256)
    ]
    pcfg.update(steps=steps, vqa_fraction=0.0)
    t0 = time.time()
    hist = pretrain(backend, data, [], pcfg, image_aug=False)
    h = hashlib.sha256()
    for k, v in sorted(backend.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    print(
        json.dumps(
            {
                "steps": steps,
                "batch_size": pcfg["batch_size"],
                "threads": torch.get_num_threads(),
                "seconds": round(time.time() - t0, 2),
                "weights_sha256": h.hexdigest()[:16],
                "last_bc_loss": hist["bc_loss"][-1],
                "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "env": {
                    k: os.environ[k]
                    for k in (
                        "ATEN_CPU_CAPABILITY",
                        "MKL_CBWR",
                        "DNNL_MAX_CPU_ISA",
                        "MKL_ENABLE_INSTRUCTIONS",
                        "VLAFORGET_DETERMINISTIC",
                    )
                    if k in os.environ
                },
            }
        )
    )


if __name__ == "__main__":
    a = [int(x) for x in sys.argv[1:4]]  # STEPS [BATCH [THREADS]]
    main(*(a or [100]))
