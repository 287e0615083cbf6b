"""Visual questions answered from simulator state: the tiny teacher's general (non-action) skill.

`vqa_samples(ds, n, seed)` draws transitions of a Meta-World CachedDataset and asks questions whose
one-word answers follow from the stored 39-D observation (`env_state`) and the task:

  scene          "what object is on the table?"          -> drawer / door / button / plate / ...
  drawer_open    "is the drawer open?"                   -> yes / no   (drawer tasks)
  door_open      "is the door open?"                     -> yes / no   (door tasks)
  window_open    "is the window open?"                   -> yes / no   (window tasks)
  gripper_side   "is the gripper left or right of the X?" -> left / right (in the upright image)
  gripper_state  "is the gripper open or closed?"        -> open / closed

States near a class boundary are skipped (not answerable from a 64 px image), and answers are
balanced per kind. Questions are plain text; the model backend adds its own prompt template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np

# env_state layout (Meta-World v3): hand xyz [0:3], gripper opening [3], object 1 pos [4:7] and
# quaternion [7:11], object 2 [11:18], the previous frame's 18 values [18:36], goal xyz [36:39].
HAND, GRIPPER, OBJ_POS, OBJ_QUAT, GOAL = slice(0, 3), 3, slice(4, 7), slice(7, 11), slice(36, 39)

TASK_OBJECT = {
    "button-press-topdown-v3": "button",
    "button-press-v3": "button",
    "button-press-wall-v3": "button",
    "button-press-topdown-wall-v3": "button",
    "drawer-open-v3": "drawer",
    "drawer-close-v3": "drawer",
    "door-open-v3": "door",
    "door-close-v3": "door",
    "door-lock-v3": "door",
    "door-unlock-v3": "door",
    "plate-slide-v3": "plate",
    "plate-slide-back-v3": "plate",
    "plate-slide-side-v3": "plate",
    "plate-slide-back-side-v3": "plate",
    "window-open-v3": "window",
    "window-close-v3": "window",
    "faucet-open-v3": "faucet",
    "faucet-close-v3": "faucet",
    "coffee-button-v3": "machine",
    "coffee-push-v3": "mug",
    "coffee-pull-v3": "mug",
    "handle-press-v3": "handle",
    "handle-press-side-v3": "handle",
    "handle-pull-v3": "handle",
    "handle-pull-side-v3": "handle",
    "lever-pull-v3": "lever",
    "hammer-v3": "hammer",
    "push-v3": "puck",
    "push-back-v3": "puck",
    "push-wall-v3": "puck",
    "pick-place-v3": "puck",
    "pick-place-wall-v3": "puck",
    "sweep-v3": "puck",
    "sweep-into-v3": "puck",
    "soccer-v3": "ball",
    "basketball-v3": "ball",
    "shelf-place-v3": "block",
    "stick-pull-v3": "stick",
    "stick-push-v3": "stick",
    "peg-insert-side-v3": "peg",
    "peg-unplug-side-v3": "peg",
    "pick-out-of-hole-v3": "peg",
    "dial-turn-v3": "dial",
    "box-close-v3": "box",
    "bin-picking-v3": "cube",
    "assembly-v3": "ring",
    "disassemble-v3": "ring",
}

# Drawer: the handle moves along -y when opened. Measured closed handle y: goal_y + 0.19 in
# drawer-open (goal = open by 0.2 m) and goal_y - 0.01 in drawer-close (goal = closed); pinned by a test.
DRAWER_CLOSED_OFFSET = {"drawer-open-v3": 0.19, "drawer-close-v3": -0.01}
DRAWER_OPEN_M, DRAWER_CLOSED_M = 0.07, 0.045  # opening (m) above/below which the answer is clear
# Door: handle orientation of the closed door (Meta-World 3.1.1 door xml; pinned by a test).
DOOR_CLOSED_QUAT = np.array([0.691, -0.151, 0.691, 0.151])
DOOR_TASKS = ("door-open-v3", "door-close-v3")
DOOR_OPEN_RAD, DOOR_CLOSED_RAD = 0.35, 0.1
# Window (Meta-World 3.x, sawyer_window_horizontal.xml): the handle (object 1) slides along +x by 0.2 m
# when opened. Handle x - goal x of the CLOSED window, measured after an episode's first step:
# window-open (handle site handleOpenStart, goal = closed body + 0.2 m) -0.24, window-close
# (handleCloseStart, goal = the closed body) +0.01; pinned by a test. The handle's y is goal y - 0.095
# in both; an episode's first frame holds the previous episode's handle (Meta-World fills the
# observation before mj_forward) and is skipped by that check.
WINDOW_CLOSED_DX = {"window-open-v3": -0.24, "window-close-v3": 0.01}
WINDOW_HANDLE_DY, WINDOW_DY_TOL = -0.095, 0.005
# opening (m, of 0.2) above which the window is open / below which closed: window-close succeeds
# at <= 0.04 (0.05 m from its goal), so "closed" is what window-close calls done
WINDOW_OPEN_M, WINDOW_CLOSED_M = 0.08, 0.04
GRIPPER_OPEN, GRIPPER_CLOSED = 0.8, 0.5  # normalised finger distance (1 = fully open)
SIDE_MARGIN_FRAC = 0.04  # |u_hand - u_object| must exceed this fraction of the image width


# multiple-choice candidates per kind (eval/vqa_mc.py scores them by log-likelihood)
SCENE_OBJECTS = sorted(set(TASK_OBJECT.values()))
CANDIDATES = {
    "scene": SCENE_OBJECTS,
    "drawer_open": ["yes", "no"],
    "door_open": ["yes", "no"],
    "window_open": ["yes", "no"],
    "gripper_state": ["open", "closed"],
    "gripper_side": ["left", "right"],
}


def balanced_pick(
    items: Sequence[dict], n: int, seed: int, key: Callable[[dict], tuple[str, str]]
) -> list[dict]:
    """n items, equal shares per category and, inside one, the least-used answer first.

    key(item) -> (category, answer). Deterministic for a seed; fewer than n if the pool runs out."""
    rng = np.random.default_rng(seed)
    buckets: dict[str, dict[str, list[int]]] = {}
    for i, it in enumerate(items):
        c, a = key(it)
        buckets.setdefault(c, {}).setdefault(a, []).append(i)
    used = {c: {a: 0 for a in v} for c, v in buckets.items()}
    picked: list[int] = []
    while len(picked) < n and any(lst for v in buckets.values() for lst in v.values()):
        for c in sorted(buckets):
            if len(picked) >= n:
                break
            live = [a for a in sorted(buckets[c]) if buckets[c][a]]
            if not live:
                continue
            a = min(live, key=lambda x: (used[c][x], x))
            picked.append(buckets[c][a].pop(int(rng.integers(len(buckets[c][a])))))
            used[c][a] += 1
    return [items[i] for i in picked]


def drawer_opening(task: str, env_state: np.ndarray) -> float | None:
    if task not in DRAWER_CLOSED_OFFSET:
        return None
    closed_y = env_state[GOAL][1] + DRAWER_CLOSED_OFFSET[task]
    return float(closed_y - env_state[OBJ_POS][1])


def door_angle(task: str, env_state: np.ndarray) -> float | None:
    if task not in DOOR_TASKS:
        return None
    q = np.asarray(env_state[OBJ_QUAT], np.float64)
    q = q / max(np.linalg.norm(q), 1e-8)
    return float(2 * np.arccos(np.clip(abs(q @ DOOR_CLOSED_QUAT / np.linalg.norm(DOOR_CLOSED_QUAT)), 0, 1)))


def window_opening(task: str, env_state: np.ndarray) -> float | None:
    """How far (m) the window of a window task is open (0 closed, 0.2 fully open); None for other
    tasks and for a frame whose handle is not where the window's is (an episode's stale first frame)."""
    if task not in WINDOW_CLOSED_DX:
        return None
    dx, dy = env_state[OBJ_POS][:2] - env_state[GOAL][:2]
    if abs(float(dy) - WINDOW_HANDLE_DY) > WINDOW_DY_TOL:
        return None
    return float(dx - WINDOW_CLOSED_DX[task])


@cache
def camera_pose(task: str, camera: str = "corner3") -> tuple[np.ndarray, np.ndarray, float]:
    """(position [3], rotation [3, 3] with camera axes as columns, fovy degrees) of a fixed camera."""
    import mujoco

    from ..envs.metaworld import MetaWorldEnv

    with MetaWorldEnv(task, seed=0, camera=camera, render=False) as env:
        env.reset()
        m, d = env._env.model, env._env.data
        cid = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        return d.cam_xpos[cid].copy(), d.cam_xmat[cid].reshape(3, 3).copy(), float(m.cam_fovy[cid])


def image_x(point: np.ndarray, pose, width: int = 1, upright: bool = True) -> float:
    """Horizontal image coordinate (0 = left edge, `width` = right edge) of a world point.

    MuJoCo cameras look along their -z axis with +x to the right of the raw frame; the corner
    cameras are mounted upside down and our images are rotated 180°, which mirrors x.
    """
    pos, rot, fovy = pose
    c = rot.T @ (np.asarray(point, np.float64) - pos)  # camera coordinates
    f = 0.5 * width / np.tan(np.deg2rad(fovy) / 2)
    u_raw = 0.5 * width + f * c[0] / max(-c[2], 1e-6)
    return float(width - u_raw) if upright else float(u_raw)


def questions_for(task: str, env_state: np.ndarray, camera: str = "corner3") -> list[tuple[str, str, str]]:
    """Every (kind, question, answer) that `env_state` answers unambiguously."""
    from ..envs.metaworld import CORNER_CAMERAS

    out = []
    obj = TASK_OBJECT.get(task)
    if obj:
        out.append(("scene", "what object is on the table?", obj))
    d = drawer_opening(task, env_state)
    if d is not None and (d > DRAWER_OPEN_M or d < DRAWER_CLOSED_M):
        out.append(("drawer_open", "is the drawer open?", "yes" if d > DRAWER_OPEN_M else "no"))
    a = door_angle(task, env_state)
    if a is not None and (a > DOOR_OPEN_RAD or a < DOOR_CLOSED_RAD):
        out.append(("door_open", "is the door open?", "yes" if a > DOOR_OPEN_RAD else "no"))
    w = window_opening(task, env_state)
    if w is not None and (w > WINDOW_OPEN_M or w < WINDOW_CLOSED_M):
        out.append(("window_open", "is the window open?", "yes" if w > WINDOW_OPEN_M else "no"))
    g = float(env_state[GRIPPER])
    if g > GRIPPER_OPEN or g < GRIPPER_CLOSED:
        out.append(
            ("gripper_state", "is the gripper open or closed?", "open" if g > GRIPPER_OPEN else "closed")
        )
    if obj:
        pose = camera_pose(task, camera)
        upright = camera in CORNER_CAMERAS
        du = image_x(env_state[HAND], pose, upright=upright) - image_x(
            env_state[OBJ_POS], pose, upright=upright
        )
        if abs(du) > SIDE_MARGIN_FRAC:
            out.append(
                ("gripper_side", f"is the gripper left or right of the {obj}?", "right" if du > 0 else "left")
            )
    return out


def vqa_samples(
    ds,
    n: int,
    seed: int = 0,
    camera: str | None = None,
    kinds: list[str] | None = None,
    pool: int | None = None,
) -> list[dict[str, Any]]:
    """n visual questions from random transitions of `ds` (a CachedDataset with env_state).

    Kinds get equal shares and, inside a kind, answers are balanced where the data allows.
    `camera`: the one the frames were rendered with; default: the cache manifest's record of it
    (written by the demos stage), else corner3.
    Each item: image uint8 [H, W, 3], question, answer (one word), kind (= category), candidates
    (the multiple-choice answers of its kind, CANDIDATES), task, index.
    """
    if camera is None:
        sim = (getattr(ds, "manifest", None) or {}).get("simulator") or {}
        camera = sim.get("camera") or "corner3"
    if len(ds) == 0:
        raise ValueError(f"dataset {getattr(ds, 'name', '?')} is empty: no visual questions to draw")
    if ds[0]["env_state"] is None:
        raise ValueError(
            f"dataset {getattr(ds, 'name', '?')} has no env_state: visual questions are "
            f"answered from Meta-World simulator state (generated datasets only)"
        )
    rng = np.random.default_rng(seed)
    m = min(len(ds), pool or max(20 * n, 2000))
    candidates = rng.choice(len(ds), size=m, replace=False)
    buckets: dict[str, dict[str, list[int]]] = {}
    for i in candidates:
        item = ds[int(i)]
        for kind, _q, ans in questions_for(item["task"], item["env_state"], camera):
            if kinds is None or kind in kinds:
                buckets.setdefault(kind, {}).setdefault(ans, []).append(int(i))
    if not buckets:
        raise ValueError(f"no visual question applies to the tasks of {getattr(ds, 'name', '?')}")
    picked: list[tuple[str, int]] = []
    used: dict[str, dict[str, int]] = {k: {a: 0 for a in v} for k, v in buckets.items()}
    order = sorted(buckets)
    while len(picked) < n and any(lst for v in buckets.values() for lst in v.values()):
        for kind in order:
            if len(picked) >= n:
                break
            live = [a for a in sorted(buckets[kind]) if buckets[kind][a]]
            if not live:
                continue
            ans = min(live, key=lambda a: (used[kind][a], a))  # least-used answer first: balance
            idx = buckets[kind][ans].pop(int(rng.integers(len(buckets[kind][ans]))))
            used[kind][ans] += 1
            picked.append((kind, idx))
    out = []
    for kind, idx in picked:
        item = ds[idx]
        for k, q, a in questions_for(item["task"], item["env_state"], camera):
            if k == kind:
                out.append(
                    {
                        "image": item["image"],
                        "question": q,
                        "answer": a,
                        "kind": kind,
                        "category": kind,
                        "candidates": list(CANDIDATES[kind]),
                        "task": item["task"],
                        "index": idx,
                    }
                )
                break
    return out
