"""CRaFT math (dual update, conflict projection, pooling) and the craft-anchors stage."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml
from methods_fakes import FakeBackend, FakeDataset

from vlaforget.methods import craft
from vlaforget.methods.craft import combine, conflict_project, dual_update, pool_features
from vlaforget.stages import craft_anchors as craft_stage


def test_dual_update():
    assert dual_update(0.0, 0.2, 0.05, 0.1) == pytest.approx(0.015)
    assert dual_update(0.01, 0.0, 0.05, 1.0) == 0.0  # projected onto lambda >= 0
    assert dual_update(0.5, 0.05, 0.05, 1.0) == 0.5


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(2, 2, generator=g)]


def _dot(a, b):
    return sum(float((x.float() * y.float()).sum()) for x, y in zip(a, b) if x is not None and y is not None)


def test_conflict_projection_removes_negative_component():
    gr = _grads(0)
    ga = [-x + 0.1 * y for x, y in zip(gr, _grads(1))]  # strongly conflicting
    out, st = conflict_project(ga, gr)
    assert st["projection"] and st["projected"] and st["grad_dot"] < 0 and st["grad_cos"] < -0.5
    assert abs(_dot(out, gr)) < 1e-4 and _dot(out, gr) >= -1e-4
    assert st["conflict_ratio"] == 1.0 and st["n_tensors"] == 3
    # no conflict -> unchanged; projection off -> unchanged
    out2, st2 = conflict_project(gr, gr)
    assert (
        not st2["projected"]
        and all(a is b for a, b in zip(out2, gr))
        and st2["grad_cos"] == pytest.approx(1.0)
    )
    out3, st3 = conflict_project(ga, gr, projection=False)
    assert not st3["projected"] and all(a is b for a, b in zip(out3, ga))


def test_conflict_ratio_per_tensor_and_none_grads():
    gr = _grads(0)
    ga = [gr[0], -gr[1], None]
    out, st = conflict_project(ga, gr)
    assert st["n_tensors"] == 2 and st["conflict_ratio"] == 0.5
    assert _dot(out, gr) >= -1e-5
    g = combine(out, gr, 0.5)
    assert g[2] is not None and torch.allclose(g[2], (out[2] if out[2] is not None else 0) + 0.5 * gr[2])
    with pytest.raises(ValueError):
        conflict_project(ga[:2], gr)


def test_conflict_projection_bf16():
    gr = [t.bfloat16() for t in _grads(0)]
    ga = [(-t).bfloat16() for t in _grads(0)]
    out, st = conflict_project(ga, gr)
    assert out[0].dtype == torch.bfloat16 and st["projected"]
    assert abs(_dot(out, gr)) < 0.05 * st["g_ret_norm"] ** 2


def test_pool_features():
    be = FakeBackend()
    ds = FakeDataset(3)
    batch = be.collate([ds[i] for i in range(3)])
    h = torch.randn(3, batch["instruction_mask"].shape[1], 16)
    n = be.n_image_tokens
    assert torch.allclose(pool_features(h, batch, "mean_image_tokens", n), h[:, 1 : 1 + n].mean(1))
    im = batch["instruction_mask"]
    assert torch.allclose(
        pool_features(h, batch, "mean_instruction_tokens", n)[0], h[0][im[0]].mean(0), atol=1e-6
    )
    # mean_all: the prompt only -- <s>, patches, instruction, separator; not the ground-truth action
    # tokens nor </s> (issue 14.5: the old mean_all averaged them in)
    P0 = n + 2 + len(ds[0]["instruction"].split())  # FakeBackend text: <s> words <sep> | actions </s>
    assert torch.allclose(pool_features(h, batch, "mean_all", n)[0], h[0, :P0].mean(0), atol=1e-6)
    assert batch["input_ids"][0, P0 - n].item() >= be.vocab - be.n_bins  # the first excluded = an action
    with pytest.raises(ValueError):
        pool_features(h, batch, "cls", n)


def _run_anchors(tmp_path, monkeypatch, sub, pooling="mean_image_tokens"):
    monkeypatch.setenv("VLAFORGET_NO_PROGRESS", "1")
    ds = FakeDataset(40)
    monkeypatch.setattr(craft_stage, "open_dataset", lambda block, split="train": ds)
    monkeypatch.setattr(craft_stage, "load_teacher", lambda mb, d: FakeBackend())
    cfg = {
        "stage": "craft_anchors",
        "root": str(tmp_path),
        "allowed_root": str(tmp_path),
        "world": "metaworld",
        "model": {},
        "dataset": {"name": "fake_ds", "cache_dir": str(tmp_path)},
        "seed": 3,
        "craft": {"layer": -2, "pooling": pooling, "n_anchors": 16, "batch_size": 5},
        "out_dir": str(tmp_path / sub),
    }
    (tmp_path / f"{sub}.yaml").write_text(yaml.safe_dump(cfg))
    assert craft_stage.main(argparse.Namespace(config=str(tmp_path / f"{sub}.yaml"))) == 0
    return craft.load_anchors(tmp_path / sub), ds


def test_anchors_stage_features_and_determinism(tmp_path, monkeypatch):
    a, ds = _run_anchors(tmp_path, monkeypatch, "a")
    b, _ = _run_anchors(tmp_path, monkeypatch, "b")
    assert a["features"].shape == (16, 16) and a["layer"] == -2 and a["layer_abs"] == 3
    assert set(a["features_by_pooling"]) == set(craft.POOLINGS)
    assert a["hash"] == b["hash"] and torch.equal(a["features"], b["features"])
    # features = teacher hidden_states[-2] pooled over image tokens, recomputed here
    be = FakeBackend()
    i = int(a["indices"][2])
    batch = be.collate([ds[i]])
    h = be.forward(batch, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(a["features"][2], h[0, 1 : 1 + be.n_image_tokens].mean(0), atol=1e-6)
    # retention loss is 0 for the teacher itself
    assert float(craft.retention_loss(h[:, 1:3].mean(1).detach(), a["features"][2:3])) < 1e-10


# ----------------------------------------------------------------------------- fused task + anchor pass


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from train_fixtures import teacher_world

    return teacher_world(tmp_path_factory, "craft_fused")


def _one_step_grads(world, fused: bool, precision: str = "fp32", ckpt: bool = True, accum: int = 2):
    """One CRaFT step (accum micro-batches, then before_step) on the tiny backend: the inputs of
    conflict_project (g_act, g_ret), the final .grad and the plug-in's statistics."""
    from unittest import mock

    from train_fixtures import CRAFT_TEST

    from vlaforget.data.cache import CachedDataset
    from vlaforget.methods.craft import load_anchors
    from vlaforget.models import load_backend
    from vlaforget.train.loop import apply_lora, autocast_factory, make_scaler
    from vlaforget.train.plugins import CraftPlugin, TrainContext, forward_micro

    root, cache, model_dir = world
    ds = CachedDataset(str(cache), split="train")
    be = load_backend({"backend": "tiny", "path": str(model_dir), "dtype": "fp32"}, stats=ds.statistics)
    if ckpt:
        be.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(
        be,
        {
            "r": 4,
            "alpha": 8,
            "dropout": 0.0,
            "targets": ["attn", "mlp", "vision", "projector"],
            "layers": "all",
        },
        seed=1,
    )
    model.train()
    with torch.no_grad():  # LoRA B starts at zero: move it so g_ret is not all zeros
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    dev = torch.device("cpu")
    tcfg = {
        "precision": precision,
        "batch_size": 3,
        "max_steps": 1,
        "lr": 1e-3,
        "lora": {"r": 4},
    }  # a whole train block (make_scaler checks it)
    ctx = TrainContext(
        backend=be,
        model=model,
        device=dev,
        stage_cfg={"train": tcfg},
        trainable=trainable,
        autocast=autocast_factory(precision, dev),
        scaler=make_scaler(tcfg, dev),
    )
    anchors = load_anchors(root / "artifacts" / "craft")
    samples = [ds[int(i)] for i in anchors["indices"]]  # the cache's train split holds them
    plug = CraftPlugin(
        ctx, dict(CRAFT_TEST, anchor_batch_size=5, fused_forward=fused), anchors, samples, seed=1
    )
    ctx.plugins = {"craft": plug}
    seen = {}
    real = craft.conflict_project

    def spy(ga, gr, **kw):
        seen["g_act"] = [None if g is None else g.clone() for g in ga]
        seen["g_ret"] = [None if g is None else g.clone() for g in gr]
        return real(ga, gr, **kw)

    for i in range(accum):
        batch = be.collate([ds[j] for j in range(3 * i, 3 * i + 3 + i)])  # micro-batches of 3 and 4 samples
        with ctx.autocast():
            out = forward_micro(ctx.plugins, be, batch, model, last=i == accum - 1)
            losses = {"act": be.action_metrics(batch, out.logits)["loss"]}
        if not plug.backward(losses, 1.0 / accum):
            loss = losses["act"] / accum
            (ctx.scaler.scale(loss) if ctx.scaler else loss).backward()
    with mock.patch.object(craft, "conflict_project", spy):
        if ctx.scaler is not None:
            opt = torch.optim.SGD([p for _, p in trainable], lr=0.0)
            ctx.scaler.unscale_(opt)
        plug.before_step()
    assert plug._split is None and all(
        "forward" not in m.__dict__ for m in model.modules()
    )  # shadows removed
    return seen, [p.grad.clone() for _, p in trainable], dict(plug._acc), [n for n, _ in trainable]


