"""Typed stage-config blocks (vlaforget.settings): defaults in one place, unknown keys and wrong
types refused with the key named, and every stage config the study writes accepted."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from vlaforget.errors import UserError
from vlaforget.settings import EvalSettings, ForgettingSettings, LoraSettings, TrainSettings

TRAIN = {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "lora": {"r": 4}}


def test_defaults_fill_in_and_of_is_idempotent():
    ts = TrainSettings.of(TRAIN)
    # config/config.yaml's values (tests/test_config_keys.py keeps the two equal)
    assert ts.save_steps == 2500 and ts.log_every == 10 and ts.max_bad_steps == 5 and ts.precision == "bf16"
    assert ts.image_aug is True and ts.num_workers == 2 and ts.early_stopping_min_delta == 0.01
    assert ts.lora == LoraSettings(r=4) and ts.lora.targets == ("attn", "mlp", "vision", "projector")
    assert ts.lora.alpha == 16.0
    assert TrainSettings.of(ts) is ts
    assert isinstance(TrainSettings.of({**TRAIN, "lr": 1}).lr, float)  # an integer lr is a number


@pytest.mark.parametrize(
    "block, words",
    [
        ({**TRAIN, "save_step": 3}, ["train: unknown key(s) ['save_step']", "save_steps"]),
        ({**TRAIN, "lora": {"r": 4, "rank": 8}}, ["train.lora: unknown key(s) ['rank']"]),
        ({k: v for k, v in TRAIN.items() if k != "lr"}, ["train.lr is required"]),
        ({**TRAIN, "max_steps": "6"}, ["train.max_steps = '6'", "integer"]),
        ({**TRAIN, "use_wandb": 1}, ["train.use_wandb = 1", "true or false"]),
    ],
)
def test_bad_train_blocks_name_the_key(block, words):
    with pytest.raises(UserError) as e:
        TrainSettings.of(block)
    assert isinstance(e.value, ValueError)  # ConfigError keeps its builtin base
    for w in words:
        assert w in str(e.value)


def test_eval_and_forgetting_blocks():
    e = EvalSettings.of(
        {"suite": "s", "episodes_per_task": 2, "tasks": ["a"], "camera": "corner3", "render_size": 64}
    )
    assert e.world == "metaworld" and e.seed == 500000 and e.max_steps is None and e.num_envs == 1
    assert EvalSettings.of({"suite": "libero_goal", "episodes_per_task": 1}).world == "libero"
    with pytest.raises(UserError, match=r"eval block: unknown key\(s\) \['num_env'\]"):
        EvalSettings.of({"suite": "s", "episodes_per_task": 1, "num_env": 2})
    base = {
        "stage": "forgetting",
        "root": "/r",
        "allowed_root": "/",
        "run_name": "teacher",
        "model": {},
        "probe_dir": "p",
        "icsm_dir": "i",
        "out_file": "o.json",
    }
    f = ForgettingSettings.of(base)
    assert f.batch_size == 16 and f.drift_samples == 256 and f.vqa_n is None and f.craft_layer == -2
    with pytest.raises(UserError, match="drift_sample"):
        ForgettingSettings.of({**base, "drift_sample": 3})


def test_the_train_recipe_refuses_an_unknown_key_before_loading_anything(tmp_path):
    from vlaforget.stages import train

    sc = {
        "stage": "train",
        "root": str(tmp_path),
        "allowed_root": str(tmp_path),
        "train": {**TRAIN, "lr_shedule": "cosine"},
        "out_dir": str(tmp_path / "run"),
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(sc))
    with pytest.raises(UserError, match="lr_shedule"):
        train.main(argparse.Namespace(config=str(tmp_path / "t.yaml"), dry_run_batches=0))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the study's configs

# every config combination the profiles and documented overlays load (Snakefile: config/config.yaml first)
CONFIG_STACKS = [
    [],
    ["demo.yaml"],
    ["demo.yaml", "ci.yaml"],
    ["demo.yaml", "demo_gpu.yaml"],
    ["demo.yaml", "demo_gpu.yaml", "demo_window_vqa.yaml"],
    ["profile_4090.yaml"],
    ["profile_4090.yaml", "pilot.yaml"],
    ["profile_v100x8.yaml"],
    ["profile_v100x8.yaml", "profile_v100x8_ddp.yaml"],
    ["rehearsal.yaml"],
    ["rehearsal.yaml", "rehearsal-openvla.yaml"],
    ["lifelong_libero.yaml"],
    ["upstream_libero.yaml"],
]


def _study(stack, monkeypatch, tmp_path):
    from conftest import REPO

    from vlaforget import config as vfc

    if stack and stack[0].startswith(("demo", "rehearsal")):
        monkeypatch.setenv("VLAFORGET_ALLOWED_ROOT", str(tmp_path))
        monkeypatch.setenv("VLAFORGET_ROOT", str(tmp_path / "root"))
    else:  # the real config's paths live under /opt/data/private (loading and stage_config create nothing)
        monkeypatch.setenv("VLAFORGET_ALLOWED_ROOT", "/opt/data/private")
        monkeypatch.setenv("VLAFORGET_ROOT", "/opt/data/private/vlaforget")
    return vfc.load_config(*[REPO / "config" / f for f in ["config.yaml", *stack]])


def _train_configs(cfg):
    """The train stage config of every method and ablation of the study (stageconfig.stage_config)."""
    from vlaforget import stageconfig as vsc
    from vlaforget import study as vfs

    suite = (cfg["study"].get("suites") or [cfg["study"]["fewshot_suite"]])[0]
    return {
        m: vsc.stage_config(cfg, "train", vfs.run_name(m, suite, "full", 42))
        for m in vfs.all_method_names(cfg)
    }


# the expressions the plug-ins read their blocks with before the settings (train/plugins/*.py,
# methods/thermostat.py at 346bd55); BS stands for train.batch_size, P for the anchor cache's pooling
BS, P = object(), object()


def _old_hsw(c):
    # issue 26.1 changed the defaults to the user's (clamp per_tensor, eps 1e-8) and added mode (flow_down)
    return {
        "enabled": bool(c.get("enabled")),
        "beta": float(c.get("beta", 1.0)),
        "gamma": float(c.get("gamma", 1.0)),
        "clamp": c.get("clamp", "per_tensor"),
        "eps": float(c.get("eps", 1e-8)),
        "groups": c.get("groups", "icsm"),
        "use_sensitivity_order": c.get("use_sensitivity_order", True),
        "mode": c.get("mode", "flow_down"),
        "measure_effective": c.get("measure_effective", True),
        "layers": c.get("layers"),
    }  # 26.1 added layers


def _old_thermostat(
    c,
):  # issue 26.2 added law .. k_gamma; probe_batch 64 -> 4 and gamma_min 0 -> 0.1 (the user's)
    return {
        "enabled": bool(c.get("enabled")),
        "every": int(c.get("every", 50)),
        "probe_batch": int(c.get("probe_batch", 4)),
        "metric": c.get("metric", "raw"),
        "probe_chunk": c.get("probe_chunk") or BS,
        "law": c.get("law", "user"),
        "estimator": c.get("estimator", "paired"),
        "warmup_steps": int(c.get("warmup_steps", 100)),
        "base_scale": float(c.get("base_scale", 0.5)),
        "k_beta": float(c.get("k_beta", 0.01)),
        "k_gamma": float(c.get("k_gamma", 0.01)),
        "warmup_measurements": int(c.get("warmup_measurements", 4)),
        "threshold_sigmas": float(c.get("threshold_sigmas", 2.0)),
        "gain": float(c.get("gain", 1.0)),
        "gamma_min": float(c.get("gamma_min", 0.1)),
        "gamma_max": float(c.get("gamma_max", 1.0)),
        "beta_min": float(c.get("beta_min", 0.2)),
        "beta_max": float(c.get("beta_max", 1.0)),
        "smoothing": float(c.get("smoothing", 0.5)),
    }


def _old_craft(c):
    return {
        "enabled": bool(c.get("enabled")),
        "epsilon": float(c.get("epsilon", 0.05)),
        "lambda": float(c.get("lambda_init", 0.0))
        if c.get("dual", True)
        else float(c.get("fixed_lambda", 0.1)),
        "lambda_lr": float(c.get("lambda_lr", 1e-4)),
        "dual": bool(c.get("dual", True)),
        "projection": bool(c.get("projection", True)),
        "anchor": c.get("anchor", P),
        "anchor_batch_size": c.get("anchor_batch_size") or BS,
        "fused_forward": bool(c.get("fused_forward", True)),
    }


def _new(s, kind):
    from dataclasses import asdict

    d = asdict(s)
    if kind == "thermostat":
        d["probe_chunk"] = s.probe_chunk or BS
    if kind == "craft":
        d["lambda"] = s.lambda_init if s.dual else s.fixed_lambda
        d["anchor"] = s.anchor if s.anchor is not None else P
        d["anchor_batch_size"] = s.anchor_batch_size or BS
        del d["lambda_init"], d["fixed_lambda"]
    return d


@pytest.mark.parametrize("stack", CONFIG_STACKS, ids=lambda s: "+".join(s) or "config.yaml")
def test_method_settings_equal_the_old_gets_on_every_study_config(stack, monkeypatch, tmp_path):
    """Behaviour unchanged: on every method / ablation of every study config, the typed blocks hold
    exactly what the plug-ins' old `.get(key, default)` gave, and every key the configs set is accepted."""
    from vlaforget.settings import MethodSettings

    cfg = _study(stack, monkeypatch, tmp_path)
    scs = _train_configs(cfg)
    assert scs
    for m, sc in scs.items():
        ms = MethodSettings.of(sc["method"])
        for kind, old in (("hsw", _old_hsw), ("thermostat", _old_thermostat), ("craft", _old_craft)):
            new = _new(getattr(ms, kind), kind)
            assert new == old(sc["method"][kind]), (stack, m, kind)
            # the same types as before (a float stays a float: log fields and checkpoints unchanged)
            assert {k: type(v) for k, v in new.items()} == {
                k: type(v) for k, v in old(sc["method"][kind]).items()
            }, (m, kind)
    # the ablations' overrides arrive (study.method_config)
    if "hard_projection" in scs:
        h = MethodSettings.of(scs["hard_projection"]["method"]).hsw
        assert (h.beta, h.gamma, h.enabled) == (0.0, 0.0, True)


