"""The one lr schedule (train/schedule.py) of fine-tuning and pretraining: bit-identical to the two
formulas it replaced, and why it is not transformers' cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from vlaforget.train.schedule import lr_factor, warmup_schedule


def old_finetune(step, total, warm, kind):  # train/loop.py make_schedule before
    if warm and step < warm:
        return (step + 1) / warm
    if kind == "constant":
        return 1.0
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1.0 - frac


def old_pretrain(step, steps, warmup):  # train/pretrain.py _lr_lambda before
    if step < warmup:
        return (step + 1) / max(1, warmup)
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("total,warm", [(1, 0), (37, 0), (37, 5), (200, 10), (10, 10)])
def test_finetune_schedule_is_bit_identical(kind, total, warm):
    for step in range(total + 3):
        assert lr_factor(step, total, warm, kind) == old_finetune(step, total, warm, kind)


@pytest.mark.parametrize("steps", [1, 20, 333, 1500])
def test_pretrain_schedule_is_bit_identical(steps):
    warm = max(1, int(0.05 * steps))
    for step in range(steps + 3):
        assert lr_factor(step, steps, warm, "cosine", floor=0.1) == old_pretrain(step, steps, warm)


def test_scheduler_steps_the_optimizer_and_differs_from_transformers():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_schedule(opt, 20, 4, "cosine")
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.5, 1.0, 1.5, 2.0] and lrs[4] == 2.0 and lrs[-1] < 0.1
    transformers = pytest.importorskip("transformers")
    opt2 = torch.optim.SGD([p], lr=2.0)
    hf = transformers.get_cosine_schedule_with_warmup(opt2, 4, 20)
    assert hf.lr_lambdas[0](0) == 0.0 != lr_factor(0, 20, 4)  # HF's warm-up starts at lr 0
    with pytest.raises(ValueError, match="lr schedule"):
        warmup_schedule(opt, 20, 0, "cosin")
