"""Dataset statistics in openvla's `dataset_statistics.json` format.

`{name: {"action": {mean, std, max, min, q01, q99, mask}, "proprio": {mean, std, max, min, q01, q99},
"num_transitions": int, "num_trajectories": int}}`. Actions are normalised to [-1, 1] with q01/q99
per dimension except where mask is False: the last dimension (gripper) is left as is, like openvla.
"""

from __future__ import annotations

import numpy as np


def array_stats(x: np.ndarray) -> dict[str, list[float]]:
    """mean/std/max/min/q01/q99 per column of x [N, D] (float64 maths, lists of floats)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"statistics need a non-empty [N, D] array, got shape {x.shape}")
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "max": x.max(0).tolist(),
        "min": x.min(0).tolist(),
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
    }


def action_mask(action_dim: int) -> list[bool]:
    """Normalise every action dimension but the last (the gripper)."""
    return [True] * (action_dim - 1) + [False]


def dataset_statistics(actions: np.ndarray, states: np.ndarray, num_trajectories: int) -> dict:
    """One dataset's entry: statistics over the given transitions (the caller picks the split)."""
    actions = np.asarray(actions)
    stats = {
        "action": array_stats(actions),
        "proprio": array_stats(states),
        "num_transitions": len(actions),
        "num_trajectories": int(num_trajectories),
    }
    stats["action"]["mask"] = action_mask(actions.shape[1])
    return stats


def normalize_actions(actions: np.ndarray, stats: dict) -> np.ndarray:
    """openvla BOUNDS_Q99: 2 (a - q01) / (q99 - q01) - 1, clipped to [-1, 1], where mask is True."""
    a = np.asarray(actions, dtype=np.float64)
    s = stats["action"]
    q01, q99, mask = np.asarray(s["q01"]), np.asarray(s["q99"]), np.asarray(s["mask"], bool)
    scaled = np.clip(2 * (a - q01) / np.maximum(q99 - q01, 1e-8) - 1, -1, 1)
    return np.where(mask, scaled, a).astype(np.float32)


def unnormalize_actions(normalized: np.ndarray, stats: dict) -> np.ndarray:
    """Inverse of normalize_actions (openvla's predict_action un-normalisation)."""
    n = np.asarray(normalized, dtype=np.float64)
    s = stats["action"]
    q01, q99, mask = np.asarray(s["q01"]), np.asarray(s["q99"]), np.asarray(s["mask"], bool)
    return np.where(mask, 0.5 * (n + 1) * (q99 - q01) + q01, n).astype(np.float32)
