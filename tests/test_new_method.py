"""docs/DEVELOPMENT.md's recipe for a new method, followed for a trivial one: `gradscale` multiplies
the step's action gradient by method.gradscale.factor. Its plug-in module and settings block live in
this test (the recipe's train/plugins/gradscale.py and settings.MethodSettings field, put in place
with monkeypatch); nothing in the loop changes, and nothing in the generic study code either: the
study's method blocks, the teacher artifacts a run reads, its stage config and code hash, and the
plan's cost class all follow from the settings block's declarations. Also: the loop names no
method, and no plug-in reaches into another's state (they talk through the Plugin protocol and
ctx.gains only)."""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from train_fixtures import base_stage, clone, run_adapter, run_metrics, teacher_world

from vlaforget import codedeps, plan, settings, study
from vlaforget.errors import ConfigError
from vlaforget.settings import PluginSettings, key
from vlaforget.stageconfig import stage_config
from vlaforget.train import loop
from vlaforget.train import plugins as registry
from vlaforget.train.loop import run_training
from vlaforget.train.plugins import Plugin

SRC = Path(__file__).resolve().parents[1] / "src" / "vlaforget" / "train"


# --- recipe step 1: the method block's typed settings (settings.py: a PluginSettings class, with what
# generic code needs to know, + a MethodSettings field)
@dataclasses.dataclass(frozen=True)
class GradScaleSettings(PluginSettings):
    WHERE = "method.gradscale"
    READS = ()  # no teacher artifact
    COST = "baseline"  # a LoRA step's cost (plan.MEASURED)
    enabled: bool = key("turn the plug-in on", False)
    factor: float = key("multiplies the step's action gradient", 1.0)


@dataclasses.dataclass(frozen=True)
class MethodSettingsWithGradScale(settings.MethodSettings):
    gradscale: GradScaleSettings = dataclasses.field(default_factory=GradScaleSettings)


# --- recipe step 2: the plug-in module (train/plugins/gradscale.py: a Plugin subclass + build())
class GradScalePlugin(Plugin):
    name = "gradscale"

    def __init__(self, ctx, cfg: GradScaleSettings):
        self.ctx, self.factor, self.steps = ctx, float(cfg.factor), 0

    def before_step(self) -> None:  # after all micro-batches' backward, grads unscaled
        for _, p in self.ctx.trainable:
            if p.grad is not None:
                p.grad.mul_(self.factor)

    def every_step(self, step: int) -> None:
        self.steps += 1

    def logs(self) -> dict:
        return {"gradscale_factor": self.factor, "gradscale_steps": self.steps}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])


