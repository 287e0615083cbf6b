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