def test_method_settings_accept_every_key_the_schema_allows():
    """A key the schema allows but the dataclass lacks would crash a job at its start."""
    from vlaforget.config import SCHEMA_PATH
    from vlaforget.settings import CraftSettings, HswSettings, ThermostatSettings

    props = yaml.safe_load(SCHEMA_PATH.read_text())["definitions"]["method"]["properties"]
    for name, cls in (("hsw", HswSettings), ("thermostat", ThermostatSettings), ("craft", CraftSettings)):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(props[name]["properties"]) == fields, name


def test_method_block_errors_name_the_key():
    from vlaforget.settings import MethodSettings

    with pytest.raises(UserError, match=r"method\.craft: unknown key\(s\) \['epsilom'\]"):
        MethodSettings.of({"craft": {"enabled": True, "epsilom": 0.1}})
    with pytest.raises(UserError, match=r"method\.thermostat\.every = 2\.5"):
        MethodSettings.of({"thermostat": {"every": 2.5}})
    with pytest.raises(UserError, match=r"method: unknown key\(s\) \['hws'\]"):
        MethodSettings.of({"hws": {}})


def _old_icsm(c):  # stages/icsm.py, methods/icsm.compute_layer at 346bd55
    return {
        "layers": c.get("layers", "auto"),
        "groups": c.get("groups"),
        "r": int(c.get("r") or 128),
        "injection": c.get("injection", "unit"),
        "epsilon": float(c.get("epsilon", 1e-3)),
        "alpha": float(c.get("alpha", 1.0)),
        "sensitivity_dtype": c.get("sensitivity_dtype", "fp32"),
        "sensitivity_samples": int(c.get("sensitivity_samples", 128)),
        "direction_batch": int(c.get("direction_batch", 16)),
        "fragile_dim": c.get("fragile_dim"),
        "plastic_dim": c.get("plastic_dim"),
    }


