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


@pytest.mark.libero
def test_generated_questions_match_simulator_state(tmp_path):
    from test_libero_env import _libero_ready

    why = _libero_ready()
    if why:
        pytest.skip(why)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("EGL_PLATFORM", "surfaceless")
    from PIL import Image

    from vlaforget.envs.libero import LiberoEnv
    from vlaforget.eval.vqa_mc import read_mc_jsonl

    cfg = os.environ.get("LIBERO_CONFIG_PATH") or str(tmp_path / "cfg")
    out = tmp_path / "vqa"
    man = LV.generate(
        out,
        ["libero_goal"],
        n=40,
        seed=0,
        states_per_task=1,
        tasks_per_suite=1,
        config_dir=cfg,
        resolution=128,
    )
    rows = read_mc_jsonl(out / "questions.jsonl", image_size=None)  # valid in the scorer's format
    assert len(rows) == man["n"] > 10
    cats = {r["category"] for r in rows}
    assert {"presence", "left_right", "gripper", "drawer"} <= cats
    for c in cats:  # balanced: answer counts inside a category differ by at most the pool's shortage
        counts = man["counts"][c]
        assert sum(counts.values()) >= 2
    assert set(man["counts"]["gripper"]) == {"open", "closed"} and set(man["counts"]["presence"]) == {
        "yes",
        "no",
    }
    assert [json.loads(x)["question"] for x in (out / "questions.jsonl").read_text().splitlines()] == [
        r["question"] for r in rows
    ]
    assert {p.name for p in (out / "images").iterdir()} == {os.path.basename(r["image_path"]) for r in rows}

    env = LiberoEnv("libero_goal", 0, cfg, resolution=128, image_size=224)
    e = env._env.env
    try:
        for closed in (False, True):
            img = LV.set_scene(env, 49, closed)
            mine = [r for r in rows if r["gripper_closed"] == closed]
            if not mine:
                continue
            stored = np.asarray(Image.open(mine[0]["image_path"]), np.int16)
            assert np.abs(stored - img).mean() < 1.0  # the image is the scene as the model sees it
            names = {LV.readable(n): n for n in list(e.objects_dict) + list(e.fixtures_dict)}
            pos = LV.entity_positions(env)
            width = float(np.subtract(*env.raw_obs["robot0_gripper_qpos"]))
            for r in mine:
                q, a = r["question"], r["answer"]
                if r["category"] == "gripper":
                    assert (width > 0.03) == (a == "open") and closed == (a == "closed")
                elif r["category"] == "presence":
                    noun = q.removeprefix("is there ").removesuffix(" in the scene?").split(" ", 1)[1]
                    cats_here = {
                        LV.readable(o.category_name)
                        for o in list(e.objects_dict.values()) + list(e.fixtures_dict.values())
                    }
                    assert (noun in cats_here) == (a == "yes"), q
                elif r["category"] == "left_right":
                    A, B = q.removeprefix("is the ").removesuffix("?").split(" left or right of the ")
                    dy = pos[names[A]][1] - pos[names[B]][1]
                    if abs(dy) > 0.08:  # the agent view faces the table: image right = world −y
                        assert (a == "right") == (dy < 0), (q, dy)
                elif r["category"] == "on_top":
                    A, B = q.removeprefix("is the ").removesuffix("?").split(" on the ")
                    st = e.object_states_dict
                    assert bool(st[names[A]].check_ontop(st[names[B]])) == (a == "yes"), q
                elif r["category"] == "drawer":
                    which = q.split()[2]
                    site = e.object_states_dict[f"wooden_cabinet_1_{which}_region"]
                    assert (a == "yes") == bool(site.is_open()), q
                    if a == "no":
                        joint = f"wooden_cabinet_1_{which}_level"
                        assert abs(e.sim.data.qpos[e.sim.model.get_joint_qpos_addr(joint)]) < 0.01, q
    finally:
        env.close()
