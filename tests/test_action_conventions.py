"""Action conventions end to end: a demo step round-tripped cache -> action tokens -> decode ->
the eval's conversion sends the demo's own command to the simulator (LIBERO and Meta-World), and the
statistics are computed after each dataset's transform, over all episodes (as openvla does)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vlaforget.data.cache import CACHE_FORMAT, CachedDataset, write_cache
from vlaforget.data.transforms import DATASET_TRANSFORMS, TRANSFORMS, resolve_transform
from vlaforget.envs.libero import WAIT_ACTION, convert_gripper
from vlaforget.envs.metaworld import env_action
from vlaforget.io import read_json, write_json
from vlaforget.models.tiny import random_tiny_backend


class _CopyModel(nn.Module):
    """A perfect imitator: at decode step k of sample i it emits targets[i][k] (the demo's tokens)."""

    def __init__(self, targets, prompt_lens, n_img, vocab):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.targets, self.prompt_lens, self.n, self.v = targets, prompt_lens, n_img, vocab

    def forward(self, input_ids, attention_mask, pixel_values, **kw):
        B, T = input_ids.shape
        logits = torch.zeros(B, T + self.n, self.v)
        for i in range(B):
            length = int(attention_mask[i].sum())
            k = length - self.prompt_lens[i]
            if k < len(self.targets[i]):
                logits[i, length - 1 + self.n, self.targets[i][k]] = 5.0
        return SimpleNamespace(logits=logits)


def _copy_policy(ds: CachedDataset, rows: list[int]) -> np.ndarray:
    """Train-side tokens of cache rows (backend.collate) fed back through predict_actions: the
    actions a model that reproduces its training targets exactly would output."""
    backend = random_tiny_backend(action_dim=ds.action_dim, stats=ds.statistics, seed=0)
    samples = [ds[i] for i in rows]
    batch = backend.collate(samples)
    targets = batch["action_targets"].tolist()
    from vlaforget.models.prompts import encode_action_prompt

    lens = [len(encode_action_prompt(backend.tokenizer, s["instruction"]).ids) for s in samples]
    lens = [n + len(backend.action_sep_ids) for n in lens]
    model = _CopyModel(targets, lens, backend.n_image_tokens, backend.vocab_end)
    images = np.stack([s["image"] for s in samples])
    return backend.predict_actions(images, [s["instruction"] for s in samples], model=model)


def _bin_tolerance(stats: dict) -> np.ndarray:
    """Largest round-trip error per dimension: one bin (2/255) in normalised space, un-normalised."""
    s = stats["action"]
    q01, q99, mask = np.asarray(s["q01"]), np.asarray(s["q99"]), np.asarray(s["mask"], bool)
    return np.where(mask, (q99 - q01) / 255.0, 2 / 255.0) + 1e-5


# ------------------------------------------------------------------ LIBERO


def _libero_cache(tmp_path):
    """The LIBERO fixture (openvla's RLDS layout, raw gripper) through the project's cache stage."""
    pytest.importorskip("tensorflow_datasets")
    from vlaforget.data.cache import build_cache
    from vlaforget.data.libero_rlds import write_libero_fixture
    from vlaforget.data.rlds import iter_episodes

    write_libero_fixture(
        tmp_path / "rlds", ["libero_goal"], n_tasks=1, episodes_per_task=2, steps=12, shards=1
    )
    src = tmp_path / "rlds" / "libero_goal_no_noops"
    build_cache(src, tmp_path / "cache", "libero_goal_no_noops", image_size=32, train_split=0.5)
    raw = np.concatenate([e["actions"] for e in iter_episodes(src)])
    return CachedDataset(tmp_path / "cache", split="all"), raw


def test_libero_demo_step_round_trips_to_its_own_env_command(tmp_path):
    ds, raw = _libero_cache(tmp_path)
    assert set(np.unique(raw[:, -1])) == {-1.0, 1.0}  # the RLDS holds LIBERO's raw gripper
    rows = list(range(len(ds)))
    sent = np.stack([convert_gripper(a) for a in _copy_policy(ds, rows)])  # what LiberoEnv.step sends
    np.testing.assert_array_equal(sent[:, -1], raw[rows, -1])  # open stays open, close stays close
    tol = _bin_tolerance(ds.statistics)[:6]
    s = ds.statistics["action"]
    inside = (raw[rows, :6] >= np.asarray(s["q01"][:6])) & (raw[rows, :6] <= np.asarray(s["q99"][:6]))
    err = np.abs(sent[:, :6] - raw[rows, :6])
    assert (err[inside] <= np.broadcast_to(tol, err.shape)[inside]).all()
    # the eval's settle action (gripper open) is what an open-gripper demo step sends
    open_rows = np.flatnonzero(raw[rows, -1] == -1.0)
    assert sent[open_rows[0], -1] == WAIT_ACTION[-1]


def test_libero_cache_stores_openvlas_training_convention(tmp_path):
    ds, raw = _libero_cache(tmp_path)
    cached = np.stack([ds[i]["action"] for i in range(len(ds))])
    np.testing.assert_array_equal(cached[:, :6], raw[:, :6])
    np.testing.assert_array_equal(cached[:, -1], 1.0 - np.clip(raw[:, -1], 0.0, 1.0))  # 1 = open
    assert ds.manifest["action_transform"]["name"] == "libero"
    assert ds.manifest["format"] == CACHE_FORMAT == 3


# ------------------------------------------------------------------ Meta-World


def _mw_episodes(n=4, T=6, seed=0):
    rng = np.random.default_rng(seed)
    eps = []
    for k in range(n):
        a = rng.uniform(-1, 1, (T, 4)).astype(np.float32)
        a[:, -1] = np.where(np.arange(T) < T // 2, -1.0, 0.6 if k % 2 else 1.0)  # open, then grab
        eps.append(
            {
                "images": rng.integers(0, 256, (T, 16, 16, 3), dtype=np.uint8),
                "states": rng.normal(size=(T, 4)).astype(np.float32),
                "actions": a,
                "env_states": None,
                "instruction": "open the drawer",
                "task": "drawer-open-v3",
                "seed": k,
            }
        )
    return eps


def test_metaworld_demo_step_round_trips_to_its_own_env_command(tmp_path, demo_config):
    from vlaforget.stageconfig import stage_config

    sc = stage_config(demo_config, "cache", "mw_downstream")
    assert sc["transform"] == "metaworld"  # the cache stage of an embedded dataset says so
    eps = _mw_episodes()
    write_cache(eps, tmp_path / "c", "mw_downstream", image_size=16, transform=sc["transform"])
    ds = CachedDataset(tmp_path / "c", split="all")
    raw = np.concatenate([e["actions"] for e in eps])
    rows = list(range(len(ds)))
    sent = np.stack([env_action(a) for a in _copy_policy(ds, rows)])  # what MetaWorldEnv.step sends
    tol = _bin_tolerance(ds.statistics)
    s = ds.statistics["action"]
    inside = (raw >= np.asarray(s["q01"])) & (raw <= np.asarray(s["q99"]))
    inside[:, -1] = True  # the gripper is not normalised: no clipping at q01/q99
    err = np.abs(sent - raw)
    assert (err[inside] <= np.broadcast_to(tol, err.shape)[inside]).all()
    np.testing.assert_array_equal(np.sign(sent[:, -1]), np.sign(raw[:, -1]))  # -1 open, +1 close


# ------------------------------------------------------------------ statistics, registry


def _libero_like_episodes(n=4, T=5, seed=1):
    rng = np.random.default_rng(seed)
    eps = []
    for _k in range(n):
        a = rng.uniform(-0.5, 0.5, (T, 7)).astype(np.float32)
        a[:, -1] = np.where(np.arange(T) % 2 == 0, -1.0, 1.0)
        eps.append(
            {
                "images": rng.integers(0, 256, (T, 8, 8, 3), dtype=np.uint8),
                "states": rng.normal(size=(T, 8)).astype(np.float32),
                "actions": a,
                "instruction": "put the bowl on the plate",
                "task": "put_the_bowl_on_the_plate",
            }
        )
    eps[-1]["actions"][:, 0] = 3.0  # the held-out episode holds the extreme action
    return eps


def test_statistics_are_over_transformed_actions_of_all_episodes(tmp_path):
    eps = _libero_like_episodes()
    m = write_cache(eps, tmp_path / "c", "libero_spatial_no_noops", image_size=8, train_split=0.75)
    assert m["num_train_episodes"] == 3
    stats = read_json(tmp_path / "c" / "dataset_statistics.json")["libero_spatial_no_noops"]
    transformed = np.concatenate([TRANSFORMS["libero"](e["actions"]) for e in eps])
    assert stats["num_trajectories"] == 4 and stats["num_transitions"] == len(transformed)
    assert stats["action"]["max"][0] == pytest.approx(3.0)  # the held-out episode counts
    np.testing.assert_allclose(stats["action"]["mean"], transformed.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(transformed, 0.99, axis=0), rtol=1e-6)
    assert stats["action"]["min"][-1] == 0.0 and stats["action"]["max"][-1] == 1.0  # 0 close, 1 open
    assert stats["action"]["mask"] == [True] * 6 + [False]
    assert m["statistics_episodes"] == "all"


def test_registry_mirrors_openvlas_libero_entries():
    for s in ("spatial", "object", "goal", "10"):
        assert resolve_transform(f"libero_{s}_no_noops").name == "libero"
    assert resolve_transform("libero_90_no_noops").name == "libero"
    assert resolve_transform("anything", "metaworld").name == "metaworld"
    raw = np.array([[0.1, 0, 0, 0, 0, 0, -1], [0, 0, 0, 0, 0, 0.2, 1], [0, 0, 0, 0, 0, 0, 0.3]], np.float32)
    out = TRANSFORMS["libero"](raw)
    np.testing.assert_allclose(out[:, -1], [1.0, 0.0, 0.7], rtol=1e-6)  # 1 - clip(g, 0, 1)
    np.testing.assert_array_equal(out[:, :6], raw[:, :6])
    assert set(DATASET_TRANSFORMS.values()) <= set(TRANSFORMS)


def test_unknown_dataset_names_itself_and_the_registry(tmp_path):
    with pytest.raises(ValueError, match=r"'bridge_orig'.*DATASET_TRANSFORMS"):
        resolve_transform("bridge_orig")
    with pytest.raises(ValueError, match="no action transform is registered for dataset 'mystery'"):
        write_cache(_mw_episodes(1), tmp_path / "c", "mystery", image_size=8)
    assert not (tmp_path / "c" / "manifest.json").exists()
    with pytest.raises(ValueError, match="'rot90'.*unknown"):
        resolve_transform("libero_goal_no_noops", "rot90")


def test_old_format_cache_is_refused_with_the_fix(tmp_path):
    write_cache(_mw_episodes(1), tmp_path / "c", "mw", image_size=8, transform="metaworld")
    m = read_json(tmp_path / "c" / "manifest.json")
    write_json(tmp_path / "c" / "manifest.json", dict(m, format=1))
    with pytest.raises(ValueError, match="format-1 dataset cache.*rerun the cache stage"):
        CachedDataset(tmp_path / "c")