def _old_craft_anchors(c):  # stages/craft_anchors.py at 346bd55
    return {
        "pooling": c.get("pooling", "mean_image_tokens"),
        "layer": int(c.get("layer", -2)),
        "n_anchors": int(c.get("n_anchors", 512)),
        "batch_size": int(c.get("batch_size", 8)),
    }


def _old_probe(sc):  # stages/probe.py at 346bd55
    return {
        "seed": int(sc.get("seed", 0)),
        "split": sc.get("split", "heldout"),
        "n": int(sc["n"]),
        "trained_suites": list(sc.get("trained_suites") or []),
        "batch_size": int(sc.get("batch_size", 8)),
        "out_dir": sc["out_dir"],
    }


@pytest.mark.parametrize("stack", CONFIG_STACKS, ids=lambda s: "+".join(s) or "config.yaml")
def test_teacher_stage_settings_equal_the_old_gets_on_every_study_config(stack, monkeypatch, tmp_path):
    """probe / icsm / craft_anchors: the typed settings of each stack's stage configs hold what the
    recipes' old `.get(key, default)` gave; every stage config the study writes is accepted."""
    from vlaforget import stageconfig as vsc
    from vlaforget import study as vfs
    from vlaforget.settings import (
        CraftAnchorSettings,
        CraftAnchorsStageSettings,
        IcsmSettings,
        IcsmStageSettings,
        ProbeStageSettings,
    )

    cfg = _study(stack, monkeypatch, tmp_path)
    psc = vsc.stage_config(cfg, "probe", vfs.probe_set_name(cfg))
    ps = ProbeStageSettings.of(psc)
    new = {k: getattr(ps, k) for k in ("seed", "split", "n", "batch_size", "out_dir")}
    assert {**new, "trained_suites": list(ps.trained_suites)} == _old_probe(psc)
    isc = vsc.stage_config(cfg, "icsm", vfs.probe_set_name(cfg))
    ic = dataclasses.asdict(IcsmStageSettings.of(isc).icsm)
    assert ic == _old_icsm(isc.get("icsm") or {})
    assert {k: type(v) for k, v in ic.items()} == {
        k: type(v) for k, v in _old_icsm(isc.get("icsm") or {}).items()
    }
    suite = (cfg["study"].get("suites") or [cfg["study"]["fewshot_suite"]])[0]
    for key in {
        vfs.anchor_set(suite, None, 42),
        vfs.anchor_set(cfg["study"].get("fewshot_suite") or suite, 5, 42),
    }:
        csc = vsc.stage_config(cfg, "craft_anchors", key)
        cs = CraftAnchorsStageSettings.of(csc)
        assert dataclasses.asdict(cs.craft) == _old_craft_anchors(csc.get("craft") or {})
        assert (cs.seed, cs.shots, cs.shots_seed) == (
            int(csc.get("seed", 0)),
            csc.get("shots"),
            csc.get("shots_seed"),
        )
        bare = {k: v for k, v in csc.items() if k not in ("seed", "shots", "shots_seed")}
        assert (CraftAnchorsStageSettings.of(bare).seed, CraftAnchorsStageSettings.of(bare).shots) == (
            0,
            None,
        )
    # the defaults themselves (every study config sets these blocks in full): an empty block
    assert dataclasses.asdict(IcsmSettings()) == _old_icsm({})
    assert dataclasses.asdict(CraftAnchorSettings()) == _old_craft_anchors({})
    bare = {k: v for k, v in psc.items() if k not in ("seed", "split", "trained_suites", "batch_size")}
    ps0 = ProbeStageSettings.of(bare)
    assert {
        **{k: getattr(ps0, k) for k in ("seed", "split", "n", "batch_size", "out_dir")},
        "trained_suites": list(ps0.trained_suites),
    } == _old_probe(bare)
    # the train stage's craft_layer default (stageconfig.stage_config) is the anchors' one
    assert CraftAnchorSettings().layer == -2


