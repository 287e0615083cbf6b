"""LIBERO-format RLDS fixtures: tiny datasets in exactly openvla's `modified_libero_rlds` layout.

What openvla fine-tunes on (docs/RESEARCH_PIPELINE.md, "Data conventions"):

    {rlds_dir}/libero_spatial_no_noops/1.0.0/  dataset_info.json  features.json
                                               libero_spatial-train.tfrecord-00000-of-0000N ...
    {rlds_dir}/libero_10_no_noops/1.0.0/       liber_o10-train.tfrecord-...   (sic: the builder's
                                                                                own name, not the folder's)

one TFDS builder dir per suite, `train` split only, one record per episode, with the feature dict of
openvla's LIBERO RLDS builder (`libero_features`): per step `observation/image` and
`observation/wrist_image` (256, 256, 3) uint8 JPEG, stored rotated 180° relative to the simulator's
frames (the env renders upside down; openvla's eval rotates its frames the same way), `observation/state`
(8,) f32 = EEF position (3), EEF axis-angle (3), gripper finger positions (2),
`observation/joint_state` (7,) f32, `action` (7,) f32 = [dx, dy, dz, dax, day, daz, gripper] with the
RAW gripper command −1 = open, +1 = close, `discount`, `reward` (1 on the last step), `is_first`,
`is_last`, `is_terminal`, `language_instruction`; `episode_metadata/file_path`
(`.../{suite}/{task_name}_demo.hdf5`; the instruction is derived from that name as the builder does).

The real data cannot be downloaded here, so `write_libero_fixture` generates the content. Each
(suite, task, episode) gets the same scripted, seeded pick-and-place: the arm approaches an object
with the gripper open, closes it, carries the object towards a goal and opens it again, so both
gripper commands and both transitions occur. Two sources play that script:

* `synthetic` (default; `synthetic_episode`): an idealised kinematic world drawn with numpy. It is
  deterministic, and needs neither LIBERO nor a GPU.
* `libero` (`libero_episode`): the real LIBERO simulator, as openvla's regeneration script ran it.
  Each episode is the task's init state k, then 10 settle steps, then the script driven by the real
  end-effector and object positions, recording the real `agentview` / `eye_in_hand` frames, EEF state
  and joint positions. This needs LIBERO in this Python, or a Python that has it: `--libero-python`,
  or VLAFORGET_LIBERO_PYTHON (`make libero`).

The point of a fixture is the FORMAT and the conventions (rotation, gripper sign, names, shard
naming), which are those of the real dataset exactly.

`vlaforget libero-fixture --out DIR --suites libero_spatial ... --tasks 2 --episodes 3 [--source libero]`
writes one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..io import log, provenance, write_json
from .rlds import VERSION, load_tensorflow, write_builder_dir

DATASET_SUFFIX = "_no_noops"
IMAGE_SHAPE = (256, 256, 3)
STATE_DIM, JOINT_DIM, ACTION_DIM = 8, 7, 7
GRIPPER_OPEN, GRIPPER_CLOSE = -1.0, 1.0  # raw LIBERO / robosuite gripper commands
POS_LIMIT, ROT_LIMIT = 0.9375, 0.375  # |action| maxima seen in the real data (SpaceMouse saturation)
FIXTURE_FILE = "libero_fixture.json"
# episode_metadata/file_path prefix: openvla's conversion records the regenerated HDF5 path.
SOURCE_ROOT = "/fixture/LIBERO/libero/datasets/regenerated--no_noops"

# TFDS builder name (dataset_info.json `name`, shard file prefix) of each suite's dataset, as
# published in openvla/modified_libero_rlds. libero_90 is not published; ours follows the others.
BUILDER_NAMES = {
    "libero_spatial": "libero_spatial",
    "libero_object": "libero_object",
    "libero_goal": "libero_goal",
    "libero_10": "liber_o10",
    "libero_90": "libero_90",
}

# Task names in LIBERO's order (libero/libero/benchmark/libero_suite_task_map.py); libero_90's
# 90 tasks are read from an installed LIBERO (`suite_task_names`).
SUITE_TASKS: dict[str, tuple[str, ...]] = {
    "libero_spatial": (
        "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_next_to_the_ramekin_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_from_table_center_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_on_the_cookie_box_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_in_the_top_drawer_of_the_wooden_cabinet_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_on_the_ramekin_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_next_to_the_cookie_box_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_on_the_stove_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_next_to_the_plate_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_on_the_wooden_cabinet_and_place_it_on_the_plate",
    ),
    "libero_object": (
        "pick_up_the_alphabet_soup_and_place_it_in_the_basket",
        "pick_up_the_cream_cheese_and_place_it_in_the_basket",
        "pick_up_the_salad_dressing_and_place_it_in_the_basket",
        "pick_up_the_bbq_sauce_and_place_it_in_the_basket",
        "pick_up_the_ketchup_and_place_it_in_the_basket",
        "pick_up_the_tomato_sauce_and_place_it_in_the_basket",
        "pick_up_the_butter_and_place_it_in_the_basket",
        "pick_up_the_milk_and_place_it_in_the_basket",
        "pick_up_the_chocolate_pudding_and_place_it_in_the_basket",
        "pick_up_the_orange_juice_and_place_it_in_the_basket",
    ),
    "libero_goal": (
        "open_the_middle_drawer_of_the_cabinet",
        "put_the_bowl_on_the_stove",
        "put_the_wine_bottle_on_top_of_the_cabinet",
        "open_the_top_drawer_and_put_the_bowl_inside",
        "put_the_bowl_on_top_of_the_cabinet",
        "push_the_plate_to_the_front_of_the_stove",
        "put_the_cream_cheese_in_the_bowl",
        "turn_on_the_stove",
        "put_the_bowl_on_the_plate",
        "put_the_wine_bottle_on_the_rack",
    ),
    "libero_10": (
        "LIVING_ROOM_SCENE2_put_both_the_alphabet_soup_and_the_tomato_sauce_in_the_basket",
        "LIVING_ROOM_SCENE2_put_both_the_cream_cheese_box_and_the_butter_in_the_basket",
        "KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it",
        "KITCHEN_SCENE4_put_the_black_bowl_in_the_bottom_drawer_of_the_cabinet_and_close_it",
        "LIVING_ROOM_SCENE5_put_the_white_mug_on_the_left_plate_and_put_the_yellow_and_white_mug_on_the_right_plate",
        "STUDY_SCENE1_pick_up_the_book_and_place_it_in_the_back_compartment_of_the_caddy",
        "LIVING_ROOM_SCENE6_put_the_white_mug_on_the_plate_and_put_the_chocolate_pudding_to_the_right_of_the_plate",
        "LIVING_ROOM_SCENE1_put_both_the_alphabet_soup_and_the_cream_cheese_box_in_the_basket",
        "KITCHEN_SCENE8_put_both_moka_pots_on_the_stove",
        "KITCHEN_SCENE6_put_the_yellow_and_white_mug_in_the_microwave_and_close_it",
    ),
}
SUITES = tuple(BUILDER_NAMES)


# ----------------------------------------------------------------------------- names


def suite_of(name: str) -> str:
    """`libero_spatial_no_noops` or `libero_spatial` -> `libero_spatial` (checked)."""
    suite = name.removesuffix(DATASET_SUFFIX)
    if suite not in BUILDER_NAMES:
        raise ValueError(
            f"'{name}' is not a LIBERO suite; use one of {', '.join(SUITES)} "
            f"(optionally with the {DATASET_SUFFIX} suffix)"
        )
    return suite


def dataset_name(suite: str) -> str:
    """The dataset (folder) name openvla uses: `{suite}_no_noops`."""
    return suite_of(suite) + DATASET_SUFFIX


def instruction_from_task_name(task_name: str) -> str:
    """The language instruction openvla's LIBERO builder derives from the demo file name: the words
    of `{task_name}_demo.hdf5`, dropping everything up to and including a `*SCENE*` word."""
    words, out = task_name.split("_"), []
    for w in words:
        if "SCENE" in w:
            out = []
            continue
        out.append(w)
    return " ".join(out)


def suite_task_names(suite: str, n_tasks: int | None = None) -> list[str]:
    """The first `n_tasks` task names of a suite, in LIBERO's order."""
    suite = suite_of(suite)
    if suite in SUITE_TASKS:
        names = list(SUITE_TASKS[suite])
    else:  # libero_90: from the installed LIBERO
        from ..envs.libero import suite_tasks

        names = [t["name"] for t in suite_tasks(suite)]
    if n_tasks is not None:
        if not 1 <= int(n_tasks) <= len(names):
            raise ValueError(f"{suite} has {len(names)} tasks; asked for {n_tasks}")
        names = names[: int(n_tasks)]
    return names