def _build(ctx, sc, given, train_ds, shared):
    return GradScalePlugin(ctx, GradScaleSettings.of(sc["method"]["gradscale"]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return teacher_world(tmp_path_factory, "newmethod")


@pytest.fixture
def gradscale(monkeypatch):
    """What adding the files does: train/plugins/gradscale.py importable by name, MethodSettings with the block."""
    mod = types.ModuleType(registry.module_name("gradscale"))
    mod.GradScalePlugin, mod.build = GradScalePlugin, _build
    monkeypatch.setitem(sys.modules, registry.module_name("gradscale"), mod)
    monkeypatch.setattr(settings, "MethodSettings", MethodSettingsWithGradScale)
    monkeypatch.setattr(loop, "MethodSettings", MethodSettingsWithGradScale)
    return mod


def _stage(world, name, factor=None, **train):
    root, cache, model = world
    method = None if factor is None else {"gradscale": {"enabled": True, "factor": factor}}
    sc = base_stage(
        root,
        cache,
        model,
        method_name="gradscale" if method else "baseline",
        method=method,
        loss_check_min_steps=100,
        **train,
    )
    return clone(sc, out_dir=str(Path(sc["out_dir"]).parent / name), run_id=f"{name}-id")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_new_method_plugs_in_and_acts(world, gradscale):
    base, one, zero = _stage(world, "gs_base"), _stage(world, "gs_one", 1.0), _stage(world, "gs_zero", 0.0)
    for sc in (base, one, zero):
        run_training(sc)
    # factor 1: the baseline to the bit (the hook runs, changes nothing)
    assert [r["train_loss"] for r in run_metrics(one)] == [r["train_loss"] for r in run_metrics(base)]
    assert _same(run_adapter(one), run_adapter(base))
    # its logs reach metrics.jsonl, every step
    m = run_metrics(one)
    assert [r["gradscale_steps"] for r in m] == list(range(1, len(m) + 1)) and m[0]["gradscale_factor"] == 1.0
    # factor 0: AdamW gets zero gradients, the LoRA never moves (its B stays the zeros it starts at)
    z = run_adapter(zero)
    assert all(torch.count_nonzero(v) == 0 for k, v in z.items() if "lora_B" in k)
    assert not _same(z, run_adapter(base))
    assert [r["grad_norm"] for r in run_metrics(zero)] == [0.0] * len(run_metrics(zero))


def test_new_method_resumes_exactly(world, gradscale):
    whole, cut = _stage(world, "gs_whole", 0.5), _stage(world, "gs_cut", 0.5)
    run_training(whole)
    assert run_training(cut, stop_after=4) == {"stopped_at": 4}
    run_training(cut)
    assert run_metrics(cut)[-1]["gradscale_steps"] == run_metrics(whole)[-1]["gradscale_steps"] == 6
    assert [r["train_loss"] for r in run_metrics(cut)] == [r["train_loss"] for r in run_metrics(whole)]
    assert _same(run_adapter(cut), run_adapter(whole))


def test_recipe_steps_are_needed(world, monkeypatch):
    """Without the settings field the block is refused; without the module the method is refused."""
    with pytest.raises(ConfigError, match="gradscale"):
        run_training(_stage(world, "gs_nosettings", 2.0))
    monkeypatch.setattr(loop, "MethodSettings", MethodSettingsWithGradScale)
    with pytest.raises(loop.TrainingError, match="no module train/plugins/gradscale.py"):
        run_training(_stage(world, "gs_nomodule", 2.0))


def test_loop_names_no_method_and_plugins_touch_no_other():
    """The loop talks to plug-ins through the protocol only: no plug-in looked up by name there, and no
    plug-in module reaches another plug-in through ctx.plugins (the Thermostat posts ctx.gains, CRaFT
    uses side_pass)."""
    body = (SRC / "loop.py").read_text()
    assert not re.search(r"plugins(\.get)?\s*[\[(]\s*['\"]|['\"]\w+['\"]\s+(not\s+)?in\s+plugins", body)
    for f in sorted((SRC / "plugins").glob("*.py")):
        text = f.read_text()
        assert not re.search(
            r"ctx\.plugins(\.get)?\s*[\[(]\s*['\"]|['\"]\w+['\"]\s+(not\s+)?in\s+self\.ctx\.plugins", text
        ), f.name


def test_hsw_reads_gains_posted_to_the_context_and_stands_aside_in_a_side_pass():
    """The Thermostat -> HSW channel (ctx.gains) and CRaFT -> HSW (side_pass) without either naming the other."""
    from test_hsw_gains import View, _setup

    from vlaforget.train.plugins import HSWPlugin, side_pass

    _, _, ctx, bases, _ = _setup([5, 7])
    plug = HSWPlugin(ctx, {"beta": 0.5, "gamma": 0.7, "mode": "own_params"}, View(bases))
    try:
        assert (plug.beta, plug.gamma) == (0.5, 0.7)
        ctx.gains.post(0.9, 0.2)  # the controller's wish: adopted at the next use
        assert (plug.beta, plug.gamma) == (0.9, 0.2) and plug.logs()["hsw_gamma"] == 0.2
        ctx.gains.post(0.3, 0.4)
        plug.load_state_dict({"beta": 0.6, "gamma": 0.8})  # a restored checkpoint wins over an older post
        assert (plug.beta, plug.gamma) == (0.6, 0.8) and plug.state_dict() == {"beta": 0.6, "gamma": 0.8}
        other = Plugin()
        with side_pass({"hsw": plug, "other": other}, other):
            assert not plug.active
        assert plug.active
        assert plug.shapes_gradients and not other.shapes_gradients
    finally:
        plug.close()


def test_new_method_reaches_the_study_through_its_declarations(demo_config, gradscale, monkeypatch, tmp_path):
    """The study side of the recipe: with the settings block (and the module file, for the code hash)
    in place, study.method_config / method_needs, the run's stage config and plan.method_class take
    the new method without an edit of generic code; what it declares (READS, COST) is what they use."""
    pkg = tmp_path / "vlaforget"  # recipe step 2 on disk: the code hash lists the plug-in's file
    shutil.copytree(codedeps.PKG_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "train" / "plugins" / "gradscale.py").write_text("FACTOR = 1.0\n")
    monkeypatch.setattr(codedeps, "PKG_DIR", pkg)
    cfg = copy.deepcopy(demo_config)  # recipe step 6 (config.yaml's methods / ablations)
    cfg["methods"]["gradscale"] = {"gradscale": {"enabled": True, "factor": 0.5}}
    cfg["ablations"]["gradscale_one"] = {"base": "gradscale", "set": {"gradscale.factor": 1.0}}
    m = study.method_config(cfg, "gradscale")
    assert m["gradscale"] == {"enabled": True, "factor": 0.5}
    assert {k: v["enabled"] for k, v in m.items()} == {
        "hsw": False,
        "thermostat": False,
        "craft": False,
        "gradscale": True,
    }
    assert study.method_config(cfg, "gradscale_one")["gradscale"]["factor"] == 1.0
    assert study.method_config(cfg, "baseline")["gradscale"] == {
        "enabled": False
    }  # off for every other method
    run = study.run_name("gradscale", "mw_downstream", "full", 42)

    assert study.method_needs(m) == set() and plan.method_class(cfg, "gradscale") == "baseline"
    sc = stage_config(cfg, "train", run)
    assert sc["method"]["gradscale"] == {"enabled": True, "factor": 0.5}
    assert sc["icsm_dir"] is None and sc["probe_dir"] is None and set(sc["inputs"]) == {"model", "cache"}
    assert "train/plugins/gradscale.py" in sc["code_files"]  # in the code hash of the runs enabling it only
    assert (
        "train/plugins/gradscale.py"
        not in stage_config(cfg, "train", run.replace("gradscale", "baseline"))["code_files"]
    )

    # what it declares is what the study reads: a method reading ICSM costs like HSW in the plan
    monkeypatch.setattr(GradScaleSettings, "READS", ("icsm", "probe"))
    monkeypatch.setattr(GradScaleSettings, "COST", "method")
    assert study.method_needs(m) == {"icsm", "probe"} and plan.method_class(cfg, "gradscale") == "method"
    sc = stage_config(cfg, "train", run)
    assert sc["icsm_dir"] and sc["probe_dir"] and set(sc["inputs"]) == {"model", "cache", "icsm", "probe"}
    monkeypatch.setattr(GradScaleSettings, "COST", "unmeasured")
    with pytest.raises(plan.PlanError, match="method_factor"):
        plan.method_class(cfg, "gradscale")


def test_generic_study_code_names_no_method():
    """The study's method handling, the stage-config assembly and the plan name no plug-in block: the
    methods are settings.MethodSettings' fields (settings.method_blocks)."""
    src = SRC.parent
    for f in ("study.py", "plan.py"):
        text = (src / f).read_text()
        assert not re.search(
            r"""\[["'](hsw|thermostat|craft)["']\]|\.get\(["'](hsw|thermostat)["']""", text
        ), f