def test_teacher_stage_settings_accept_every_key_the_schema_allows():
    from vlaforget.config import SCHEMA_PATH
    from vlaforget.settings import CraftAnchorSettings, IcsmSettings, ProbeStageSettings

    props = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]
    assert set(props["icsm"]["properties"]) == {f.name for f in dataclasses.fields(IcsmSettings)}
    assert set(props["craft"]["properties"]) == {f.name for f in dataclasses.fields(CraftAnchorSettings)}
    assert set(props["probe"]["properties"]) <= {f.name for f in dataclasses.fields(ProbeStageSettings)}
    with pytest.raises(UserError, match=r"icsm: unknown key\(s\) \['rank'\]"):
        IcsmSettings.of({"rank": 4})
    with pytest.raises(UserError, match=r"craft\.n_anchors = '8'"):
        CraftAnchorSettings.of({"n_anchors": "8"})


def _old_pretrain(c, image_aug=True):  # stages/model.py, train/pretrain.pretrain at 346bd55
    return {
        "seed": int(c.get("seed", 0)),
        "threads": int(c.get("threads", 1)),
        "vqa_train_samples": int(c.get("vqa_train_samples", 6000)),
        "vqa_heldout_samples": int(c.get("vqa_heldout_samples", 400)),
        "steps": int(c.get("steps", 1000)),
        "batch_size": int(c.get("batch_size", 32)),
        "vqa_fraction": float(c.get("vqa_fraction", 0.3)),
        "bin_sigma": float(c.get("bin_sigma", 0.0) or 0.0),
        "image_aug": bool(c.get("image_aug", image_aug)),
        "lr": float(c.get("lr", 1e-3)),
        "weight_decay": float(c.get("weight_decay", 0.01)),
    }