# ----------------------------------------------------------------------------- format


def libero_features():
    """The TFDS feature dict of openvla's LIBERO RLDS builder (names, shapes, dtypes, encodings)."""
    load_tensorflow()
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "observation": tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Image(
                                shape=IMAGE_SHAPE,
                                dtype=np.uint8,
                                encoding_format="jpeg",
                                doc="Main camera RGB observation.",
                            ),
                            "wrist_image": tfds.features.Image(
                                shape=IMAGE_SHAPE,
                                dtype=np.uint8,
                                encoding_format="jpeg",
                                doc="Wrist camera RGB observation.",
                            ),
                            "state": tfds.features.Tensor(
                                shape=(STATE_DIM,),
                                dtype=np.float32,
                                doc="Robot EEF state (6D pose, 2D gripper).",
                            ),
                            "joint_state": tfds.features.Tensor(
                                shape=(JOINT_DIM,), dtype=np.float32, doc="Robot joint angles."
                            ),
                        }
                    ),
                    "action": tfds.features.Tensor(
                        shape=(ACTION_DIM,), dtype=np.float32, doc="Robot EEF action."
                    ),
                    "discount": tfds.features.Scalar(
                        dtype=np.float32, doc="Discount if provided, default to 1."
                    ),
                    "reward": tfds.features.Scalar(
                        dtype=np.float32, doc="Reward if provided, 1 on final step for demos."
                    ),
                    "is_first": tfds.features.Scalar(
                        dtype=np.bool_, doc="True on first step of the episode."
                    ),
                    "is_last": tfds.features.Scalar(dtype=np.bool_, doc="True on last step of the episode."),
                    "is_terminal": tfds.features.Scalar(
                        dtype=np.bool_,
                        doc="True on last step of the episode if it is a terminal step, True for demos.",
                    ),
                    "language_instruction": tfds.features.Text(doc="Language Instruction."),
                }
            ),
            "episode_metadata": tfds.features.FeaturesDict(
                {"file_path": tfds.features.Text(doc="Path to the original data file.")}
            ),
        }
    )