def _close(a, b, rtol, atol):
    return all(
        (x is None and y is None)
        or (x is not None and y is not None and torch.allclose(x, y, rtol=rtol, atol=atol))
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("precision,ckpt", [("fp32", True), ("fp32", False), ("fp16", True), ("bf16", True)])
def test_fused_task_anchor_pass_gives_the_separate_passes_gradients(teacher, precision, ckpt):
    """One forward of [task; anchor] rows and one backward (shadow LoRA weights for the anchor rows)
    gives the g_act, g_ret, projection, λ-sum and statistics of the separate retention forward +
    autograd.grad, with gradient checkpointing, grad accumulation and fp16 loss scaling."""
    a_seen, a_grad, a_acc, _names = _one_step_grads(teacher, fused=True, precision=precision, ckpt=ckpt)
    b_seen, b_grad, b_acc, _ = _one_step_grads(teacher, fused=False, precision=precision, ckpt=ckpt)
    tol = {"rtol": 1e-4, "atol": 1e-6} if precision == "fp32" else {"rtol": 2e-2, "atol": 1e-4}
    # parameters after the anchor layer get no retention gradient on either path (None, not zeros)
    assert [g is None for g in a_seen["g_ret"]] == [g is None for g in b_seen["g_ret"]]
    assert any(g is None for g in b_seen["g_ret"]) and any(g is not None for g in b_seen["g_ret"])
    assert _close(a_seen["g_act"], b_seen["g_act"], **tol)
    assert _close(a_seen["g_ret"], b_seen["g_ret"], **tol)
    assert _close(a_grad, b_grad, **tol)
    assert a_acc["L_ret"] == pytest.approx(b_acc["L_ret"], rel=tol["rtol"], abs=1e-7)
    assert a_acc["grad_dot"] == pytest.approx(b_acc["grad_dot"], rel=10 * tol["rtol"], abs=1e-9)
    assert a_acc["conflict_ratio"] == b_acc["conflict_ratio"] and a_acc["projection"] == b_acc["projection"]
    assert float(sum(g.abs().sum() for g in b_seen["g_ret"] if g is not None)) > 0


def test_fused_run_matches_the_separate_run(teacher):
    """Whole runs (3 steps, checkpointing, accum 2): the same logged CRaFT statistics and adapter."""
    from pathlib import Path

    from train_fixtures import CRAFT_TEST, base_stage, clone, run_adapter, run_metrics

    from vlaforget.train.loop import run_training

    root, cache, model = teacher
    runs = []
    for fused in (True, False):
        sc = base_stage(
            root,
            cache,
            model,
            method_name="craft",
            max_steps=3,
            grad_accum=2,
            batch_size=3,
            gradient_checkpointing=True,
            method={"craft": dict(CRAFT_TEST, anchor_batch_size=5, fused_forward=fused)},
        )
        sc = clone(sc, out_dir=str(Path(sc["out_dir"]).parent / f"fused_{fused}"), run_id=f"fused-{fused}")
        run_training(sc)
        runs.append((run_metrics(sc), run_adapter(sc)))
    (ma, pa), (mb, pb) = runs
    assert [r["craft_fused"] for r in ma] == [1.0] * 3 and [r["craft_fused"] for r in mb] == [0.0] * 3
    for ra, rb in zip(ma, mb):
        for k in ("train_loss", "L_ret", "lambda", "grad_cos"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-7), k
        assert ra["conflict_ratio"] == rb["conflict_ratio"] and ra["projection"] == rb["projection"]
    assert pa.keys() == pb.keys() and all(torch.allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6) for k in pa)


