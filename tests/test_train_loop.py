"""The one training loop: plug-ins off ≡ baseline to the bit, β=γ=1 ≡ no hook, exact resume,
hooks under gradient checkpointing, CRaFT and Thermostat at work, the NaN guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train_fixtures import base_stage, clone, make_cache, make_model, make_teacher_artifacts  # noqa: E402

from vlaforget.train.loop import run_training  # noqa: E402

HSW = {"enabled": True, "groups": "icsm", "beta": 1.0, "gamma": 1.0, "clamp": "per_token", "eps": 1e-12,
       "use_sensitivity_order": True}
THERMO = {"enabled": True, "every": 2, "probe_batch": 24, "warmup_measurements": 1, "metric": "basis",
          "threshold_sigmas": 0.0, "gain": 50.0, "gamma_min": 0.0, "gamma_max": 1.0, "beta_min": 0.2,
          "beta_max": 1.0, "smoothing": 0.0}
CRAFT = {"enabled": True, "epsilon": 0.0, "lambda_init": 0.0, "lambda_lr": 0.5, "dual": True,
         "fixed_lambda": 0.1, "projection": True, "anchor": "mean_image_tokens"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "data" / "vlaforget"
    root.mkdir(parents=True)
    cache = make_cache(root)
    model = make_model(root)
    make_teacher_artifacts(root, cache, model)
    return root, cache, model


def metrics(sc) -> list[dict]:
    return [json.loads(line) for line in (Path(sc["out_dir"]) / "metrics.jsonl").read_text().splitlines()]


def adapter(sc) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(sc["out_dir"]) / "final" / "adapter_model.safetensors"))


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fresh(sc, name):
    return clone(sc, out_dir=str(Path(sc["out_dir"]).parent / name), run_id=f"{name}-id")


def test_baseline_trains_and_writes_completion_record(world):
    root, cache, model = world
    sc = base_stage(root, cache, model, max_steps=12)
    res = run_training(sc)
    m = metrics(sc)
    assert [r["step"] for r in m] == list(range(1, 13))
    assert m[-1]["loss"] < m[0]["loss"]  # learning happens
    done = json.loads((Path(sc["out_dir"]) / "final" / "done.json").read_text())
    assert done["steps"] == 12 and res["run_id"] == sc["run_id"]
    assert (Path(sc["out_dir"]) / "final" / "adapter_config.json").exists()
    assert (Path(sc["out_dir"]) / "train_progress.log").read_text().startswith("Step 1/12 | Loss:")


def test_plugins_off_is_baseline_to_the_bit(world):
    root, cache, model = world
    a = fresh(base_stage(root, cache, model), "bit_a")
    off = {"hsw": dict(HSW, enabled=False), "thermostat": dict(THERMO, enabled=False),
           "craft": dict(CRAFT, enabled=False)}
    b = fresh(base_stage(root, cache, model, method_name="icsm_hsw_thermostat", method=off), "bit_b")
    run_training(a)
    run_training(b)
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]
    assert same_params(adapter(a), adapter(b))


def test_hsw_identity_gains_equal_no_hook(world):
    root, cache, model = world
    a = fresh(base_stage(root, cache, model), "id_a")
    b = fresh(base_stage(root, cache, model, method_name="hsw_id", method={"hsw": HSW}), "id_b")
    run_training(a)
    run_training(b)
    mb = metrics(b)
    assert all("hsw_g_norm" in r for r in mb)  # the hooks did fire
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in mb]
    assert same_params(adapter(a), adapter(b))


def test_hsw_changes_update_and_never_amplifies(world):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model, method_name="hsw",
                          method={"hsw": dict(HSW, beta=0.5, gamma=0.1)}), "hsw_on")
    run_training(sc)
    m = metrics(sc)
    for r in m:
        assert r["hsw_gprime_norm"] <= r["hsw_g_norm"] * (1 + 1e-6)
        assert r["hsw_gf_norm"] > 0
    base = fresh(base_stage(root, cache, model), "hsw_ref")
    run_training(base)
    assert not same_params(adapter(sc), adapter(base))


def test_hooks_fire_under_gradient_checkpointing(world):
    root, cache, model = world
    meth = {"hsw": dict(HSW, beta=0.5, gamma=0.1)}
    a = fresh(base_stage(root, cache, model, method_name="hsw", method=meth), "gc_off")
    b = fresh(base_stage(root, cache, model, method_name="hsw", method=meth, gradient_checkpointing=True), "gc_on")
    run_training(a)
    run_training(b)
    ma, mb = metrics(a), metrics(b)
    for ra, rb in zip(ma, mb):
        assert rb["hsw_g_norm"] == pytest.approx(ra["hsw_g_norm"], rel=1e-4)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)


def test_thermostat_moves_beta_gamma(world):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model, method_name="icsm_hsw_thermostat", max_steps=8, lr=5e-3,
                          method={"hsw": HSW, "thermostat": THERMO}), "thermo")
    run_training(sc)
    m = metrics(sc)
    d = [r["drift_d"] for r in m if "drift_d" in r]
    assert len(d) == 4 and all(x >= 0 for x in d)
    gammas = [r["hsw_gamma"] for r in m]
    assert gammas[0] == 1.0 and min(gammas) < 1.0  # protection kicked in after calibration
    assert min(r["hsw_beta"] for r in m) >= THERMO["beta_min"]


def test_craft_logs_and_dual_variable(world):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model, method_name="craft", method={"craft": CRAFT}), "craft")
    run_training(sc)
    m = metrics(sc)
    for k in ("L_act", "L_ret", "lambda_before", "lambda_after", "grad_dot", "grad_cos", "conflict_ratio",
              "projection", "epsilon"):
        assert k in m[-1], k
    assert m[-1]["lambda_after"] > 0  # epsilon 0: any retention loss raises lambda
    assert all(0.0 <= r["conflict_ratio"] <= 1.0 for r in m)


def test_resume_after_interruption_is_exact(world):
    root, cache, model = world
    full = fresh(base_stage(root, cache, model, method_name="icsm_hsw_thermostat", lr=5e-3,
                            method={"hsw": HSW, "thermostat": THERMO}), "res_full")
    part = fresh(full, "res_part")
    run_training(full)
    assert run_training(part, stop_after=4) == {"stopped_at": 4}  # killed after step 4; last save at 3
    assert not (Path(part["out_dir"]) / "final").exists()
    run_training(part)  # the rerun continues from step 3
    assert same_params(adapter(full), adapter(part))
    steps = [r["step"] for r in metrics(part)]
    # step 4 was redone after the resume; the logs were cut back to the checkpoint (step 3) first
    assert steps == [1, 2, 3, 4, 5, 6]


def test_nan_guard_skips_and_counts(world, monkeypatch):
    root, cache, model = world
    from vlaforget.models.base import VLABackend

    orig = VLABackend.action_metrics
    calls = {"n": 0}

    def poisoned(self, batch, logits):
        out = orig(self, batch, logits)
        calls["n"] += 1
        if calls["n"] == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(VLABackend, "action_metrics", poisoned)
    sc = fresh(base_stage(root, cache, model), "nan")
    res = run_training(sc)
    assert res["skipped_steps"] == 1 and res["steps"] == 6