def rotate180(img: np.ndarray) -> np.ndarray:
    """`img[::-1, ::-1]`: simulator frame <-> stored RLDS image (the same map both ways)."""
    return np.ascontiguousarray(np.asarray(img)[::-1, ::-1])


def episode_example(ep: dict[str, Any]) -> dict[str, Any]:
    """A generated episode (see synthetic_episode) -> the RLDS example the builder would write.

    `ep["agentview"]` / `ep["wrist"]` are simulator frames [T, 256, 256, 3]; they are stored rotated
    180°, as openvla's conversion stores LIBERO's frames."""
    actions = np.asarray(ep["actions"], np.float32)
    n = len(actions)
    instruction = instruction_from_task_name(ep["task"])
    steps = [
        {
            "observation": {
                "image": rotate180(ep["agentview"][t]),
                "wrist_image": rotate180(ep["wrist"][t]),
                "state": np.asarray(ep["states"][t], np.float32),
                "joint_state": np.asarray(ep["joint_states"][t], np.float32),
            },
            "action": actions[t],
            "discount": 1.0,
            "reward": float(t == n - 1),
            "is_first": t == 0,
            "is_last": t == n - 1,
            "is_terminal": t == n - 1,
            "language_instruction": instruction,
        }
        for t in range(n)
    ]
    return {"steps": steps, "episode_metadata": {"file_path": ep["file_path"]}}


