"""A visual-question set generated from the LIBERO simulator: the real study's general skill, no hub.

    vlaforget libero-vqa --out {root}/vqa/libero --suites libero_spatial libero_goal ... [--n 600]

For held-out initial states of each task (the *last* `states_per_task` of the 50 fixed init states;
evaluation uses the first `episodes_per_task`, docs/evaluation.md), the scene is set up exactly as the
`eval` stage does (envs/libero.py: `set_init_state`, the wait steps), optionally with the gripper
closed for `CLOSE_STEPS` steps (so both gripper answers occur), and the agent view is rendered as the
model sees it (`preprocess_image`: 180° rotation, JPEG round trip, 224 px Lanczos). Questions whose
answers come from the simulator state and the task's BDDL:

  presence    "is there a {X} in the scene?"             yes / no   (X from the BDDL; absent X: an
                                                                      object of another task of the suite)
  on_top      "is the {A} on the {B}?"                    yes / no   (LIBERO's BDDL predicate On(A, B))
  left_right  "is the {A} left or right of the {B}?"      left / right (projected through the agentview
                                                                      camera, mirrored as the image is)
  gripper     "is the gripper open or closed?"            open / closed (finger opening, robot0_gripper_qpos)
  drawer      "is the {top} drawer of the {cabinet} open?" yes / no  (LIBERO's `is_open`; closed: the
                                                                      drawer joint within its close range)

Cases near a boundary are skipped (|Δu| under `SIDE_MARGIN` of the image width, a finger opening
between the two thresholds, a drawer neither open nor closed). Questions are balanced per category
and, inside a category, per answer (`data.vqa.balanced_pick`), fixed by `seed`; the set is written
once as `questions.jsonl` + `images/*.png` (format: eval/vqa_mc.py) with `manifest.json` last.

Pure functions (`scene_questions`, `readable`, `image_u`) need no simulator; `scene_facts` and
`generate` need LIBERO (run them in the LIBERO venv, `make libero`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("vlaforget.libero_vqa")

CATEGORIES = ("presence", "on_top", "left_right", "gripper", "drawer")
CANDIDATES = {
    "presence": ["yes", "no"],
    "on_top": ["yes", "no"],
    "left_right": ["left", "right"],
    "gripper": ["open", "closed"],
    "drawer": ["yes", "no"],
}
SIDE_MARGIN = 0.06  # |u_A - u_B| must exceed this fraction of the image width
GRIPPER_OPEN_M, GRIPPER_CLOSED_M = 0.03, 0.012  # finger opening (m): above = open, below = closed
CLOSE_STEPS = 12  # policy steps with the LIBERO close command (+1) for the "closed" variant
CAMERA = "agentview"
DRAWER_RE = re.compile(r"^(?P<fixture>.+?)_(?P<which>top|middle|bottom)_region$")


def readable(name: str) -> str:
    """BDDL instance name → words: akita_black_bowl_1 → 'akita black bowl'."""
    return re.sub(r"_\d+$", "", name).replace("_", " ").strip()


def article(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


BDDL_DECL = re.compile(r"^\s*([a-z0-9_ ]+?)\s+-\s+([a-z0-9_]+)\s*\)?\s*$")


def bddl_categories(bddl_dir: str | Path) -> list[str]:
    """Readable object / fixture categories declared in every BDDL file under `bddl_dir`
    (`name_1 name_2 - category` lines of :objects and :fixtures): the 'absent object' vocabulary."""
    cats: set[str] = set()
    for f in sorted(Path(bddl_dir).rglob("*.bddl")):
        section = None
        for line in f.read_text().splitlines():
            t = line.strip()
            if t.startswith("(:"):
                section = t[2:].split()[0] if len(t) > 2 else None
                t = t[2 + len(section or "") :].strip()
            if section in ("objects", "fixtures"):
                m = BDDL_DECL.match(t)
                name = readable(m.group(2)) if m else ""
                if name and name != "floor" and not name.endswith("table"):  # the support, not an object
                    cats.add(name)
            if t.endswith(")") and not BDDL_DECL.match(t):
                section = None
    return sorted(cats)


def image_u(point, cam_pos, cam_rot, fovy: float, width: float = 1.0) -> float:
    """Horizontal coordinate (0 = left, width = right) of a world point in the *policy* image.

    MuJoCo cameras look along −z with +x to the right; robosuite's frame is upside down and the policy
    image is `frame[::-1, ::-1]`, i.e. the true view mirrored left-right: u = width − u_camera."""
    c = np.asarray(cam_rot, np.float64).T @ (np.asarray(point, np.float64) - np.asarray(cam_pos, np.float64))
    f = 0.5 * width / np.tan(np.deg2rad(fovy) / 2)
    u_cam = 0.5 * width + f * c[0] / max(-c[2], 1e-6)
    return float(width - u_cam)


def entity_labels(ents: dict) -> dict[str, str]:
    """Entity → the phrase that names it alone: its category ('akita black bowl'); two of one
    category: 'left …' / 'right …' by image position (if apart by SIDE_MARGIN); else no label."""
    groups: dict[str, list[str]] = {}
    for n in ents:
        groups.setdefault(readable(n), []).append(n)
    out: dict[str, str] = {}
    for r, ns in groups.items():
        if len(ns) == 1:
            out[ns[0]] = r
        elif len(ns) == 2:
            lo, hi = sorted(ns, key=lambda n: ents[n]["u"])
            if ents[hi]["u"] - ents[lo]["u"] > SIDE_MARGIN:
                out[lo], out[hi] = f"left {r}", f"right {r}"
    return out


def scene_questions(facts: dict, absent: Sequence[str] = ()) -> list[dict]:
    """Every {category, question, answer, candidates} that the scene `facts` answer unambiguously.

    facts: {entities: {name: {"u": float in [0, 1], "kind": "object"|"fixture"}}, ontop: [[A, B]],
    pairs: [[A, B]] (object/entity pairs checked with LIBERO's On), gripper_opening: float (m),
    drawers: {site: "open"|"closed"|None}}. `absent`: readable names not in this scene."""
    out: list[dict] = []

    def q(cat, text, ans):
        out.append({"category": cat, "question": text, "answer": ans, "candidates": list(CANDIDATES[cat])})

    ents = facts["entities"]
    present = sorted({readable(n) for n in ents})
    for r in present:
        q("presence", f"is there {article(r)} in the scene?", "yes")
    for r in sorted(set(absent) - set(present)):
        q("presence", f"is there {article(r)} in the scene?", "no")
    label = entity_labels(ents)  # "the {A}" must name one entity
    on = {tuple(p) for p in facts.get("ontop", [])}
    for a, b in facts.get("pairs", []):
        if a in label and b in label:
            q("on_top", f"is the {label[a]} on the {label[b]}?", "yes" if (a, b) in on else "no")
    names = sorted(label)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if readable(a) == readable(b):
                continue  # "is the left bowl left of the right bowl?" answers itself
            du = ents[a]["u"] - ents[b]["u"]
            if abs(du) > SIDE_MARGIN:
                q(
                    "left_right",
                    f"is the {label[a]} left or right of the {label[b]}?",
                    "right" if du > 0 else "left",
                )
    g = facts.get("gripper_opening")
    if g is not None and (g > GRIPPER_OPEN_M or g < GRIPPER_CLOSED_M):
        q("gripper", "is the gripper open or closed?", "open" if g > GRIPPER_OPEN_M else "closed")
    for site, state in sorted(facts.get("drawers", {}).items()):
        m = DRAWER_RE.match(site)
        if m and state in ("open", "closed"):
            q(
                "drawer",
                f"is the {m['which']} drawer of the {readable(m['fixture'])} open?",
                "yes" if state == "open" else "no",
            )
    return out


# ----------------------------------------------------------------------------- simulator side


def _camera(sim, name: str = CAMERA):
    cid = sim.model.camera_name2id(name)
    return (
        np.array(sim.data.cam_xpos[cid]),
        np.array(sim.data.cam_xmat[cid]).reshape(3, 3),
        float(sim.model.cam_fovy[cid]),
    )


def entity_positions(env) -> dict[str, np.ndarray]:
    """World positions of the BDDL's objects and fixtures (LiberoEnv after reset)."""
    e, sim = env._env.env, env._env.env.sim
    pos = {n: np.array(env.raw_obs[f"{n}_pos"]) for n in e.objects_dict if f"{n}_pos" in env.raw_obs}
    for n, fx in e.fixtures_dict.items():
        pos[n] = np.array(sim.data.body_xpos[sim.model.body_name2id(fx.root_body)])
    return pos


def drawer_states(env) -> dict[str, str | None]:
    e = env._env.env
    out: dict[str, str | None] = {}
    for site, st in e.object_states_dict.items():
        if not DRAWER_RE.match(site) or getattr(st, "object_state_type", "") != "site":
            continue
        site_obj = e.object_sites_dict.get(site)
        if site_obj is None or not list(getattr(site_obj, "joints", None) or []):
            continue  # a region without a joint (a rack's top): not a drawer
        out[site] = drawer_answer(e, site)
    return out


DRAWER_CLOSED_TOL = 0.005  # LIBERO's own is_close is strict (qpos < 0.0): an exactly shut drawer fails


def drawer_answer(e, site: str) -> str | None:
    """'open' (LIBERO's is_open), 'closed' (every joint within the object's close range ± tol), or None."""
    st = e.object_states_dict[site]
    if st.is_open():
        return "open"
    parent = e.get_object(st.parent_name)
    rng = parent.object_properties.get("articulation", {}).get("default_close_ranges")
    if not rng:
        return None
    lo, hi = min(rng) - DRAWER_CLOSED_TOL, max(rng) + DRAWER_CLOSED_TOL
    for j in e.object_sites_dict[site].joints:
        q = float(e.sim.data.qpos[e.sim.model.get_joint_qpos_addr(j)])
        if not lo <= q <= hi:
            return None
    return "closed"


def on_predicate(a_state, b_state) -> bool:
    """LIBERO's BDDL predicate (On A B), as its goal checks evaluate it: B.check_ontop(A) — A's body
    above (or level with) B's, in contact, xy within 3 cm. (A.check_ontop(B) would be *B on A*.)"""
    from libero.libero.envs.predicates import eval_predicate_fn

    return bool(eval_predicate_fn("on", a_state, b_state))


def scene_facts(env) -> dict:
    """Facts of the current LiberoEnv state that `scene_questions` turns into questions."""
    e = env._env.env
    cam = _camera(e.sim)
    pos = entity_positions(env)
    ents = {
        n: {"u": image_u(p, *cam), "kind": "object" if n in e.objects_dict else "fixture"}
        for n, p in pos.items()
    }
    states = e.object_states_dict
    pairs, ontop = [], []
    objs = [n for n in e.objects_dict if n in states]
    for a in objs:
        for b in [n for n in pos if n != a and n in states]:
            pairs.append([a, b])
            try:
                if on_predicate(states[a], states[b]):
                    ontop.append([a, b])
            except Exception:  # noqa: BLE001 - LIBERO raises for entities without geoms
                pairs.pop()
    gq = np.asarray(env.raw_obs["robot0_gripper_qpos"], np.float64)
    return {
        "entities": ents,
        "ontop": ontop,
        "pairs": pairs,
        "gripper_opening": float(gq[0] - gq[1]),
        "drawers": drawer_states(env),
    }


def set_scene(env, init_state: int, close_gripper: bool) -> np.ndarray:
    """Reset to init state k as `eval` does; optionally close the gripper; the policy image."""
    obs = env.reset(init_state)
    if close_gripper:
        for _ in range(CLOSE_STEPS):
            raw, _r, _d, _i = env._env.step([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
        obs = env._obs(raw)
    return obs["image"]


def held_out_states(states_per_task: int, n_init: int = 50) -> list[int]:
    """The last init-state indices (n_init − 1 downwards); eval uses 0 … episodes_per_task − 1."""
    return list(range(n_init - 1, n_init - 1 - int(states_per_task), -1))


def generate(
    out_dir: str | Path,
    suites: Sequence[str],
    n: int = 600,
    seed: int = 0,
    states_per_task: int = 2,
    tasks_per_suite: int | None = None,
    config_dir: str | None = None,
    resolution: int = 256,
    image_size: int = 224,
    task_ids: Sequence[int] | None = None,
) -> dict:
    """Render the scenes, ask the questions, keep a balanced n, write JSONL + images + manifest."""
    from PIL import Image

    from ..envs.libero import LiberoEnv, import_libero, suite_tasks
    from ..io import atomic_write_text, write_json
    from .vqa import balanced_pick

    _, _, get_libero_path = import_libero(config_dir)
    vocab_all = set(bddl_categories(get_libero_path("bddl_files")))
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool: list[dict] = []
    for suite in suites:
        tasks = suite_tasks(suite, config_dir)
        tasks = [t for t in tasks if t["id"] in task_ids] if task_ids is not None else tasks
        tasks = tasks[: tasks_per_suite or None]
        vocab = set(vocab_all)
        scenes = []
        for t in tasks:
            env = LiberoEnv(suite, t["id"], config_dir, resolution=resolution, image_size=image_size)
            try:
                vocab |= {readable(x) for x in entity_positions_names(env)}
                for k in held_out_states(states_per_task, len(env.init_states)):
                    for closed in (False, True):
                        img = set_scene(env, k, closed)
                        name = f"{suite}__{t['id']:02d}__{k:02d}__{'c' if closed else 'o'}.png"
                        Image.fromarray(img).save(out / "images" / name)
                        scenes.append((t, k, closed, name, scene_facts(env)))
            finally:
                env.close()
        for t, k, closed, name, facts in scenes:
            present = {readable(x) for x in facts["entities"]}
            for qa in scene_questions(facts, absent=sorted(vocab - present)):
                pool.append(
                    {
                        "image": f"images/{name}",
                        **qa,
                        "suite": suite,
                        "task": t["name"],
                        "init_state": k,
                        "gripper_closed": closed,
                    }
                )
    if not pool:
        raise ValueError(f"no question could be asked about the scenes of {', '.join(suites)}")
    picked = balanced_pick(pool, n, seed, key=lambda r: (r["category"], r["answer"]))
    used = {r["image"] for r in picked}
    for p in (out / "images").iterdir():  # keep only the images a question refers to
        if f"images/{p.name}" not in used:
            p.unlink()
    lines = [json.dumps({"id": i, **r}, sort_keys=True) for i, r in enumerate(picked)]
    atomic_write_text(out / "questions.jsonl", "\n".join(lines) + "\n")
    counts: dict[str, dict[str, int]] = {}
    for r in picked:
        c = counts.setdefault(r["category"], {})
        c[r["answer"]] = c.get(r["answer"], 0) + 1
    man = {
        "suites": list(suites),
        "n": len(picked),
        "seed": seed,
        "states_per_task": states_per_task,
        "init_states": held_out_states(states_per_task),
        "counts": counts,
        "pool": len(pool),
        "image_size": image_size,
        "task_ids": list(task_ids) if task_ids is not None else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "manifest.json", man)
    return man


def entity_positions_names(env) -> list[str]:
    e = env._env.env
    return list(e.objects_dict) + list(e.fixtures_dict)


# ----------------------------------------------------------------------------- CLI