def _new_pretrain(s, image_aug=True):
    d = {
        k: getattr(s, k)
        for k in (
            "seed",
            "threads",
            "vqa_train_samples",
            "vqa_heldout_samples",
            "steps",
            "batch_size",
            "vqa_fraction",
            "lr",
            "weight_decay",
        )
    }
    return {
        **d,
        "bin_sigma": float(s.bin_sigma or 0.0),
        "image_aug": bool(s.image_aug if s.image_aug is not None else image_aug),
    }


@pytest.mark.parametrize(
    "stack", [s for s in CONFIG_STACKS if s and s[0] == "demo.yaml"] + [["rehearsal.yaml"]], ids="+".join
)
def test_pretrain_settings_equal_the_old_gets(stack, monkeypatch, tmp_path):
    """model.pretrain (the tiny teacher's: the configs whose model stage pretrains)."""
    from vlaforget import stageconfig as vsc
    from vlaforget.config import SCHEMA_PATH
    from vlaforget.settings import PretrainSettings

    cfg = _study(stack, monkeypatch, tmp_path)
    sc = vsc.stage_config(cfg, "model", cfg["model"]["base"])
    block = sc.get("pretrain") or {}
    assert _new_pretrain(PretrainSettings.of(block)) == _old_pretrain(block)
    for arg in (True, False):
        assert _new_pretrain(PretrainSettings(), arg) == _old_pretrain({}, arg)
    props = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["model"]["properties"]["pretrain"][
        "properties"
    ]
    assert set(props) == {f.name for f in dataclasses.fields(PretrainSettings)}
    with pytest.raises(UserError, match=r"model\.pretrain: unknown key\(s\) \['step'\]"):
        PretrainSettings.of({"step": 3})


def _old_cache(sc):  # stages/cache.py at 346bd55
    return {
        "train_split": float(sc.get("train_split", 0.95)),
        "image_key": sc.get("image_key", "observation/image"),
        "state_key": sc.get("state_key", "observation/state"),
        "transform": sc.get("transform"),
        "heldout": sc.get("heldout", "per_task"),
        "image_size": int(sc["image_size"]),
        "code": sc.get("code"),
    }


def _old_demos(sc):  # stages/demos.py at 346bd55
    return {"workers": sc.get("workers", 1), "instructions": sc.get("instructions") or {}}


@pytest.mark.parametrize("stack", CONFIG_STACKS, ids=lambda s: "+".join(s) or "config.yaml")
def test_data_stage_settings_equal_the_old_gets_on_every_study_config(stack, monkeypatch, tmp_path):
    """cache / demos: every dataset's stage config of the stack is accepted and gives the old values."""
    from vlaforget import stageconfig as vsc
    from vlaforget import study as vfs
    from vlaforget.settings import CacheStageSettings, DemosStageSettings

    cfg = _study(stack, monkeypatch, tmp_path)
    mw = cfg["data"].get("metaworld") or {}
    demos = 0
    for name in vfs.suites_all(cfg):
        sc = vsc.stage_config(cfg, "cache", name)
        cs = CacheStageSettings.of(sc)
        assert {k: getattr(cs, k) for k in _old_cache(sc)} == _old_cache(sc)
        bare = {
            k: v
            for k, v in sc.items()
            if k not in ("train_split", "image_key", "state_key", "transform", "heldout")
        }
        cs0 = CacheStageSettings.of(bare)
        assert {k: getattr(cs0, k) for k in _old_cache(bare)} == _old_cache(bare)
        if name in (mw.get("datasets") or {}):
            dsc = vsc.stage_config(cfg, "demos", name)
            d = DemosStageSettings.of(dsc)
            assert {"workers": d.workers, "instructions": d.instructions or {}} == _old_demos(dsc)
            d0 = DemosStageSettings.of({k: v for k, v in dsc.items() if k not in ("workers", "instructions")})
            assert (d0.workers, d0.instructions) == (1, {})
            demos += 1
    assert demos or cfg["world"] != "metaworld"


def test_train_settings_accept_every_key_the_schema_allows():
    from vlaforget.config import SCHEMA_PATH

    props = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["train"]["properties"]
    assert set(props) == {f.name for f in dataclasses.fields(TrainSettings)}
    assert set(props["lora"]["properties"]) == {f.name for f in dataclasses.fields(LoraSettings)}
