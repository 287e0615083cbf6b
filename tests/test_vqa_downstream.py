"""Issue 27.4: general-skill questions about what the fine-tuning rewrites. With the overlay
config/demo_window_vqa.yaml the embedded study's teacher also learns visual questions on the
downstream (window) scenes, and the forgetting stage scores questions on those scenes as their own set
(vqa_mc_downstream), apart from the upstream-scene set whose numbers stay comparable; config/demo.yaml
alone keeps its stage configs (ids)."""

from __future__ import annotations

import copy

import pytest

from vlaforget import stageconfig as vsc
from vlaforget import study as vfs
from vlaforget.config import ConfigError
from vlaforget.settings import ForgettingSettings, PretrainSettings

RUN = "mw_downstream__baseline__full__s42"


@pytest.fixture
def window_config(tmp_root):
    """config/config.yaml + demo.yaml + demo_gpu.yaml + demo_window_vqa.yaml, validated."""
    from conftest import REPO

    from vlaforget.config import load_config

    c = REPO / "config"
    return load_config(c / "config.yaml", c / "demo.yaml", c / "demo_gpu.yaml", c / "demo_window_vqa.yaml")


def test_teacher_learns_questions_on_the_downstream_scenes(window_config):
    sc = vsc.stage_config(window_config, "model", "tiny-vla")
    assert PretrainSettings.of(sc["pretrain"]).vqa_datasets == ("mw_downstream",)
    blocks = {b["name"]: b for b in sc["corpus_datasets"]}  # the model job reads their caches
    assert set(blocks["mw_downstream"]["tasks"]) == {"window-open-v3", "window-close-v3"}
    assert ("cache:mw_downstream", "cache", "mw_downstream") in vfs.upstream(
        window_config, "model", "tiny-vla"
    )


@pytest.mark.parametrize("key", [RUN, "teacher"])
def test_forgetting_scores_the_downstream_scenes_apart(window_config, key):
    sc = vsc.stage_config(window_config, "forgetting", key)
    fs = ForgettingSettings.of(sc)
    assert [b["name"] for b in fs.vqa_datasets] == ["mw_upstream"]  # the comparable upstream-scene set
    assert [b["name"] for b in fs.vqa_downstream_datasets] == ["mw_downstream"]
    assert set(fs.vqa_downstream_datasets[0]["tasks"]) == {"window-open-v3", "window-close-v3"}
    assert ("cache:mw_downstream", "cache", "mw_downstream") in vfs.upstream(window_config, "forgetting", key)
    assert "cache:mw_downstream" in sc["inputs"]


def test_demo_alone_is_unchanged(demo_config, window_config):
    """config/demo.yaml without the overlay: no downstream-scene set, the teacher's recipe as before."""
    sc = vsc.stage_config(demo_config, "forgetting", RUN)
    assert "vqa_downstream_datasets" not in sc
    assert "vqa_datasets" not in vsc.stage_config(demo_config, "model", "tiny-vla")["pretrain"]
    assert "cache:mw_downstream" not in sc["inputs"]
    ids = [vsc.stage_config_id(c, "model", "tiny-vla") for c in (demo_config, window_config)]
    assert ids[0] != ids[1]


def test_unknown_datasets_are_refused(demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["eval"]["forgetting"]["downstream_vqa_suites"] = ["mw_nowhere"]
    with pytest.raises(ConfigError, match="downstream_vqa_suites"):
        vsc.stage_config(cfg, "forgetting", RUN)
    cfg = copy.deepcopy(demo_config)
    cfg["model"]["pretrain"]["vqa_datasets"] = ["mw_nowhere"]
    with pytest.raises(ConfigError, match="vqa_datasets"):
        vsc.stage_config(cfg, "model", "tiny-vla")