# ----------------------------------------------------------------------------- synthetic content


def _rng(*key: int | str) -> np.random.Generator:
    """A generator seeded from a tuple of ints/strings (stable across processes and platforms)."""
    ints = [k if isinstance(k, int) else int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) for k in key]
    return np.random.default_rng(ints)


HOME_JOINTS = np.array([0.0, 0.17, 0.0, -2.44, 0.0, 2.6, 0.78])  # a Franka posture above the table
TABLE_Z = 0.90  # table top height (m) of LIBERO's table arenas
GRIP_OPEN_QPOS, GRIP_CLOSED_QPOS = 0.039, 0.004  # finger joint positions (m); closed on an object


def synthetic_episode(
    suite: str, task_index: int, episode: int, *, steps: int = 24, seed: int = 0
) -> dict[str, Any]:
    """One deterministic LIBERO-like demonstration, a function of (suite, task_index, episode, seed).

    Trajectory: an idealised controller moves the end effector by `0.02 m × action` per step.
    Phase 1 (t < t_close): approach above the task's object and descend, gripper command −1 (open);
    phase 2 (t_close ≤ t < t_open): command +1 (close), carry to the task's goal; phase 3: command −1
    (open), retreat upwards. Position actions are a proportional controller plus N(0, 0.05) noise,
    clipped to ±0.9375; rotation actions N(0, 0.03) clipped to ±0.375; fingers follow the command
    at rate 0.5 per step. Length: `steps` + 0..steps/4 (episodes differ, as real ones do).
    Object and goal positions depend on (suite, task) only; start pose and noise on the episode too.

    Returns frames as the SIMULATOR would give them (`agentview`, `wrist`: uint8 [T, 256, 256, 3],
    i.e. upside down: the writer stores them rotated), `states` [T, 8], `joint_states` [T, 7],
    `actions` [T, 7] (raw gripper), `task` (LIBERO task name), `file_path`.
    """
    suite = suite_of(suite)
    names = suite_task_names(suite, task_index + 1)
    task = names[task_index]
    if steps < 8:
        raise ValueError(f"steps = {steps}: an episode needs at least 8 steps (approach, grasp, carry)")
    task_rng = _rng(seed, suite, task_index)
    ep_rng = _rng(seed, suite, task_index, episode)
    obj = np.array([*task_rng.uniform([-0.12, -0.15], [0.12, 0.15]), TABLE_Z + 0.03])
    goal = np.array([*task_rng.uniform([-0.12, -0.15], [0.12, 0.15]), TABLE_Z + 0.05])
    colours = task_rng.integers(40, 230, size=(3, 3))  # object, goal marker, table tint
    T = int(steps + ep_rng.integers(0, steps // 4 + 1))
    t_close = round(T * 0.35) + int(ep_rng.integers(-1, 2))
    t_open = round(T * 0.75) + int(ep_rng.integers(-1, 2))
    pos = np.array([-0.20, 0.0, TABLE_Z + 0.27]) + ep_rng.normal(0, 0.01, 3)
    rot = np.array([3.0, -0.2, -0.1]) + ep_rng.normal(0, 0.02, 3)  # axis-angle, as in the real data
    finger = GRIP_OPEN_QPOS
    jac = _rng(seed, suite).normal(0, 0.8, size=(JOINT_DIM, 3))  # joint drift per EEF displacement
    start = pos.copy()

    states, joints, actions, agent, wrist = [], [], [], [], []
    carried = False
    for t in range(T):
        grip = GRIPPER_CLOSE if t_close <= t < t_open else GRIPPER_OPEN
        if t < t_close:  # above the object, then down to it
            target = obj + np.array([0, 0, 0.10 * max(0.0, 1 - t / max(1, t_close - 2))])
        elif t < t_open:
            target = goal + np.array([0, 0, 0.08])
        else:
            target = pos + np.array([0, 0, 0.05])
        # observation t (before action t)
        state = np.concatenate([pos, rot, [finger, -finger]]).astype(np.float32)
        joint = (HOME_JOINTS + jac @ (pos - start) + ep_rng.normal(0, 0.002, JOINT_DIM)).astype(np.float32)
        obj_now = pos - np.array([0, 0, 0.03]) if carried else obj
        agent.append(_draw_agentview(pos, finger, obj_now, goal, colours, ep_rng))
        wrist.append(_draw_wrist(pos, finger, obj_now, goal, colours, ep_rng))
        a_pos = np.clip((target - pos) / 0.02 * 0.5 + ep_rng.normal(0, 0.05, 3), -POS_LIMIT, POS_LIMIT)
        a_rot = np.clip(ep_rng.normal(0, 0.03, 3), -ROT_LIMIT, ROT_LIMIT)
        actions.append(np.concatenate([a_pos, a_rot, [grip]]).astype(np.float32))
        states.append(state)
        joints.append(joint)
        # the world responds
        pos = pos + 0.02 * a_pos
        rot = rot + 0.05 * a_rot
        finger_target = GRIP_CLOSED_QPOS if grip == GRIPPER_CLOSE else GRIP_OPEN_QPOS
        finger = finger + 0.5 * (finger_target - finger)
        if grip == GRIPPER_CLOSE and np.linalg.norm(pos[:2] - obj[:2]) < 0.05:
            carried = True
        if grip == GRIPPER_OPEN and carried:
            carried, obj = False, np.array([pos[0], pos[1], TABLE_Z + 0.03])
    return _episode_record(suite, task, task_index, episode, agent, wrist, states, joints, actions)


_YY, _XX = np.mgrid[0:256, 0:256].astype(np.float32)


def _disc(img: np.ndarray, cy: float, cx: float, r: float, colour) -> None:
    img[(_YY - cy) ** 2 + (_XX - cx) ** 2 <= r * r] = colour


def _project(p: np.ndarray) -> tuple[float, float]:
    """World (x forward, y left) -> pixel (row, col) of an upright front view of the table."""
    return 150.0 - 420.0 * (p[0] + 0.05) - 200.0 * (p[2] - TABLE_Z), 128.0 - 420.0 * p[1]


def _draw_agentview(pos, finger, obj, goal, colours, rng) -> np.ndarray:
    """The front camera, drawn upright, returned as the simulator frame (rotated 180°)."""
    img = np.empty(IMAGE_SHAPE, np.uint8)
    img[:96] = (200, 205, 215)  # wall
    img[96:] = np.clip(np.array([150, 110, 70]) + (colours[2] - 135) // 4, 0, 255)  # table
    gy, gx = _project(goal)
    img[int(gy) - 6 : int(gy) + 6, int(gx) - 10 : int(gx) + 10] = colours[1]
    oy, ox = _project(obj)
    _disc(img, oy, ox, 9.0, colours[0])
    ey, ex = _project(pos)
    r = 6.0 + 40.0 * max(0.0, pos[2] - TABLE_Z)
    _disc(img, ey, ex, r, (235, 235, 235) if finger > 0.02 else (40, 40, 40))
    noise = rng.integers(-3, 4, size=IMAGE_SHAPE, dtype=np.int16)
    return rotate180(np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8))


def _draw_wrist(pos, finger, obj, goal, colours, rng) -> np.ndarray:
    """The wrist camera (looking down from the hand), returned as the simulator frame."""
    img = np.empty(IMAGE_SHAPE, np.uint8)
    img[:] = np.clip(np.array([150, 110, 70]) + (colours[2] - 135) // 4, 0, 255)
    scale = 150.0 / max(0.05, pos[2] - TABLE_Z + 0.05)  # px per m: closer objects look larger
    for p, c, rad in ((goal, colours[1], 0.03), (obj, colours[0], 0.025)):
        _disc(img, 128 + scale * (p[0] - pos[0]), 128 - scale * (p[1] - pos[1]), scale * rad, c)
    gap = int(10 + 1500 * finger)  # the two fingers, apart when open
    img[190:256, 128 - gap - 10 : 128 - gap] = (60, 60, 60)
    img[190:256, 128 + gap : 128 + gap + 10] = (60, 60, 60)
    noise = rng.integers(-3, 4, size=IMAGE_SHAPE, dtype=np.int16)
    return rotate180(np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- LIBERO simulator


def _script_action(t, T, t_close, t_open, eef, obj, goal, rng) -> np.ndarray:
    """The scripted policy's action at step t (raw LIBERO convention), from the real positions."""
    grip = GRIPPER_CLOSE if t_close <= t < t_open else GRIPPER_OPEN
    if t < t_close:
        target = obj + np.array([0, 0, 0.10 * max(0.0, 1 - t / max(1, t_close - 2))])
    elif t < t_open:
        target = goal + np.array([0, 0, 0.08])
    else:
        target = eef + np.array([0, 0, 0.05])
    # OSC_POSE: an action of 1 asks for 0.05 m; aim for the whole remaining distance
    a_pos = np.clip((target - eef) / 0.05 + rng.normal(0, 0.05, 3), -POS_LIMIT, POS_LIMIT)
    a_rot = np.clip(rng.normal(0, 0.03, 3), -ROT_LIMIT, ROT_LIMIT)
    return np.concatenate([a_pos, a_rot, [grip]]).astype(np.float32)


def libero_episode(
    env, init_state, suite: str, task: str, task_index: int, episode: int, *, steps: int = 24, seed: int = 0
) -> dict[str, Any]:
    """One scripted episode in a real LIBERO env (an OffScreenRenderEnv at 256 px), recorded as
    openvla's regeneration script records it: observation t, then action t. Same return value as
    `synthetic_episode`."""
    from ..envs.libero import WAIT_ACTION, WAIT_STEPS, quat2axisangle

    task_rng = _rng(seed, suite, task_index)
    ep_rng = _rng(seed, suite, task_index, episode)
    env.seed(0)
    env.reset()
    obs = env.set_init_state(init_state)
    for _ in range(WAIT_STEPS):  # objects settle, as openvla's regeneration and eval do
        obs, _r, _done, _info = env.step(list(WAIT_ACTION))
    objects = sorted(k for k in obs if k.endswith("_pos") and not k.startswith("robot"))
    if not objects:
        raise RuntimeError(f"LIBERO task {task} reports no object positions in its observation")
    obj_key = objects[int(task_rng.integers(len(objects)))]
    goal = np.asarray(obs[obj_key], np.float64) + np.array([*task_rng.uniform(-0.12, 0.12, 2), 0.02])
    T = int(steps + ep_rng.integers(0, steps // 4 + 1))
    t_close = round(T * 0.35) + int(ep_rng.integers(-1, 2))
    t_open = round(T * 0.75) + int(ep_rng.integers(-1, 2))
    agent, wrist, states, joints, actions = [], [], [], [], []
    for t in range(T):
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        states.append(
            np.concatenate([eef, quat2axisangle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"]])
        )
        joints.append(np.asarray(obs["robot0_joint_pos"]))
        agent.append(np.asarray(obs["agentview_image"], np.uint8))
        wrist.append(np.asarray(obs["robot0_eye_in_hand_image"], np.uint8))
        a = _script_action(t, T, t_close, t_open, eef, np.asarray(obs[obj_key], np.float64), goal, ep_rng)
        actions.append(a)
        obs, _r, _done, _info = env.step(a.astype(np.float64).tolist())
    return _episode_record(suite, task, task_index, episode, agent, wrist, states, joints, actions)


def _episode_record(suite, task, task_index, episode, agent, wrist, states, joints, actions) -> dict:
    """One scripted episode as the writer takes it (both sources: synthetic and the LIBERO simulator)."""
    return {
        "suite": suite,
        "task": task,
        "task_index": task_index,
        "episode": episode,
        "file_path": f"{SOURCE_ROOT}/{suite}/{task}_demo.hdf5",
        "agentview": np.stack(agent),
        "wrist": np.stack(wrist),
        "states": np.stack(states).astype(np.float32),
        "joint_states": np.stack(joints).astype(np.float32),
        "actions": np.stack(actions),
    }


EPISODE_ARRAYS = ("agentview", "wrist", "states", "joint_states", "actions")


def render_libero(
    out_dir: str | Path,
    suite: str,
    n_tasks: int,
    episodes_per_task: int,
    steps: int,
    seed: int,
    config_dir: str | Path | None = None,
) -> list[Path]:
    """Play the script in the real LIBERO simulator; one `.npz` per episode under `out_dir`
    (in writing order). Runs where LIBERO is importable (no TensorFlow needed)."""
    from ..envs.libero import import_libero

    benchmark, OffScreenRenderEnv, get_libero_path = import_libero(config_dir)
    suite = suite_of(suite)
    bsuite = benchmark.get_benchmark_dict()[suite]()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eps: dict[tuple[int, int], Path] = {}
    for i in range(n_tasks):
        t = bsuite.get_task(i)
        init_states = bsuite.get_task_init_states(i)
        bddl = os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
        env = OffScreenRenderEnv(
            bddl_file_name=bddl, camera_heights=IMAGE_SHAPE[0], camera_widths=IMAGE_SHAPE[1]
        )
        try:
            for k in range(episodes_per_task):
                ep = libero_episode(env, init_states[k], suite, t.name, i, k, steps=steps, seed=seed)
                path = out_dir / f"{suite}__{i:03d}__{k:03d}.npz"
                np.savez(path, task=ep["task"], **{a: ep[a] for a in EPISODE_ARRAYS})
                eps[(k, i)] = path
                log.info("libero %s task %d episode %d: %d steps", suite, i, k, len(ep["actions"]))
        finally:
            env.close()
    return [eps[key] for key in sorted(eps)]  # task-interleaved, as the synthetic writer


def _load_rendered(path: Path, suite: str) -> dict[str, Any]:
    with np.load(path) as z:
        ep = {a: z[a] for a in EPISODE_ARRAYS}
        task = str(z["task"])
    return {**ep, "suite": suite, "task": task, "file_path": f"{SOURCE_ROOT}/{suite}/{task}_demo.hdf5"}


def libero_python(explicit: str | None = None) -> str:
    """The Python that plays LIBERO: `explicit`, this one if it has LIBERO, else VLAFORGET_LIBERO_PYTHON."""
    import importlib.util

    if explicit:
        return explicit
    if importlib.util.find_spec("libero") is not None:
        return sys.executable
    env = os.environ.get("VLAFORGET_LIBERO_PYTHON")
    if env:
        return env
    raise RuntimeError(
        f"--source libero needs the LIBERO simulator: this Python ({sys.executable}) cannot import it. "
        f"Install it (`make libero`) and pass --libero-python .venv-libero/bin/python (or set "
        f"VLAFORGET_LIBERO_PYTHON), or use --source synthetic"
    )


def _render_elsewhere(py: str, tmp: Path, suite: str, n_tasks: int, episodes: int, steps: int, seed: int):
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the tree holding this vlaforget package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MUJOCO_GL", "egl")
    cmd = [
        py,
        "-m",
        "vlaforget.data.libero_rlds",
        "--render-to",
        str(tmp),
        "--suites",
        suite,
        "--tasks",
        str(n_tasks),
        "--episodes",
        str(episodes),
        "--steps",
        str(steps),
        "--seed",
        str(seed),
    ]
    r = subprocess.run(cmd, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"rendering {suite} with LIBERO failed (exit {r.returncode}): {' '.join(cmd)}")
    return sorted(tmp.glob(f"{suite}__*.npz"), key=lambda p: (p.stem.split("__")[2], p.stem.split("__")[1]))


# ----------------------------------------------------------------------------- writer


def write_libero_fixture(
    rlds_dir: str | Path,
    suites: list[str] | tuple[str, ...] = ("libero_spatial",),
    *,
    n_tasks: int = 2,
    episodes_per_task: int = 3,
    steps: int = 24,
    seed: int = 0,
    shards: int = 2,
    source: str = "synthetic",
    python: str | None = None,
) -> dict[str, Any]:
    """Write `{rlds_dir}/{suite}_no_noops/1.0.0/` for each suite: `n_tasks` tasks (LIBERO's first)
    × `episodes_per_task` episodes from `source` (`synthetic` or `libero`; `python`: the Python that
    plays LIBERO, see `libero_python`), spread over `shards` shards. Returns a summary, also written to
    `{rlds_dir}/libero_fixture.json` (outside the dataset folders: those hold exactly what openvla's do)."""
    if source not in ("synthetic", "libero"):
        raise ValueError(f"source '{source}': use synthetic or libero")
    py = libero_python(python) if source == "libero" else None
    t0 = time.time()
    rlds_dir = Path(rlds_dir)
    features = libero_features()
    out: dict[str, Any] = {}
    for s in suites:
        suite = suite_of(s)
        names = suite_task_names(suite, n_tasks)

        tmp = None
        if source == "synthetic":
            episodes = (  # task-interleaved, as TFDS's shuffled shards are
                synthetic_episode(suite, i, k, steps=steps, seed=seed)
                for k in range(episodes_per_task)
                for i in range(len(names))
            )
        else:
            rlds_dir.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.TemporaryDirectory(prefix=".libero-render-", dir=rlds_dir)  # removed below
            if py == sys.executable:
                paths = render_libero(tmp.name, suite, n_tasks, episodes_per_task, steps, seed)
            else:
                paths = _render_elsewhere(py, Path(tmp.name), suite, n_tasks, episodes_per_task, steps, seed)
            if len(paths) != n_tasks * episodes_per_task:
                raise RuntimeError(
                    f"LIBERO rendered {len(paths)} episodes of {suite}, expected {n_tasks * episodes_per_task}"
                )
            episodes = (_load_rendered(path, suite) for path in paths)
        try:
            info = write_builder_dir(
                rlds_dir / dataset_name(suite),
                BUILDER_NAMES[suite],
                features,
                (episode_example(ep) for ep in episodes),
                n_shards=shards,
                description=(
                    f"{dataset_name(suite)}: LIBERO-format RLDS fixture ({source}, seed {seed}); "
                    "feature dict and layout of openvla's modified_libero_rlds"
                ),
                version=VERSION,
            )
        finally:
            if tmp is not None:
                tmp.cleanup()
        out[dataset_name(suite)] = {**info, "tasks": names}
        log.info(
            "libero fixture %s: %d episodes, %d steps -> %s",
            dataset_name(suite),
            info["episodes"],
            info["steps"],
            info["builder_dir"],
        )
    summary = {
        "source": source,
        "generator": "vlaforget.data.libero_rlds."
        + ("synthetic_episode" if source == "synthetic" else "libero_episode"),
        "seed": seed,
        "n_tasks": n_tasks,
        "episodes_per_task": episodes_per_task,
        "steps": steps,
        "shards": shards,
        "datasets": out,
        "seconds": round(time.time() - t0, 2),
        "provenance": provenance(),
    }
    write_json(rlds_dir / FIXTURE_FILE, summary)
    return summary


if __name__ == "__main__":  # the LIBERO side of --source libero: render episodes to .npz only
    ap = argparse.ArgumentParser(prog="python -m vlaforget.data.libero_rlds")
    ap.add_argument("--render-to", required=True)
    ap.add_argument("--suites", required=True)
    ap.add_argument("--tasks", type=int, required=True)
    ap.add_argument("--episodes", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    a = ap.parse_args()
    render_libero(a.render_to, a.suites, a.tasks, a.episodes, a.steps, a.seed)
