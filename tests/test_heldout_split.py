"""data.heldout (issue 14.4 follow-up): episodes stored task by task, as LIBERO's RLDS stores them, are
held out per task, so the held-out split and the probe drawn from it cover every task; `tail` is
openvla's train[:95%] exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_fixtures import make_model, run_stage

from vlaforget.data.cache import (
    CachedDataset,
    heldout_split,
    n_train_episodes,
    write_cache,
)
from vlaforget.io import read_json, write_json

torch.set_num_threads(1)

TASKS4 = {
    "drawer-open-v3": "open the drawer",
    "button-press-v3": "press the button",
    "door-open-v3": "open the door",
    "plate-slide-v3": "slide the plate",
}


def task_by_task(n_per_task=10, T=4, size=32, seed=0, tasks=TASKS4):
    """Episodes stored task by task (LIBERO's RLDS order): all of task 0, then all of task 1, ..."""
    rng = np.random.default_rng(seed)
    return [
        {
            "images": rng.integers(0, 255, (T, size, size, 3), dtype=np.uint8),
            "states": rng.normal(size=(T, 4)).astype(np.float32),
            "actions": np.clip(rng.normal(scale=0.5, size=(T, 4)), -1, 1).astype(np.float32),
            "instruction": instr,
            "task": task,
            "seed": k,
        }
        for task, instr in tasks.items()
        for k in range(n_per_task)
    ]


def _cache(tmp_path, eps, heldout=None, ts=0.95, name="toy"):
    kw = {} if heldout is None else {"heldout": heldout}
    out = tmp_path / f"cache_{heldout}"
    m = write_cache(
        eps, out, name, image_size=eps[0]["images"].shape[1], train_split=ts, transform="metaworld", **kw
    )
    return out, m


def test_default_holds_out_every_task_and_partitions_the_episodes(tmp_path):
    eps = task_by_task()  # 4 tasks x 10: the tail (round(0.95 * 40) = 38) would hold out 2 of one task
    d, m = _cache(tmp_path, eps)
    tr, ho, al = (CachedDataset(d, s) for s in ("train", "heldout", "all"))
    assert m["heldout"] == m["heldout_used"] == "per_task" and m["heldout_note"] is None
    assert ho.tasks == tr.tasks == sorted(TASKS4) and m["heldout_tasks"] == sorted(TASKS4)
    # each task: its last max(1, round(0.05 * 10)) = 1 episode is held out
    assert [e["index"] for e in ho.episodes] == [9, 19, 29, 39] == m["heldout_episodes"]
    ti, hi = {e["index"] for e in tr.episodes}, {e["index"] for e in ho.episodes}
    assert not ti & hi and ti | hi == set(range(40)) and m["num_train_episodes"] == 36
    assert len(tr) + len(ho) == len(al)
    # statistics stay over "all"
    assert read_json(d / "dataset_statistics.json")["toy"]["num_trajectories"] == 40
    # few-shot subsets come from the per-task train split
    for shots in (1, 9):
        fs = CachedDataset(d, "train", shots=shots, seed=2)
        assert {e["index"] for e in fs.episodes} <= ti and len(fs.episodes) == 4 * shots
    with pytest.raises(ValueError, match="only 9 train episodes"):
        CachedDataset(d, "train", shots=10)


def test_tail_reproduces_openvlas_split_exactly(tmp_path):
    eps = task_by_task()
    d, m = _cache(tmp_path, eps, heldout="tail")
    n_train = n_train_episodes(40, 0.95)
    tr, ho = CachedDataset(d, "train"), CachedDataset(d, "heldout")
    assert [e["index"] for e in tr.episodes] == list(range(n_train)) == list(range(38))
    assert [e["index"] for e in ho.episodes] == [38, 39]
    assert ho.tasks == ["plate-slide-v3"] and m["heldout_used"] == "tail"  # why per_task is the default
    for n, ts in ((20, 0.95), (7, 0.5), (3, 0.9), (5, 1.0)):
        fake = [{"task": f"t{i % 2}"} for i in range(n)]
        assert heldout_split(fake, ts, "tail")["heldout_episodes"] == list(range(n_train_episodes(n, ts), n))


def test_per_task_rule_edge_cases():
    eps = [{"task": "a"}] * 7 + [{"task": "b"}] * 3 + [{"task": "c"}]
    s = heldout_split(eps, 0.75, "per_task")
    # a: round(0.25 * 7) = 2, b: max(1, round(0.75)) = 1, c: one episode stays in train
    assert s["heldout_episodes"] == [5, 6, 9] and "single episode" in s["note"]
    assert heldout_split(eps, 1.0, "per_task")["heldout_episodes"] == []
    with pytest.raises(ValueError, match="data.heldout"):
        heldout_split(eps, 0.9, "random")


def test_no_task_info_falls_back_to_tail_and_says_so(tmp_path):
    eps = task_by_task(n_per_task=5)
    for e in eps:
        e["task"] = ""
    _d, m = _cache(tmp_path, eps)
    assert m["heldout"] == "per_task" and m["heldout_used"] == "tail" and "no task" in m["heldout_note"]
    assert m["heldout_episodes"] == [19]


def test_format_2_cache_is_refused(tmp_path):
    d, m = _cache(tmp_path, task_by_task(n_per_task=2))
    write_json(d / "manifest.json", dict(m, format=2))
    with pytest.raises(ValueError, match="format-2 dataset cache.*rerun the cache stage"):
        CachedDataset(d, "train")


def test_probe_from_the_heldout_split_covers_every_task(tmp_path):
    from vlaforget.data.probe import cache_rows, check_not_trained_on, load_probe
    from vlaforget.stages import probe

    eps = task_by_task(n_per_task=10, T=6)
    d, _ = _cache(tmp_path, eps)
    model = make_model(tmp_path)
    mb = {
        "backend": "tiny",
        "base": "tiny",
        "path": str(model),
        "dtype": "fp32",
        "cache_dir": str(tmp_path / "hf_cache"),
    }
    ds = {"name": "toy", "cache_dir": str(d), "tasks": sorted(TASKS4)}
    run_stage(
        probe,
        {
            "root": str(tmp_path),
            "allowed_root": str(tmp_path),
            "world": "metaworld",
            "code": "x",
            "stage": "probe",
            "model": mb,
            "dataset": ds,
            "n": 16,
            "seed": 0,
            "split": "heldout",
            "trained_suites": ["toy"],
            "batch_size": 8,
            "out_dir": str(tmp_path / "probe"),
        },
        tmp_path / "probe.yaml",
    )
    p = load_probe(tmp_path / "probe")
    audit = read_json(tmp_path / "probe" / "audit.json")
    assert p["source"]["tasks"] == sorted(TASKS4) == audit["source"]["tasks"]
    assert p["source"]["probe_tasks"] == sorted(TASKS4)  # the drawn samples cover every task
    assert sum(p["source"]["probe_per_task"].values()) == 16 and p["source"]["heldout"] == "per_task"
    assert {s for s in p["instructions"]} == set(TASKS4.values())
    prow = cache_rows(CachedDataset(d, "heldout"), p["indices"])
    for shots in (None, 3):
        tr = CachedDataset(d, "train", shots=shots, seed=1)
        assert not prow & cache_rows(tr, range(len(tr)))
        check_not_trained_on(p, tr)  # no error


def test_probe_capacity_counts_the_probe_split(tmp_path, monkeypatch):
    """validation: probe.n is checked against the split the probe is drawn from (per data.heldout)."""
    from vlaforget import validation
    from vlaforget.validation import _probe_capacity

    class Lay:
        def cache(self, ds):
            return tmp_path / "nocache" / ds

    monkeypatch.setattr(validation, "Layout", lambda root: Lay())  # validation reads paths.Layout, not config
    mw = {"episodes_per_task": 24, "max_steps": 10, "datasets": {"mw": ["a", "b", "c", "d"]}}
    cfg = {
        "world": "metaworld",
        "probe": {"dataset": "mw", "split": "heldout"},
        "data": {"train_split": 0.95, "metaworld": mw},
    }
    assert _probe_capacity(cfg)[0] == 4 * 10  # one held-out episode per task
    cfg["data"]["heldout"] = "tail"
    assert _probe_capacity(cfg)[0] == 5 * 10  # 96 - round(0.95 * 96)
    cfg["probe"]["split"] = "train"
    assert _probe_capacity(cfg)[0] == 91 * 10
    # from a built cache
    d, _ = _cache(tmp_path, task_by_task(n_per_task=10, T=4))
    monkeypatch.setattr(Lay, "cache", lambda self, ds: d)
    cfg["probe"]["split"] = "heldout"
    assert _probe_capacity(cfg)[0] == 4 * 4
