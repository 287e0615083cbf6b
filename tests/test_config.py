"""Study config: schema and semantic errors name the key; overlays; run names; stage configs carry
exactly what shapes a stage (so config changes invalidate the right jobs)."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import REPO

from vlaforget import config as vfc
from vlaforget import stageconfig as vsc
from vlaforget import stagefile as vsf
from vlaforget import study as vfs
from vlaforget.config import ConfigError


def test_real_and_overlay_configs_validate(tmp_root, monkeypatch):
    base = REPO / "config" / "config.yaml"
    for overlays in (
        [],
        ["demo.yaml"],
        ["demo.yaml", "ci.yaml"],
        ["profile_4090.yaml"],
        ["profile_v100x8.yaml"],
        ["profile_v100x8.yaml", "profile_v100x8_ddp.yaml"],
    ):
        files = [base] + [REPO / "config" / o for o in overlays]
        if not overlays or not overlays[0].startswith("demo"):
            # the real config's paths live under /opt/data/private (validation creates nothing)
            monkeypatch.setenv("VLAFORGET_ALLOWED_ROOT", "/opt/data/private")
            monkeypatch.setenv("VLAFORGET_ROOT", "/opt/data/private/vlaforget")
        cfg = vfc.load_config(*files)
        assert cfg["study"]["methods"]


def test_overlay_deep_merges(demo_config):
    assert demo_config["model"]["backend"] == "tiny"
    assert demo_config["train"]["lora"]["r"] == 8
    assert demo_config["train"]["lora"]["dropout"] == 0.0  # kept from config.yaml
    assert (
        demo_config["methods"]["icsm_hsw_thermostat"]["thermostat"]["every"] == 5
    )  # config/demo.yaml (issue 19: 30-step runs)
    assert demo_config["methods"]["icsm_hsw_thermostat"]["thermostat"]["beta_min"] == 0.2


@pytest.mark.parametrize(
    "mutate,key",
    [
        (lambda c: c["train"].update(max_stpes=1), "train.max_stpes"),
        (lambda c: c["train"].update(batch_size="16"), "train.batch_size"),
        (lambda c: c["train"]["lora"].update(targets=["attention"]), "train.lora.targets.0"),
        (lambda c: c["methods"]["craft"]["craft"].update(epsilom=0.1), "methods.craft.craft.epsilom"),
        (lambda c: c.update(wrold="x"), "wrold"),
        (lambda c: c["methods"]["icsm_hsw_thermostat"]["thermostat"].update(beta_min=0), "beta_min"),
    ],
)
def test_schema_errors_name_the_key(demo_config, mutate, key):
    cfg = copy.deepcopy(demo_config)
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        vfc.validate(cfg)
    assert key in str(e.value)


@pytest.mark.parametrize(
    "mutate,words",
    [
        (lambda c: c["study"].update(methods=["baseline", "lora_plus"]), "lora_plus"),
        (lambda c: c["study"].update(ablations=["no_such"]), "no_such"),
        (lambda c: c["ablations"].update(bad={"base": "nope"}), "ablations.bad.base"),
        (lambda c: c["ablations"].update(bad={"base": "craft", "set": {"crafty.x": 1}}), "crafty"),
        (lambda c: c["methods"].update({"a__b": {}}), "a__b"),
        (lambda c: c["model"].update(tiny=None), "model.tiny"),
    ],
)
def test_semantic_errors_name_the_cause(demo_config, mutate, words):
    cfg = copy.deepcopy(demo_config)
    mutate(cfg)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        vfc.validate(cfg)


def test_run_names_roundtrip():
    name = vfs.run_name("icsm_hsw_thermostat", "libero_10_no_noops", vfs.shots_name(5), 42)
    assert name == "libero_10_no_noops__icsm_hsw_thermostat__5shot__s42"
    assert vfs.parse_run_name(name) == {
        "suite": "libero_10_no_noops",
        "method": "icsm_hsw_thermostat",
        "shots": "5shot",
        "seed": 42,
    }
    assert vfs.parse_shots("full") is None and vfs.parse_shots("10shot") == 10
    with pytest.raises(ConfigError):
        vfs.parse_run_name("teacher")


def test_ablation_resolves_to_base_plus_overrides(demo_config):
    m = vfs.method_config(demo_config, "no_thermostat")
    assert m["thermostat"]["enabled"] is False and m["hsw"]["gamma"] == 0.5 and m["hsw"]["enabled"]
    assert vfs.method_needs(m) == {"icsm", "probe"}
    assert vfs.method_needs(vfs.method_config(demo_config, "baseline")) == set()
    assert vfs.method_needs(vfs.method_config(demo_config, "craft_no_projection")) == {"craft"}


def test_train_stage_config_only_references_what_the_method_needs(demo_config):
    base = vsc.stage_config(demo_config, "train", "mw_downstream__baseline__full__s42")
    assert base["icsm_dir"] is None and base["probe_dir"] is None and base["craft_dir"] is None
    assert base["shots"] is None and base["seed"] == 42
    meth = vsc.stage_config(demo_config, "train", "mw_downstream__icsm_hsw_thermostat__5shot__s1")
    assert meth["icsm_dir"] and meth["shots"] == 5
    assert meth["run_id"].startswith("mw_downstream__icsm_hsw_thermostat__5shot__s1-")
    # probe.n shapes the method run (its ICSM basis) but not the baseline
    cfg2 = copy.deepcopy(demo_config)
    cfg2["probe"]["n"] = 64
    assert vsc.stage_config(cfg2, "train", "mw_downstream__baseline__full__s42") == base
    assert vsc.stage_config(cfg2, "train", "mw_downstream__icsm_hsw_thermostat__5shot__s1") != meth


def test_every_stage_config_writes_under_root(demo_config, tmp_root, tmp_path):
    keys = {
        "demos": "mw_upstream",
        "cache": "mw_upstream",
        "model": "tiny-vla",
        "probe": "x",
        "icsm": "x",
        "craft_anchors": "mw_downstream",
        "train": "mw_downstream__craft__full__s42",
        "eval": "teacher@mw_upstream",
        "forgetting": "mw_downstream__craft__full__s42",
    }
    for stage, key in keys.items():
        sc = vsc.stage_config(demo_config, stage, key)
        assert sc["stage"] == stage and sc["code"]
        out = sc.get("out_dir") or sc.get("out_file")
        assert out.startswith(str(tmp_root)), (stage, out)
        p = tmp_path / f"{stage}.yaml"
        p.write_text(yaml.safe_dump(sc))
        assert vsf.load_stage_config(p, stage) == sc


def test_hand_edited_stage_config_cannot_escape_root(demo_config, tmp_path):
    sc = vsc.stage_config(demo_config, "cache", "mw_upstream")
    sc["out_dir"] = "/workspace/cache"
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(sc))
    with pytest.raises(ConfigError, match="outside the allowed root"):
        vsf.load_stage_config(p, "cache")
    with pytest.raises(ConfigError, match="not 'train'"):
        vsf.load_stage_config(p, "train")