def test_concat_batches_pads_the_shorter_text():
    from vlaforget.models.tiny import random_tiny_backend

    be = random_tiny_backend()
    rows = [
        {
            "image": torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(),
            "instruction": instr,
            "action": torch.zeros(4).numpy(),
        }
        for instr in ("open the drawer", "press the button from the top")
    ]
    a, b = be.collate(rows[:1]), be.collate(rows[1:])
    assert a["input_ids"].shape[1] < b["input_ids"].shape[1]
    m = be.concat_batches(a, b)
    t = b["input_ids"].shape[1]
    assert m["input_ids"].shape == (2, t) and m["action_mask"].shape == (2, t + be.n_image_tokens)
    with torch.no_grad():  # right padding: the short row's logits are the ones it has alone
        la = be.forward(a).logits
        lm = be.forward(m).logits
    assert torch.allclose(lm[0, : la.shape[1]], la[0], atol=1e-5)
    assert int(m["attention_mask"][0].sum()) == int(a["attention_mask"][0].sum())
    assert (m["labels"][0, a["labels"].shape[1] :] == -100).all()


def test_dual_defaults_are_the_openvla_craft_guides():
    """Issue 26.7: epsilon 0.05, lambda_lr 1e-4, lambda_init 0 (craft_openvla_guide.md §2), in the typed
    settings and in config/config.yaml's craft method."""
    from pathlib import Path

    from vlaforget.settings import CraftSettings

    c = CraftSettings()
    assert (c.epsilon, c.lambda_lr, c.lambda_init) == (0.05, 1e-4, 0.0)
    cfg = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    block = cfg["methods"]["craft"]["craft"]
    assert (block["epsilon"], block["lambda_lr"], block["lambda_init"]) == (0.05, 1e-4, 0.0)
    # after T steps at a constant excess e, lambda = lambda_lr * T * e
    lam = 0.0
    for _ in range(10000):
        lam = dual_update(lam, 0.15, c.epsilon, c.lambda_lr)
    assert lam == pytest.approx(0.1)
