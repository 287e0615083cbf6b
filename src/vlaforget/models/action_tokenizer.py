"""OpenVLA's action tokenizer and q01/q99 action normalisation, for any action dimension.

Actions are normalised per dimension to [-1, 1] with the dataset's q01/q99 (BOUNDS_Q99, dimensions
whose `mask` is False — the gripper — pass through), cut into 256 uniform bins over [-1, 1], and
bin k (np.digitize, 1..256) becomes token id `vocab_end - k`: the last 256 ids of the vocabulary
(OpenVLA: vocab_end = 32000, ids 31744..31999). Decoding maps a token back to one of the 255 bin
centres, exactly as openvla's `ActionTokenizer.decode_token_ids_to_actions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class ActionTokenizer:
    """Continuous actions in [-1, 1] <-> token ids in [vocab_end - n_bins, vocab_end)."""

    def __init__(self, vocab_end: int, n_bins: int = 256, min_action: float = -1.0, max_action: float = 1.0):
        if vocab_end < n_bins:
            raise ValueError(f"vocab_end={vocab_end} is smaller than n_bins={n_bins}")
        self.vocab_end, self.n_bins = int(vocab_end), int(n_bins)
        self.min_action, self.max_action = float(min_action), float(max_action)
        self.bins = np.linspace(min_action, max_action, n_bins)  # [n_bins] bin edges
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0  # [n_bins - 1]

    @property
    def begin(self) -> int:
        """Smallest action token id (inclusive)."""
        return self.vocab_end - self.n_bins

    def encode(self, action) -> np.ndarray:
        """Normalised actions [..., A] -> token ids [..., A] (int64)."""
        a = np.clip(np.asarray(action, dtype=np.float64), self.min_action, self.max_action)
        discretized = np.digitize(a, self.bins)  # 1..n_bins
        return (self.vocab_end - discretized).astype(np.int64)

    def decode(self, token_ids) -> np.ndarray:
        """Token ids [..., A] -> normalised actions [..., A] (bin centres, float32).

        Ids outside the action range are clipped to the extreme bins, as openvla does.
        """
        ids = np.asarray(token_ids, dtype=np.int64)
        discretized = np.clip(self.vocab_end - ids - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[discretized].astype(np.float32)

    def is_action(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids)
        return (ids >= self.begin) & (ids < self.vocab_end)


# ----------------------------------------------------------------------------- normalisation


def action_stats(stats: Mapping[str, Any] | None, key: str | None = None) -> dict | None:
    """The `action` block {q01, q99, mask, ...} from any of: a dataset_statistics.json dict
    ({name: {action: ...}}), one dataset's entry ({action: ...}), or the action block itself.
    `key` picks the dataset when the dict holds several."""
    if stats is None:
        return None
    if "q01" in stats and "q99" in stats:
        return dict(stats)
    if "action" in stats:
        return dict(stats["action"])
    names = list(stats)
    if key is None:
        if len(names) != 1:
            raise ValueError(
                f"dataset statistics hold {len(names)} datasets ({', '.join(names)}): "
                "pass the unnorm key / dataset name to pick one"
            )
        key = names[0]
    if key not in stats:
        raise ValueError(
            f"unnorm key '{key}' is not in the dataset statistics; available: {', '.join(names)}"
        )
    return dict(stats[key]["action"])


def _qs(stats: Mapping[str, Any], dim: int):
    if "q01" not in stats and "action" in stats:
        stats = stats["action"]
    q01 = np.asarray(stats["q01"], dtype=np.float64)
    q99 = np.asarray(stats["q99"], dtype=np.float64)
    mask = np.asarray(stats.get("mask", [True] * len(q01)), dtype=bool)
    if q01.shape != (dim,):
        raise ValueError(f"statistics are for {q01.shape[0]}-D actions, got {dim}-D actions")
    return q01, q99, mask


def normalize_actions(actions, stats: Mapping[str, Any]) -> np.ndarray:
    """Raw actions [..., A] -> [-1, 1] with q01/q99 where mask is True (openvla BOUNDS_Q99).
    `stats`: the action block or a dataset's entry ({action: ...}), as `action_stats` reads them."""
    a = np.asarray(actions, dtype=np.float64)
    q01, q99, mask = _qs(stats, a.shape[-1])
    normed = np.clip(2.0 * (a - q01) / (q99 - q01 + 1e-8) - 1.0, -1.0, 1.0)
    return np.where(mask, normed, a).astype(np.float32)


def unnormalize_actions(normalized, stats: Mapping[str, Any]) -> np.ndarray:
    """Inverse of normalize_actions (openvla `predict_action`'s un-normalisation)."""
    n = np.asarray(normalized, dtype=np.float64)
    q01, q99, mask = _qs(stats, n.shape[-1])
    raw = 0.5 * (n + 1.0) * (q99 - q01) + q01
    return np.where(mask, raw, n).astype(np.float32)
