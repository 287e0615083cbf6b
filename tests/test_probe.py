"""Probe set: seeded selection, pooled states at every layer, empty masks, span audit, stage outputs."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml
from methods_fakes import FakeBackend, FakeDataset

from vlaforget.data import probe as probe_mod
from vlaforget.io import read_json
from vlaforget.models import features
from vlaforget.stages import probe as probe_stage

torch.set_num_threads(1)


def test_select_indices_seeded_distinct_sorted():
    a = probe_mod.select_indices(100, 20, 3)
    assert torch.equal(a, probe_mod.select_indices(100, 20, 3))
    assert not torch.equal(a, probe_mod.select_indices(100, 20, 4))
    assert a.unique().numel() == 20 and torch.equal(a, a.sort().values)
    with pytest.raises(ValueError, match="lower probe.n"):
        probe_mod.select_indices(10, 11, 0)
    # CRaFT's anchors are the same seeded selection, capped at the dataset's size
    from vlaforget.methods.craft import select_anchor_indices

    assert torch.equal(select_anchor_indices(100, 20, 3), a)
    g = torch.Generator().manual_seed(3)  # the selection as the anchors stage wrote it before
    assert torch.equal(
        select_anchor_indices(100, 20, 3), torch.sort(torch.randperm(100, generator=g)[:20]).values
    )
    assert torch.equal(select_anchor_indices(10, 50, 1), torch.arange(10))


def test_pooled_states_every_layer_matches_manual_pooling():
    be = FakeBackend()
    ds = FakeDataset(10, empty_every=4)
    samples = [ds[i] for i in range(10)]
    pooled, empty = features.pooled_states(be, samples, 3)
    assert sorted(pooled) == [0, 1, 2, 3] and pooled[2].shape == (10, 16)
    assert empty.tolist() == [i % 4 == 0 for i in range(10)]
    assert torch.equal(pooled[1][0], torch.zeros(16))
    b = be.collate(samples[1:2])
    hs = be.forward(b, output_hidden_states=True).hidden_states
    n_words = len(samples[1]["instruction"].split())
    pos = 1 + be.n_image_tokens  # first instruction token in sequence coords
    assert torch.allclose(pooled[2][1], hs[3][0, pos : pos + n_words].mean(0), atol=1e-6)
    # batch size does not change the result
    pooled1, _ = features.pooled_states(be, samples, 1)
    assert torch.allclose(pooled1[3], pooled[3], atol=1e-6)


def test_audit_spans_decode_masked_tokens():
    class Tok:
        def decode(self, ids):
            from methods_fakes import W0, WORDS

            return " ".join(WORDS[i - W0] if i >= W0 and i - W0 < len(WORDS) else f"<{i}>" for i in ids)

    be = FakeBackend()
    be.tokenizer = Tok()
    ds = FakeDataset(4)
    rows = features.audit_spans(be, [ds[i] for i in range(4)])
    assert all(r["match"] for r in rows)
    assert rows[0]["masked_tokens"] == ds[0]["instruction"]
    assert rows[0]["n_mask_tokens"] == len(ds[0]["instruction"].split())


def test_probe_stage_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("VLAFORGET_NO_PROGRESS", "1")
    ds = FakeDataset(60, empty_every=10)
    monkeypatch.setattr(probe_stage, "open_dataset", lambda block, split="train": ds)
    monkeypatch.setattr(probe_stage, "load_teacher", lambda mb, d=None, device=None: FakeBackend())
    cfg = {
        "stage": "probe",
        "root": str(tmp_path),
        "allowed_root": str(tmp_path),
        "world": "metaworld",
        "code": "x",
        "model": {"backend": "fake"},
        "dataset": {"name": "fake_ds", "cache_dir": str(tmp_path)},
        "n": 30,
        "seed": 1,
        "batch_size": 8,
        "out_dir": str(tmp_path / "probe"),
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert probe_stage.main(argparse.Namespace(config=str(tmp_path / "p.yaml"))) == 0
    p = probe_mod.load_probe(tmp_path / "probe")
    audit = read_json(tmp_path / "probe" / "audit.json")
    idx = probe_mod.select_indices(60, 30, 1)
    assert torch.equal(p["indices"], idx)
    n_empty = sum(int(i) % 10 == 0 for i in idx)
    assert p["n_empty"] == audit["n_empty"] == n_empty > 0
    assert p["hash"] == audit["hash"] == probe_mod.probe_hash(p["indices"], p["pooled"])
    assert audit["spans_checked"] == 10 and audit["layers_pooled"] == [0, 1, 2, 3]
    assert audit["spans"][0]["instruction"] == ds[int(idx[0])]["instruction"]
    # probe hash changes with the data
    pooled2 = {k: v.clone() for k, v in p["pooled"].items()}
    pooled2[0][0, 0] += 1
    assert probe_mod.probe_hash(p["indices"], pooled2) != p["hash"]


def test_probe_stage_all_empty_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VLAFORGET_NO_PROGRESS", "1")
    ds = FakeDataset(8, empty_every=1)
    monkeypatch.setattr(probe_stage, "open_dataset", lambda block, split="train": ds)
    monkeypatch.setattr(probe_stage, "load_teacher", lambda mb, d=None, device=None: FakeBackend())
    cfg = {
        "stage": "probe",
        "root": str(tmp_path),
        "allowed_root": str(tmp_path),
        "world": "metaworld",
        "model": {},
        "dataset": {"name": "x", "cache_dir": str(tmp_path)},
        "n": 4,
        "out_dir": str(tmp_path / "probe"),
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="empty instruction mask"):
        probe_stage.main(argparse.Namespace(config=str(tmp_path / "p.yaml")))
    assert not (tmp_path / "probe" / "audit.json").exists()


def test_open_dataset_missing_cache_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the cache stage"):
        probe_mod.open_dataset({"name": "x", "cache_dir": str(tmp_path / "nope")})
