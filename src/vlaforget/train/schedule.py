"""The learning-rate schedule of fine-tuning and of the tiny teacher's pretraining: linear warm-up,
then constant, cosine or linear decay.

Our own, not transformers' `get_cosine_schedule_with_warmup`: that one warms up as step / warmup
(lr 0 at step 0), ours as (step + 1) / warmup (the first step already trains), and the pretraining
decays to a floor; the runs so far used this one, so it stays.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, total: int, warmup: int = 0, kind: str = "cosine", floor: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) of `total`: (step + 1) / warmup
    during the warm-up, then 1 (constant), or a decay over the remaining steps from 1 to `floor`
    (cosine: floor + (1 − floor)·½(1 + cos πt); linear: 1 − t), t ∈ [0, 1]."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0 - t


def warmup_schedule(
    optimizer, total: int, warmup: int = 0, kind: str = "cosine", floor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, int(total), int(warmup), kind, floor)
    )
