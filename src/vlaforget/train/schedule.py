"""The learning-rate schedule of fine-tuning and of the tiny teacher's pretraining: linear warm-up,
then constant, cosine or linear decay.

Our own, not transformers' `get_cosine_schedule_with_warmup` / `get_cosine_with_min_lr_schedule_with_warmup`
(both in transformers 4.40.1): those warm up as step / warmup (lr 0 at step 0), ours as
(step + 1) / warmup (the first step already trains) and holds the floor after `total`. Ours is the
user's own: vla-scripts/finetune.py's cosine lambda in eggplantsalt/icms (warm-up (step + 1) / warmup,
then min_ratio + (1 − min_ratio)·½(1 + cos π·min(1, t))) is `lr_factor(kind="cosine", floor=min_ratio)`
step for step (tests/test_schedule.py compares them); transformers' min-lr schedule differs from it
in every warm-up step.
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
    optimizer, total: int, warmup: int = 0, kind: str = "cosine", floor: float = 0.0, start: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR of lr_factor. start = n > 0: the schedule continues at step n (a run that starts from
    an adapter trained n steps, train.init_step): the first update uses lr_factor(n)."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")

    def fn(step):
        return lr_factor(step, int(total), int(warmup), kind, floor)

    if not start:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
    for g in optimizer.param_groups:  # LambdaLR's resume path: it steps once, to last_epoch = start
        g.setdefault("initial_lr", g["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn, last_epoch=int(start) - 1)
