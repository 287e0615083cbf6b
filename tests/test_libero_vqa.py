"""LIBERO-simulator visual questions: pure question logic, and (marker `libero`) a generated set whose
answers are re-checked against the simulator's state."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vlaforget.data import libero_vqa as LV


def test_scene_questions_from_facts():
    facts = {
        "entities": {
            "plate_1": {"u": 0.2, "kind": "object"},
            "akita_black_bowl_1": {"u": 0.5, "kind": "object"},
            "wooden_cabinet_1": {"u": 0.53, "kind": "fixture"},
        },
        "ontop": [["akita_black_bowl_1", "plate_1"]],
        "pairs": [["akita_black_bowl_1", "plate_1"], ["plate_1", "akita_black_bowl_1"]],
        "gripper_opening": 0.02,  # between the thresholds: no gripper question
        "drawers": {"wooden_cabinet_1_top_region": "open", "wooden_cabinet_1_middle_region": None},
    }
    qs = {(q["category"], q["question"]): q for q in LV.scene_questions(facts, absent=["ketchup", "plate"])}
    ans = {k[1]: v["answer"] for k, v in qs.items()}
    assert ans["is there an akita black bowl in the scene?"] == "yes"
    assert ans["is there a ketchup in the scene?"] == "no"
    assert (
        ans["is the akita black bowl on the plate?"] == "yes"
        and ans["is the plate on the akita black bowl?"] == "no"
    )
    assert ans["is the akita black bowl left or right of the plate?"] == "right"
    assert not any(
        "cabinet" in q and "left or right" in q and "bowl" in q for q in ans
    )  # 0.03 apart: ambiguous
    assert not any(c == "gripper" for c, _ in qs)
    assert (
        ans["is the top drawer of the wooden cabinet open?"] == "yes"
        and len([c for c, _ in qs if c == "drawer"]) == 1
    )
    assert all(v["answer"] in v["candidates"] for v in qs.values())
    assert LV.scene_questions({**facts, "gripper_opening": 0.005})[-2]["answer"] == "closed"
    twin = {**facts, "entities": {**facts["entities"], "akita_black_bowl_2": {"u": 0.9, "kind": "object"}}}
    a2 = {q["question"]: q["answer"] for q in LV.scene_questions(twin)}
    assert "is there an akita black bowl in the scene?" in a2  # presence is still unambiguous
    assert a2["is the left akita black bowl on the plate?"] == "yes"  # two bowls: named by image side
    assert a2["is the right akita black bowl left or right of the wooden cabinet?"] == "right"
    assert not any(" akita black bowl on" in q and "left" not in q and "right" not in q for q in a2)
    close = {**facts, "entities": {**facts["entities"], "akita_black_bowl_2": {"u": 0.52, "kind": "object"}}}
    assert not any(
        "bowl" in q for q in (x["question"] for x in LV.scene_questions(close)) if "there" not in q
    )


def test_image_u_mirrors_the_camera_view():
    rot = np.eye(3)  # camera at the origin looking along -z, +x to the right of the camera view
    assert (
        LV.image_u([0.1, 0, -1], np.zeros(3), rot, 90.0) < 0.5
    )  # right in the camera -> left in the policy image
    assert LV.image_u([0, 0, -1], np.zeros(3), rot, 90.0) == pytest.approx(0.5)
    assert LV.held_out_states(3) == [49, 48, 47]


def test_bddl_categories(tmp_path):
    (tmp_path / "a.bddl").write_text(
        "(define (problem x)\n  (:fixtures\n    main_table - table\n    wooden_cabinet_1 - wooden_cabinet\n  )\n"
        "  (:objects\n    akita_black_bowl_1 akita_black_bowl_2 - akita_black_bowl\n    plate_1 - plate\n  )\n"
        "  (:init\n    (On plate_1 main_table_plate_region)\n  )\n)\n"
    )
    assert LV.bddl_categories(tmp_path) == ["akita black bowl", "plate", "wooden cabinet"]


# libero_spatial task 3: "pick up the black bowl on the cookie box ..." - a bowl resting on another
# object (on_top "yes"), a cabinet with drawers, four objects for left / right.
SUITE, TASK = "libero_spatial", 3


@pytest.mark.libero
def test_generated_questions_match_simulator_state(tmp_path):
    from test_libero_env import _libero_ready

    why = _libero_ready()
    if why:
        pytest.skip(why)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("EGL_PLATFORM", "surfaceless")
    from libero.libero.envs.predicates import eval_predicate_fn
    from PIL import Image

    from vlaforget.envs.libero import LiberoEnv
    from vlaforget.eval.vqa_mc import read_mc_jsonl

    cfg = os.environ.get("LIBERO_CONFIG_PATH") or str(tmp_path / "cfg")
    out = tmp_path / "vqa"
    man = LV.generate(
        out, [SUITE], n=60, seed=0, states_per_task=2, config_dir=cfg, resolution=128, task_ids=[TASK]
    )
    rows = read_mc_jsonl(out / "questions.jsonl", image_size=None)  # valid in the scorer's format
    assert len(rows) == man["n"] > 20
    assert set(man["counts"]) == set(LV.CATEGORIES)
    for c in ("presence", "left_right", "gripper", "on_top"):  # both answers occur
        assert set(man["counts"][c]) == set(LV.CANDIDATES[c]), (c, man["counts"][c])
    for c in ("presence", "left_right", "gripper"):  # and are balanced where the pool has plenty
        counts = man["counts"][c]
        assert max(counts.values()) - min(counts.values()) <= 1, (c, counts)
    assert [json.loads(x)["question"] for x in (out / "questions.jsonl").read_text().splitlines()] == [
        r["question"] for r in rows
    ]
    assert {p.name for p in (out / "images").iterdir()} == {os.path.basename(r["image_path"]) for r in rows}

    env = LiberoEnv(SUITE, TASK, cfg, resolution=128, image_size=224)
    e = env._env.env
    checked: dict[str, int] = {}
    try:
        for k in LV.held_out_states(2):
            for closed in (False, True):
                mine = [r for r in rows if r["gripper_closed"] == closed and r["init_state"] == k]
                if not mine:
                    continue
                img = LV.set_scene(env, k, closed)
                stored = np.asarray(Image.open(mine[0]["image_path"]), np.int16)
                assert np.abs(stored - img).mean() < 1.0  # the image is the scene as the model sees it
                names = {v: n for n, v in LV.entity_labels(LV.scene_facts(env)["entities"]).items()}
                pos = LV.entity_positions(env)
                width = float(np.subtract(*env.raw_obs["robot0_gripper_qpos"]))
                st = e.object_states_dict
                for r in mine:
                    q, a = r["question"], r["answer"]
                    if r["category"] == "gripper":
                        assert (width > 0.03) == (a == "open") and closed == (a == "closed")
                    elif r["category"] == "presence":
                        noun = q.removeprefix("is there ").removesuffix(" in the scene?").split(" ", 1)[1]
                        here = {
                            LV.readable(o.category_name)
                            for o in list(e.objects_dict.values()) + list(e.fixtures_dict.values())
                        }
                        assert (noun in here) == (a == "yes"), q
                    elif r["category"] == "left_right":
                        A, B = q.removeprefix("is the ").removesuffix("?").split(" left or right of the ")
                        dx, dy = (pos[names[A]] - pos[names[B]])[:2]
                        if abs(dy) > 0.08 and abs(dx) < 0.1:  # the agent view looks along -x: at a
                            assert (a == "right") == (dy < 0), (q, dy)  # similar depth, right = world -y
                    elif r["category"] == "on_top":
                        A, B = q.removeprefix("is the ").removesuffix("?").split(" on the ")
                        assert bool(eval_predicate_fn("on", st[names[A]], st[names[B]])) == (a == "yes"), q
                        if a == "yes":  # independent of the predicate: A rests above B
                            assert pos[names[A]][2] > pos[names[B]][2], q
                    elif r["category"] == "drawer":
                        which = q.split()[2]
                        fixture = next(n for n in e.fixtures_dict if "cabinet" in n)
                        assert (a == "yes") == bool(st[f"{fixture}_{which}_region"].is_open()), q
                        if a == "no":
                            joint = f"{fixture}_{which}_level"
                            assert abs(e.sim.data.qpos[e.sim.model.get_joint_qpos_addr(joint)]) < 0.01, q
                    checked[r["category"]] = checked.get(r["category"], 0) + 1
    finally:
        env.close()
    assert sum(checked.values()) == len(rows) and set(checked) == set(LV.CATEGORIES)
    yes_on = [r["question"] for r in rows if r["category"] == "on_top" and r["answer"] == "yes"]
    bowl_on_box = (
        "is the left akita black bowl on the cookies",
        "is the right akita black bowl on the cookies",
    )
    assert any(q.startswith(bowl_on_box) for q in yes_on), yes_on  # the task's bowl on the box
