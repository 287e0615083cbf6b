"""Dataset statistics in openvla's `dataset_statistics.json` format.

`{name: {"action": {mean, std, max, min, q01, q99, mask}, "proprio": {mean, std, max, min, q01, q99},
"num_transitions": int, "num_trajectories": int}}`. Actions are normalised to [-1, 1] with q01/q99
per dimension except where mask is False: the last dimension (gripper) is left as is, like openvla
(`models.action_tokenizer.normalize_actions` / `unnormalize_actions`, which take such an entry).
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
