"""Per-dataset action transforms, applied when the cache is built — as openvla's OXE pipeline does.

openvla standardises every dataset with its own function (prismatic/vla/datasets/rlds/oxe/
transforms.py, `OXE_STANDARDIZATION_TRANSFORMS`, keyed by dataset name) BEFORE computing the
statistics and BEFORE tokenising; the model learns the transformed actions, and its eval code undoes
the transform when it sends an action to the simulator. The cache stage does the same here, so the
cache, `dataset_statistics.json`, the action tokens and the eval's conversion all agree:

| dataset                                   | transform  | gripper the model learns           | eval sends                       |
|-------------------------------------------|------------|------------------------------------|----------------------------------|
| libero_{spatial,object,goal,10}_no_noops  | `libero`   | `1 − clip(g, 0, 1)`: 1 open, 0 close | `−sign(2a − 1)` (envs/libero.py) |
| libero_90_no_noops (ours, same convention)| `libero`   | as above                           | as above                         |
| Meta-World datasets (data.metaworld)      | `metaworld`| raw effort in [−1, 1]: −1 open, +1 close | clip to [−1, 1] (envs/metaworld.py) |

`libero` is openvla's `libero_dataset_transform` on the action (the raw RLDS gripper is −1 = open,
+1 = close; clip to [0, 1] then invert). Its EEF/gripper state split is not needed here: openvla's
fine-tuning loads no proprio (`load_proprio=False`).
`metaworld` is the identity: our own demonstrations store Meta-World's command as the simulator
takes it; the eval clips the model's action to [−1, 1] and sends it unchanged.

A dataset with no entry is an error (`resolve_transform`): register its transform in
`DATASET_TRANSFORMS` below, the way openvla registers one per OXE dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ActionTransform:
    name: str
    fn: Callable[[np.ndarray], np.ndarray]  # raw RLDS actions [T, A] -> training actions [T, A]
    gripper: str  # the convention of the transformed gripper dimension (documentation, manifest)
    reference: str  # where openvla (or we) define it

    def __call__(self, actions: np.ndarray) -> np.ndarray:
        a = np.asarray(actions, dtype=np.float32)
        if a.ndim != 2:
            raise ValueError(f"action transform '{self.name}' takes [T, A] actions, got shape {a.shape}")
        return np.asarray(self.fn(a), dtype=np.float32)

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "gripper": self.gripper, "reference": self.reference}


def libero_actions(actions: np.ndarray) -> np.ndarray:
    """openvla's `libero_dataset_transform`: gripper −1 (open) … +1 (close) -> clip to [0, 1], invert
    (`invert_gripper_actions`: 1 − g) -> 1 = open, 0 = close; the 6 EEF deltas unchanged."""
    if actions.shape[1] != 7:
        raise ValueError(
            f"LIBERO actions are 7-D [dx, dy, dz, dax, day, daz, gripper], got {actions.shape[1]}-D"
        )
    grip = 1.0 - np.clip(actions[:, -1:], 0.0, 1.0)
    return np.concatenate([actions[:, :6], grip], axis=1)


def identity_actions(actions: np.ndarray) -> np.ndarray:
    return actions.copy()


TRANSFORMS: dict[str, ActionTransform] = {
    "libero": ActionTransform(
        "libero",
        libero_actions,
        gripper="1 - clip(g, 0, 1): 1 = open, 0 = close (raw RLDS: -1 = open, +1 = close)",
        reference="openvla prismatic/vla/datasets/rlds/oxe/transforms.py: libero_dataset_transform",
    ),
    "metaworld": ActionTransform(
        "metaworld",
        identity_actions,
        gripper="raw Meta-World effort in [-1, 1]: -1 = open, +1 = close",
        reference="vlaforget.data.transforms (identity; envs/metaworld.py clips and sends it)",
    ),
}

# Dataset name -> transform name (openvla's OXE_STANDARDIZATION_TRANSFORMS for the LIBERO datasets).
DATASET_TRANSFORMS: dict[str, str] = {
    "libero_spatial_no_noops": "libero",
    "libero_object_no_noops": "libero",
    "libero_goal_no_noops": "libero",
    "libero_10_no_noops": "libero",
    "libero_90_no_noops": "libero",  # not in openvla's registry; same conversion, same convention
}


def resolve_transform(dataset: str, declared: str | None = None) -> ActionTransform:
    """The transform of `dataset`: `declared` (a TRANSFORMS name the stage config gives, e.g.
    `metaworld` for the datasets of data.metaworld) or the dataset's registry entry."""
    name = declared or DATASET_TRANSFORMS.get(dataset)
    if name is None:
        raise ValueError(
            f"no action transform is registered for dataset '{dataset}': openvla standardises each "
            f"dataset with its own transform before statistics and tokenisation, and so must the cache. "
            f"Register it in vlaforget/data/transforms.py DATASET_TRANSFORMS (one of: "
            f"{', '.join(TRANSFORMS)}; add a new ActionTransform for another convention). Known "
            f"datasets: {', '.join(sorted(DATASET_TRANSFORMS))}"
        )
    if name not in TRANSFORMS:
        raise ValueError(
            f"action transform '{name}' (dataset '{dataset}') is unknown; use one of {', '.join(TRANSFORMS)}"
        )
    return TRANSFORMS[name]
