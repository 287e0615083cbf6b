"""The embedded world's design (issue 19, docs/evaluation.md "The embedded world"): every upstream
scene carries several instructions (the teacher must read language), downstream is a new scene."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from vlaforget.data.instructions import canonical_instruction
from vlaforget.data.vqa import TASK_OBJECT

REPO = Path(__file__).resolve().parents[1]


def _demo():
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def test_every_upstream_scene_carries_several_instructions():
    ds = _demo()["data"]["metaworld"]["datasets"]
    up = ds[_demo()["data"]["metaworld"]["upstream"]]
    per_scene = Counter(TASK_OBJECT[t] for t in up)
    assert all(n >= 2 for n in per_scene.values()), per_scene
    # the instructions of one scene differ, so acting right needs the text
    for scene in per_scene:
        texts = {canonical_instruction(t) for t in up if TASK_OBJECT[t] == scene}
        assert len(texts) == per_scene[scene]


def test_downstream_is_a_new_scene_with_every_task_capped():
    demo = _demo()
    ds = demo["data"]["metaworld"]["datasets"]
    up = set(ds[demo["data"]["metaworld"]["upstream"]])
    down = [t for name, tasks in ds.items() if name != demo["data"]["metaworld"]["upstream"] for t in tasks]
    assert {TASK_OBJECT[t] for t in down}.isdisjoint({TASK_OBJECT[t] for t in up})
    caps = demo["eval"]["metaworld"]["max_steps"]
    assert all(t in caps for t in list(up) + down)
