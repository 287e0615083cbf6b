"""Action tokenizer (openvla scheme) and q01/q99 normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from vlaforget.models.action_tokenizer import (
    ActionTokenizer,
    action_stats,
    normalize_actions,
    unnormalize_actions,
)


@pytest.mark.parametrize("vocab_end", [32000, 857])
@pytest.mark.parametrize("dim", [1, 4, 7])
def test_round_trip_and_id_range(vocab_end, dim):
    at = ActionTokenizer(vocab_end)
    rng = np.random.default_rng(dim)
    a = rng.uniform(-1, 1, size=(64, dim))
    ids = at.encode(a)
    assert ids.shape == a.shape
    assert ids.min() >= vocab_end - 256 and ids.max() <= vocab_end - 1
    back = at.decode(ids)
    # bin width 2/255: decoded centre within one bin of the input
    assert np.abs(back - a).max() <= 2 / 255 + 1e-6
    assert np.array_equal(at.encode(back), ids[:, :]) or np.abs(at.encode(back) - ids).max() <= 1


def test_openvla_ids_and_extremes():
    at = ActionTokenizer(32000)
    ids = at.encode([-1.0, 1.0, 5.0, -5.0, 0.0])
    # np.digitize over 256 edges: -1 -> bin 1 -> 31999; 1 -> bin 256 -> 31744
    assert ids.tolist()[:4] == [31999, 31744, 31744, 31999]
    assert at.begin == 31744
    assert at.is_action([31743, 31744, 31999, 32000]).tolist() == [False, True, True, False]
    # non-action ids clip to the extreme bin centres, as openvla does
    assert at.decode([0])[0] == pytest.approx(at.bin_centers[-1])
    assert at.decode([40000])[0] == pytest.approx(at.bin_centers[0])
    assert len(at.bin_centers) == 255


def test_normalise_mask_and_unnormalise():
    stats = {"q01": [-2.0, 0.0, 10.0, -1.0], "q99": [2.0, 4.0, 20.0, 1.0], "mask": [True, True, True, False]}
    raw = np.array([[0.0, 2.0, 15.0, 0.7], [-2.0, 4.0, 10.0, -1.0], [9.0, -9.0, 100.0, 0.3]])
    n = normalize_actions(raw, stats)
    assert np.allclose(n[0], [0.0, 0.0, 0.0, 0.7], atol=1e-6)
    assert np.allclose(n[1], [-1.0, 1.0, -1.0, -1.0], atol=1e-6)
    assert np.allclose(n[2], [1.0, -1.0, 1.0, 0.3], atol=1e-6)  # clipped, gripper untouched
    back = unnormalize_actions(n[:2], stats)
    assert np.allclose(back, raw[:2], atol=1e-5)


def test_action_stats_accepts_file_entry_block():
    block = {"q01": [0.0], "q99": [1.0], "mask": [True]}
    assert action_stats(block)["q99"] == [1.0]
    assert action_stats({"action": block})["q01"] == [0.0]
    assert action_stats({"ds": {"action": block}})["mask"] == [True]
    with pytest.raises(ValueError, match="pass the unnorm key"):
        action_stats({"a": {"action": block}, "b": {"action": block}})
    assert action_stats({"a": {"action": block}, "b": {"action": block}}, "b")["q01"] == [0.0]
    with pytest.raises(ValueError, match="not in the dataset statistics"):
        action_stats({"a": {"action": block}}, "zzz")
    with pytest.raises(ValueError, match="4-D"):
        normalize_actions(np.zeros(4), {"q01": [0.0] * 7, "q99": [1.0] * 7})
