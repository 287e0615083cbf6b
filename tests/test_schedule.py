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


def user_lr_lambda(step, cfg):
    """vla-scripts/finetune.py of eggplantsalt/icms (the user's recipe), verbatim but for `cfg`."""
    total_steps = max(1, cfg["max_steps"])
    warmup_steps = max(0, cfg["lr_warmup_steps"])
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    min_ratio = cfg["min_learning_rate"] / cfg["learning_rate"]
    return min_ratio + (1.0 - min_ratio) * cosine


USER = {"max_steps": 10000, "lr_warmup_steps": 20, "learning_rate": 2e-4, "min_learning_rate": 5e-5}
RECIPE_TRAIN = {
    "max_steps": 10000,
    "batch_size": 2,
    "lr": 2e-4,
    "lr_schedule": "cosine",
    "warmup_steps": 20,
    "min_lr": 5e-5,
    "lora": {"r": 16},
}


def _lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_recipe_schedule_equals_the_users_lambda():
    """train.lr_schedule cosine + warmup_steps + min_lr (config/user_recipe.yaml) gives, at every
    optimizer step, the lr of the user's LambdaLR: lr · lr_lambda(step)."""
    from vlaforget.train.loop import make_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=RECIPE_TRAIN["lr"])
    ours = _lrs(make_schedule(opt, RECIPE_TRAIN), opt, USER["max_steps"] + 2)
    q = torch.nn.Parameter(torch.zeros(1))
    uopt = torch.optim.AdamW([q], lr=USER["learning_rate"])
    usched = torch.optim.lr_scheduler.LambdaLR(uopt, lr_lambda=lambda s: user_lr_lambda(s, USER))
    theirs = _lrs(usched, uopt, USER["max_steps"] + 2)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0)
    assert ours[0] == pytest.approx(2e-4 / 20) and ours[19] == pytest.approx(2e-4)
    assert ours[-3] == pytest.approx(5e-5)  # the floor at the last step, held after it
    # without min_lr the same schedule decays to 0: the key is read
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    assert _lrs(make_schedule(opt2, {**RECIPE_TRAIN, "min_lr": None}), opt2, 10000)[-1] < 1e-8


def test_transformers_min_lr_schedule_differs_in_the_warmup():
    """Why not transformers' get_cosine_with_min_lr_schedule_with_warmup: it starts at lr 0 (step /
    warmup), the user's at lr / warmup; after the warm-up they agree."""
    tr = pytest.importorskip("transformers.optimization")
    if not hasattr(tr, "get_cosine_with_min_lr_schedule_with_warmup"):
        pytest.skip("this transformers has no get_cosine_with_min_lr_schedule_with_warmup")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    s = tr.get_cosine_with_min_lr_schedule_with_warmup(opt, 20, 10000, min_lr=5e-5)
    lrs = _lrs(s, opt, 10000)
    user = [2e-4 * user_lr_lambda(k, USER) for k in range(10000)]
    assert lrs[0] == 0.0 and user[0] == pytest.approx(1e-5)
    assert lrs[20:] == pytest.approx(user[20:], rel=1e-9)
    assert all(a != pytest.approx(b) for a, b in zip(lrs[:20], user[:20]))


@pytest.mark.parametrize("start", [1, 20, 500, 9999])
def test_schedule_continues_from_init_step(start):
    """train.init_step = n: the first update uses the lr of step n of the whole schedule."""
    from vlaforget.train.loop import make_schedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    whole = _lrs(make_schedule(opt, RECIPE_TRAIN), opt, 10000)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    cont = _lrs(make_schedule(opt2, RECIPE_TRAIN, start=start), opt2, 10000 - start)
    assert cont == pytest.approx(whole[start:], rel=1e-12)
