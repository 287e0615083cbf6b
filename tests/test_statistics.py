"""dataset_statistics.json entries match numpy, and openvla's q01/q99 normalisation inverts."""

from __future__ import annotations

import numpy as np
import pytest

from vlaforget.data.statistics import action_mask, array_stats, dataset_statistics
from vlaforget.models.action_tokenizer import normalize_actions, unnormalize_actions


def test_stats_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 7)) * [1, 2, 3, 4, 5, 6, 0.5]
    s = rng.uniform(size=(500, 8))
    st = dataset_statistics(a.astype(np.float32), s.astype(np.float32), num_trajectories=12)
    assert set(st) == {"action", "proprio", "num_transitions", "num_trajectories"}
    assert st["num_transitions"] == 500 and st["num_trajectories"] == 12
    a32 = a.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(st["action"]["mean"], a32.mean(0), rtol=1e-9)
    np.testing.assert_allclose(st["action"]["std"], a32.std(0), rtol=1e-9)
    np.testing.assert_allclose(st["action"]["q01"], np.quantile(a32, 0.01, axis=0), rtol=1e-9)
    np.testing.assert_allclose(st["action"]["q99"], np.quantile(a32, 0.99, axis=0), rtol=1e-9)
    np.testing.assert_allclose(st["proprio"]["max"], s.astype(np.float32).max(0), rtol=1e-6)
    assert st["action"]["mask"] == [True] * 6 + [False]
    assert "mask" not in st["proprio"]
    assert action_mask(4) == [True, True, True, False]
    import json

    json.dumps(st)  # plain floats, writable as dataset_statistics.json


def test_normalisation_round_trip_and_gripper_untouched():
    rng = np.random.default_rng(1)
    a = rng.uniform(-3, 3, size=(200, 4))
    st = dataset_statistics(a, a[:, :2], 5)
    n = normalize_actions(a, st)
    inside = np.all((a >= st["action"]["q01"]) & (a <= st["action"]["q99"]), axis=1)
    assert np.all(np.abs(n[:, :3]) <= 1)
    np.testing.assert_array_equal(n[:, 3], a[:, 3].astype(np.float32))  # mask False: gripper as is
    back = unnormalize_actions(n, st)
    np.testing.assert_allclose(back[inside], a[inside], rtol=1e-4, atol=1e-4)
    # one implementation: a dataset entry and its action block normalise alike
    np.testing.assert_array_equal(normalize_actions(a, st["action"]), n)
    np.testing.assert_array_equal(unnormalize_actions(n, st["action"]), back)


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        array_stats(np.zeros((0, 3)))
