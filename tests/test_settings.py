"""Typed stage-config blocks (vlaforget.settings): defaults in one place, unknown keys and wrong
types refused with the key named, and every stage config the study writes accepted."""

from __future__ import annotations

import argparse

import pytest
import yaml

from vlaforget.errors import UserError
from vlaforget.settings import EvalSettings, ForgettingSettings, LoraSettings, TrainSettings

TRAIN = {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "lora": {"r": 4}}


def test_defaults_fill_in_and_of_is_idempotent():
    ts = TrainSettings.of(TRAIN)
    assert ts.save_steps == 1000 and ts.log_every == 10 and ts.max_bad_steps == 5 and ts.precision == "fp32"
    assert ts.lora == LoraSettings(r=4) and ts.lora.targets == ("attn", "mlp") and ts.lora.alpha == 16.0
    assert TrainSettings.of(ts) is ts
    assert isinstance(TrainSettings.of({**TRAIN, "lr": 1}).lr, float)  # an integer lr is a number


@pytest.mark.parametrize("block, words", [
    ({**TRAIN, "save_step": 3}, ["train: unknown key(s) ['save_step']", "save_steps"]),
    ({**TRAIN, "lora": {"r": 4, "rank": 8}}, ["train.lora: unknown key(s) ['rank']"]),
    ({k: v for k, v in TRAIN.items() if k != "lr"}, ["train.lr is required"]),
    ({**TRAIN, "max_steps": "6"}, ["train.max_steps = '6'", "integer"]),
    ({**TRAIN, "use_wandb": 1}, ["train.use_wandb = 1", "true or false"]),
])
def test_bad_train_blocks_name_the_key(block, words):
    with pytest.raises(UserError) as e:
        TrainSettings.of(block)
    assert isinstance(e.value, ValueError)  # ConfigError keeps its builtin base
    for w in words:
        assert w in str(e.value)


def test_eval_and_forgetting_blocks():
    e = EvalSettings.of({"suite": "s", "episodes_per_task": 2, "tasks": ["a"], "camera": "corner3", "render_size": 64})
    assert e.world == "metaworld" and e.seed == 500000 and e.max_steps is None and e.num_envs == 1
    assert EvalSettings.of({"suite": "libero_goal", "episodes_per_task": 1}).world == "libero"
    with pytest.raises(UserError, match=r"eval block: unknown key\(s\) \['num_env'\]"):
        EvalSettings.of({"suite": "s", "episodes_per_task": 1, "num_env": 2})
    base = {"stage": "forgetting", "root": "/r", "allowed_root": "/", "run_name": "teacher", "model": {},
            "probe_dir": "p", "icsm_dir": "i", "out_file": "o.json"}
    f = ForgettingSettings.of(base)
    assert f.batch_size == 16 and f.drift_samples == 256 and f.vqa_n is None and f.craft_layer == -2
    with pytest.raises(UserError, match="drift_sample"):
        ForgettingSettings.of({**base, "drift_sample": 3})


def test_the_train_recipe_refuses_an_unknown_key_before_loading_anything(tmp_path):
    from vlaforget.stages import train

    sc = {"stage": "train", "root": str(tmp_path), "allowed_root": str(tmp_path), "train": {**TRAIN, "lr_shedule": "cosine"},
          "out_dir": str(tmp_path / "run")}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(sc))
    with pytest.raises(UserError, match="lr_shedule"):
        train.main(argparse.Namespace(config=str(tmp_path / "t.yaml"), dry_run_batches=0))
    assert not (tmp_path / "run").exists()
