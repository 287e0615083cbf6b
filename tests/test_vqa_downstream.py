"""Issue 27.4: general-skill questions about what the fine-tuning rewrites. The embedded study's
teacher also learns visual questions on the downstream (window) scenes, and the forgetting stage
scores questions on those scenes as their own set (vqa_mc_downstream), apart from the upstream-scene
set whose numbers stay comparable; a study without the keys keeps its stage configs (ids)."""

from __future__ import annotations

import copy

import pytest

from vlaforget import stageconfig as vsc
from vlaforget import study as vfs
from vlaforget.config import ConfigError
from vlaforget.settings import ForgettingSettings, PretrainSettings

RUN = "mw_downstream__baseline__full__s42"


def test_demo_teacher_learns_questions_on_the_downstream_scenes(demo_config):
    sc = vsc.stage_config(demo_config, "model", "tiny-vla")
    assert PretrainSettings.of(sc["pretrain"]).vqa_datasets == ("mw_downstream",)
    blocks = {b["name"]: b for b in sc["corpus_datasets"]}  # the model job reads their caches
    assert set(blocks["mw_downstream"]["tasks"]) == {"window-open-v3", "window-close-v3"}
    assert ("cache:mw_downstream", "cache", "mw_downstream") in vfs.upstream(demo_config, "model", "tiny-vla")


@pytest.mark.parametrize("key", [RUN, "teacher"])
def test_demo_forgetting_scores_the_downstream_scenes_apart(demo_config, key):
    sc = vsc.stage_config(demo_config, "forgetting", key)
    fs = ForgettingSettings.of(sc)
    assert [b["name"] for b in fs.vqa_datasets] == ["mw_upstream"]  # the comparable upstream-scene set
    assert [b["name"] for b in fs.vqa_downstream_datasets] == ["mw_downstream"]
    assert set(fs.vqa_downstream_datasets[0]["tasks"]) == {"window-open-v3", "window-close-v3"}
    assert ("cache:mw_downstream", "cache", "mw_downstream") in vfs.upstream(demo_config, "forgetting", key)
    assert "cache:mw_downstream" in sc["inputs"]


def test_without_the_keys_stage_configs_are_unchanged(demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["model"]["pretrain"].pop("vqa_datasets")
    cfg["eval"]["forgetting"]["downstream_vqa_suites"] = []
    sc = vsc.stage_config(cfg, "forgetting", RUN)
    assert "vqa_downstream_datasets" not in sc
    assert "vqa_datasets" not in vsc.stage_config(cfg, "model", "tiny-vla")["pretrain"]
    assert "cache:mw_downstream" not in sc["inputs"]
    assert vsc.stage_config_id(cfg, "model", "tiny-vla") != vsc.stage_config_id(
        demo_config, "model", "tiny-vla"
    )


def test_unknown_datasets_are_refused(demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["eval"]["forgetting"]["downstream_vqa_suites"] = ["mw_nowhere"]
    with pytest.raises(ConfigError, match="downstream_vqa_suites"):
        vsc.stage_config(cfg, "forgetting", RUN)
    cfg = copy.deepcopy(demo_config)
    cfg["model"]["pretrain"]["vqa_datasets"] = ["mw_nowhere"]
    with pytest.raises(ConfigError, match="vqa_datasets"):
        vsc.stage_config(cfg, "model", "tiny-vla")
