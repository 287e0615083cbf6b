"""The one training loop: plug-ins off ≡ baseline to the bit, β=γ=1 ≡ no hook, exact resume,
hooks under gradient checkpointing, CRaFT and Thermostat at work, the NaN guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_fixtures import CRAFT_TEST, base_stage, clone, run_adapter, run_metrics, teacher_world

from vlaforget.train.loop import run_training

HSW = {
    "enabled": True,
    "groups": "icsm",
    "beta": 1.0,
    "gamma": 1.0,
    "clamp": "per_token",
    "eps": 1e-12,
    "use_sensitivity_order": True,
}
# the calibrated law (thermostat.law: calibrated; noise floor before step 1)
THERMO = {
    "enabled": True,
    "law": "calibrated",
    "estimator": "full",
    "every": 2,
    "probe_batch": 24,
    "warmup_measurements": 1,
    "metric": "basis",
    "threshold_sigmas": 0.0,
    "gain": 50.0,
    "gamma_min": 0.0,
    "gamma_max": 1.0,
    "beta_min": 0.2,
    "beta_max": 1.0,
    "smoothing": 0.0,
}
# the user's law (the default) with a short warm-up and a gain that moves γ on the tiny model
THERMO_USER = {
    "enabled": True,
    "law": "user",
    "estimator": "paired",
    "metric": "raw",
    "every": 2,
    "warmup_steps": 3,
    "base_scale": 0.5,
    "k_beta": 30.0,
    "k_gamma": 100.0,
    "beta_min": 0.2,
    "beta_max": 1.0,
    "gamma_min": 0.1,
    "gamma_max": 1.0,
    "probe_batch": 8,
}
CRAFT = CRAFT_TEST


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return teacher_world(tmp_path_factory, "train")


metrics, adapter = run_metrics, run_adapter


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
    assert m[-1]["train_loss"] < m[0]["train_loss"]  # learning happens
    done = json.loads((Path(sc["out_dir"]) / "final" / "done.json").read_text())
    assert done["steps"] == 12 and res["run_id"] == sc["run_id"]
    assert (Path(sc["out_dir"]) / "final" / "adapter_config.json").exists()
    assert (Path(sc["out_dir"]) / "train_progress.log").read_text().startswith("Step 1/12 | Loss:")


def test_plugins_off_is_baseline_to_the_bit(world):
    root, cache, model = world
    a = fresh(base_stage(root, cache, model), "bit_a")
    off = {
        "hsw": dict(HSW, enabled=False),
        "thermostat": dict(THERMO, enabled=False),
        "craft": dict(CRAFT, enabled=False),
    }
    b = fresh(base_stage(root, cache, model, method_name="icsm_hsw_thermostat", method=off), "bit_b")
    run_training(a)
    run_training(b)
    assert [r["train_loss"] for r in metrics(a)] == [r["train_loss"] for r in metrics(b)]
    assert same_params(adapter(a), adapter(b))


def test_hsw_identity_gains_equal_no_hook(world):
    root, cache, model = world
    a = fresh(base_stage(root, cache, model), "id_a")
    b = fresh(base_stage(root, cache, model, method_name="hsw_id", method={"hsw": HSW}), "id_b")
    run_training(a)
    run_training(b)
    mb = metrics(b)
    assert all("hsw_g_norm" in r for r in mb)  # the hooks did fire
    assert [r["train_loss"] for r in metrics(a)] == [r["train_loss"] for r in mb]
    assert same_params(adapter(a), adapter(b))


def test_hsw_changes_update_and_never_amplifies(world):
    root, cache, model = world
    sc = fresh(
        base_stage(root, cache, model, method_name="hsw", method={"hsw": dict(HSW, beta=0.5, gamma=0.1)}),
        "hsw_on",
    )
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
    b = fresh(
        base_stage(root, cache, model, method_name="hsw", method=meth, gradient_checkpointing=True), "gc_on"
    )
    run_training(a)
    run_training(b)
    ma, mb = metrics(a), metrics(b)
    for ra, rb in zip(ma, mb):
        assert rb["hsw_g_norm"] == pytest.approx(ra["hsw_g_norm"], rel=1e-4)
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        # flow_down (the default): the gains measured below the lowest hook, also under checkpointing
        assert 0 < rb["hsw_eff_gain_f_g7"] == pytest.approx(ra["hsw_eff_gain_f_g7"], rel=1e-4)
    pa, pb = adapter(a), adapter(b)  # the surgery's extra backward works under checkpointing too
    assert pa.keys() == pb.keys() and all(torch.allclose(pa[k], pb[k], atol=1e-5) for k in pa)


def test_thermostat_moves_beta_gamma(world):
    root, cache, model = world
    sc = fresh(
        base_stage(
            root,
            cache,
            model,
            method_name="icsm_hsw_thermostat",
            max_steps=8,
            lr=5e-3,
            method={"hsw": HSW, "thermostat": THERMO},
        ),
        "thermo",
    )
    run_training(sc)
    m = metrics(sc)
    d = [r["drift_d"] for r in m if "drift_d" in r]
    assert len(d) == 4 and all(x >= 0 for x in d)
    assert [r["thermostat_phase"] for r in m if "drift_d" in r] == ["control"] * 4  # control from step K
    gammas = [r["hsw_gamma"] for r in m]
    assert gammas[0] == 1.0 and min(gammas) < 1.0  # protection kicked in after calibration
    assert min(r["hsw_beta"] for r in m) >= THERMO["beta_min"]


def test_craft_logs_and_dual_variable(world):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model, method_name="craft", method={"craft": CRAFT}), "craft")
    run_training(sc)
    m = metrics(sc)
    for k in (
        "L_act",
        "L_ret",
        "lambda_before",
        "lambda_after",
        "grad_dot",
        "grad_cos",
        "conflict_ratio",
        "projection",
        "epsilon",
    ):
        assert k in m[-1], k
    assert m[-1]["lambda_after"] > 0  # epsilon 0: any retention loss raises lambda
    assert all(0.0 <= r["conflict_ratio"] <= 1.0 for r in m)


def test_resume_after_interruption_is_exact(world):
    root, cache, model = world
    full = fresh(
        base_stage(
            root,
            cache,
            model,
            method_name="icsm_hsw_thermostat",
            lr=5e-3,
            method={"hsw": HSW, "thermostat": THERMO},
        ),
        "res_full",
    )
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


def test_thermostat_calibrates_before_the_first_step(world):
    """Issue 14.3: the noise floor is d on independent probe draws with student = teacher (before any
    optimizer step): the same draws on the bare teacher give the same d values."""
    from types import SimpleNamespace

    from vlaforget.data.cache import CachedDataset
    from vlaforget.data.probe import load_probe
    from vlaforget.models import load_backend
    from vlaforget.train.icsm_adapter import IcsmView
    from vlaforget.train.plugins import ThermostatPlugin

    root, cache, model = world
    th = dict(THERMO, warmup_measurements=3, every=3)
    sc = fresh(
        base_stage(
            root,
            cache,
            model,
            method_name="icsm_hsw_thermostat",
            max_steps=3,
            lr=5e-3,
            method={"hsw": dict(HSW, gamma=0.7), "thermostat": th},
        ),
        "calib",
    )
    run_training(sc)
    m = metrics(sc)
    first = m[0]
    assert first["step"] == 1 and first["thermostat_calibration_step"] == 0
    cal = first["thermostat_calibration_d"]
    assert len(cal) == 3 and first["thermostat_floor"] == pytest.approx(sum(cal) / 3)
    assert first["hsw_gamma"] == 0.7  # the law starts from the configured hsw.gamma
    # the same three draws through the teacher itself
    probe = load_probe(sc["probe_dir"])
    pds = CachedDataset(probe["dataset"]["cache_dir"], split=probe["split"])
    be = load_backend(sc["model"], stats=pds.statistics)
    ctx = SimpleNamespace(
        backend=be,
        model=be.model,
        autocast=lambda: torch.autocast("cpu", enabled=False),
        stage_cfg=sc,
        plugins={},
    )
    ref = ThermostatPlugin(
        ctx,
        th,
        IcsmView.load(sc["icsm_dir"]),
        [pds[int(i)] for i in probe["indices"]],
        int(sc["seed"]),
        hsw_cfg=dict(HSW, gamma=0.7),
    )
    ref.start(0)
    assert ref.law.calibration == pytest.approx(cal, rel=1e-5)
    assert [r["thermostat_phase"] for r in m if "drift_d" in r] == ["control"]  # step 3 = K


def test_probe_is_never_in_the_training_data(world):
    """Issue 14.4: the probe comes from the held-out episodes; its cache rows never meet a run's
    training rows (full or few-shot), and a probe drawn from the training split is refused."""
    import copy

    from vlaforget.data.cache import CachedDataset
    from vlaforget.data.probe import cache_rows, check_not_trained_on, load_probe
    from vlaforget.methods.icsm import MethodConfigError

    root, cache, _model = world
    probe = load_probe(root / "probe")
    assert probe["split"] == "heldout" and probe["source"]["trained_on"] is False
    assert probe["source"]["tasks"] == ["button-press-v3", "drawer-open-v3"]
    prow = cache_rows(CachedDataset(cache, split="heldout"), probe["indices"])
    for shots in (None, 1, 2):
        tr = CachedDataset(cache, split="train", shots=shots, seed=1)
        trows = cache_rows(tr, range(len(tr)))
        assert prow and trows and not prow & trows
        check_not_trained_on(probe, tr)  # no error
    bad = copy.deepcopy(probe)
    bad["split"] = "train"
    with pytest.raises(MethodConfigError, match="probe.split: heldout"):
        check_not_trained_on(bad, CachedDataset(cache, split="train"))


def test_dry_run_batches_preflight(world):
    """Issue 14.5: a few batches through forward + both backward passes, then stop, no update."""
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model, method_name="craft", method={"craft": CRAFT}), "dry")
    res = run_training(sc, dry_run_batches=2)
    assert res["dry_run_batches"] == 2
    for r in res["batches"]:
        assert r["train_loss"] > 0 and r["L_ret"] >= 0 and "grad_cos" in r
    out = Path(sc["out_dir"])
    assert json.loads((out / "dry_run.json").read_text())["dry_run_batches"] == 2
    assert not (out / "final").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()


def test_craft_anchor_cache_checked_against_the_run(world):
    """Issue 14.5: layer, pooling, dtype, hidden size and data subset of the anchor cache vs the run,
    before the first step, the error naming both."""
    from vlaforget.methods.icsm import MethodConfigError

    root, cache, model = world
    base = base_stage(root, cache, model, method_name="craft", method={"craft": CRAFT})
    for over, what in (
        ({"craft_layer": -3}, "layer"),
        ({"shots": 2}, "shots"),
        ({"model": dict(base["model"], dtype="bf16")}, "dtype"),
    ):
        sc = fresh(clone(base, **over), f"anch_{what}")
        with pytest.raises(MethodConfigError, match=what) as e:
            run_training(sc, dry_run_batches=1)
        assert "cache has" in str(e.value) and "the run needs" in str(e.value)
        assert not (Path(sc["out_dir"]) / "metrics.jsonl").exists()


def test_log_fields_console_line_and_wandb_keys(world):
    """Issue 14.6: the seeds' field names, console line and W&B keys."""
    from vlaforget.train.loop import format_progress, wandb_record

    root, cache, model = world
    sc = fresh(base_stage(root, cache, model, method_name="craft", method={"craft": CRAFT}), "fields")
    run_training(sc)
    rec = metrics(sc)[-1]
    for k in (
        "train_loss",
        "action_accuracy",
        "l1_loss",
        "L_act",
        "L_ret",
        "lambda",
        "epsilon",
        "grad_dot",
        "grad_cos",
        "projection",
        "conflict_ratio",
        "retention_nonfinite",
        "lambda_before",
        "lambda_after",
    ):
        assert k in rec, k
    line = (Path(sc["out_dir"]) / "train_progress.log").read_text().splitlines()[-1]
    assert line.startswith(
        f"Step 6/6 | Loss: {rec['train_loss']:.4f} | Ret: {rec['L_ret']:.4f}/{rec['epsilon']:.4f}"
        f" | λ: {rec['lambda_before']:.3f}->{rec['lambda_after']:.3f} | Conflict: "
    )
    assert " | GradNorm: " in line and " | LR: " in line
    assert line == format_progress(rec, 6)
    w = wandb_record(rec)
    for key in (
        "VLA Train/Loss",
        "VLA Train/Curr Action L1 Loss",
        "VLA Train/Gradient Norm",
        "VLA Train/Learning Rate",
        "CRaFT/Retention Loss",
        "CRaFT/Retention NonFinite",
        "CRaFT/Lambda",
        "CRaFT/Lambda Before",
        "CRaFT/Lambda After",
        "CRaFT/Conflict Ratio",
    ):
        assert key in w, key
    assert w["VLA Train/Loss"] == rec["train_loss"]


def test_fewshot_craft_anchors_come_from_the_fewshot_subset(world):
    """Issue 14.5: a few-shot run's anchors are drawn from the few-shot subset it trains on, and the
    run accepts them (the full-split cache is refused for it)."""
    from train_fixtures import TASKS, run_stage

    from vlaforget.data.cache import CachedDataset
    from vlaforget.data.probe import cache_rows
    from vlaforget.methods import craft
    from vlaforget.methods.icsm import MethodConfigError
    from vlaforget.stages import craft_anchors

    root, cache, model = world
    mb = {
        "backend": "tiny",
        "base": "tiny",
        "path": str(model),
        "dtype": "fp32",
        "cache_dir": str(root / "hf_cache"),
    }
    out = root / "artifacts" / "craft_fewshot"
    run_stage(
        craft_anchors,
        {
            "root": str(root),
            "allowed_root": str(root.parent),
            "world": "metaworld",
            "code": "x",
            "stage": "craft_anchors",
            "model": mb,
            "seed": 0,
            "shots": 1,
            "shots_seed": 1,
            "dataset": {"name": "toy", "cache_dir": str(cache), "tasks": TASKS},
            "craft": {"layer": -2, "pooling": "mean_image_tokens", "n_anchors": 16, "batch_size": 8},
            "out_dir": str(out),
        },
        root / "craft_fewshot.yaml",
    )
    a = craft.load_anchors(out)
    assert a["shots"] == 1 and a["shots_seed"] == 1 and len(a["indices"]) == 16
    sub = CachedDataset(cache, split="train", shots=1, seed=1)
    assert cache_rows(sub, a["indices"]) <= cache_rows(sub, range(len(sub)))
    full = cache_rows(CachedDataset(cache, split="train"), range(len(CachedDataset(cache, split="train"))))
    assert len(cache_rows(sub, range(len(sub)))) < len(full)
    base = base_stage(root, cache, model, method_name="craft", method={"craft": CRAFT})
    ok = fresh(clone(base, shots=1, craft_dir=str(out), craft_layer=-2), "fs_ok")
    assert run_training(ok, dry_run_batches=1)["dry_run_batches"] == 1
    with pytest.raises(MethodConfigError, match="shots"):  # the full-split cache for a 1-shot run
        run_training(fresh(clone(base, shots=1), "fs_bad"), dry_run_batches=1)


def _measured(m):
    return [(r["step"], r["thermostat_step"], r["thermostat_phase"]) for r in m if "drift_d" in r]


@pytest.mark.parametrize("estimator", ["paired", "full"])
def test_user_law_warmup_measures_every_step_then_controls_every_interval(world, estimator):
    """Issue 26.2, the user's finetune.py: 0-based steps 0..warmup_steps-1 are measured (after the
    backward, before the optimizer step: step 0 sees the teacher) with the gains held; then steps
    that are multiples of `every`; a measurement's gains apply from the next step on."""
    root, cache, model = world
    th = dict(THERMO_USER, estimator=estimator)
    sc = fresh(
        base_stage(
            root,
            cache,
            model,
            method_name="icsm_hsw_thermostat",
            max_steps=9,
            lr=5e-3,
            method={"hsw": dict(HSW, beta=0.9, gamma=0.8), "thermostat": th},
        ),
        f"user_{estimator}",
    )
    run_training(sc)
    m = metrics(sc)
    # record of step s (1-based) = 0-based step s-1
    assert _measured(m) == [
        (1, 0, "warmup"),
        (2, 1, "warmup"),
        (3, 2, "warmup"),
        (5, 4, "control"),
        (7, 6, "control"),
        (9, 8, "control"),
    ]
    warm = [r["drift_d"] for r in m if r.get("thermostat_phase") == "warmup"]
    assert [x for r in m for x in r.get("thermostat_warmup_d", [])] == [
        [0, warm[0]],
        [1, warm[1]],
        [2, warm[2]],
    ]
    base = sum(warm) / 3
    ctrl = [r for r in m if r.get("thermostat_phase") == "control"]
    for r in ctrl:  # the law on the logged numbers
        assert r["thermostat_baseline"] == pytest.approx(base)
        delta = max(0.0, r["drift_d"] - 0.5 * base)
        assert r["thermostat_delta"] == pytest.approx(delta)
        assert r["thermostat_gamma"] == pytest.approx(max(0.1, 1.0 / (1 + 100 * delta)))
        assert r["thermostat_beta"] == pytest.approx(max(0.2, 1.0 / (1 + 30 * delta)))
    # gains the steps' surgery used: held through step 4 (0-based) and the step measured at 4;
    # the update measured at 0-based step 4 drives steps 5 and 6, the one at 6 steps 7 and 8
    used = [(r["hsw_beta"], r["hsw_gamma"]) for r in m]
    assert used[:5] == [(0.9, 0.8)] * 5
    assert used[5] == used[6] == (ctrl[0]["thermostat_beta"], ctrl[0]["thermostat_gamma"])
    assert used[7] == used[8] == (ctrl[1]["thermostat_beta"], ctrl[1]["thermostat_gamma"])
    assert min(g for _, g in used) < 0.8  # the law acted
    if estimator == "paired":  # step 0 is the teacher: the same draw's teacher states -> d ~ 0
        assert warm[0] <= 1e-4 * max(r["drift_d"] for r in ctrl)


def test_user_law_resume_during_and_after_warmup_is_exact(world):
    """Issue 26.2: the warm-up history, baseline and gains travel in the checkpoint: a run killed
    during the warm-up, or after it, continues with the same β/γ sequence as an uninterrupted run."""
    root, cache, model = world
    th = dict(THERMO_USER, warmup_steps=4, every=2)
    full = fresh(
        base_stage(
            root,
            cache,
            model,
            method_name="icsm_hsw_thermostat",
            lr=5e-3,
            max_steps=10,
            method={"hsw": HSW, "thermostat": th},
        ),
        "ures_full",
    )
    run_training(full)

    def seq(sc):
        return [
            (r["step"], r["hsw_beta"], r["hsw_gamma"], r.get("drift_d"), r.get("thermostat_baseline"))
            for r in metrics(sc)
        ]

    ref = seq(full)
    assert len({g for _, _, g, _, _ in ref}) > 1
    for stop in (4, 8):  # checkpoints every 3 steps: resumed from step 3 (warm-up) and from 6 (control)
        part = fresh(full, f"ures_{stop}")
        assert run_training(part, stop_after=stop) == {"stopped_at": stop}
        run_training(part)
        assert seq(part) == ref, stop
        assert same_params(adapter(full), adapter(part))


def test_user_law_drops_the_measurement_of_a_skipped_step(world, monkeypatch):
    """A step the NaN guard skips is not taken: its warm-up measurement is dropped and the redo of
    that step index measures again, so the warm-up history has each index once."""
    from vlaforget.models.base import VLABackend

    orig = VLABackend.action_metrics
    calls = {"n": 0}

    def poisoned(self, batch, logits):
        out = orig(self, batch, logits)
        calls["n"] += 1
        if calls["n"] == 2:  # the first attempt at 0-based step 1
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(VLABackend, "action_metrics", poisoned)
    root, cache, model = world
    sc = fresh(
        base_stage(
            root,
            cache,
            model,
            method_name="icsm_hsw_thermostat",
            max_steps=5,
            lr=5e-3,
            method={"hsw": HSW, "thermostat": dict(THERMO_USER, warmup_steps=4)},
        ),
        "user_nan",
    )
    res = run_training(sc)
    assert res["skipped_steps"] == 1
    warm = [x for r in metrics(sc) for x in r.get("thermostat_warmup_d", [])]
    assert [i for i, _ in warm] == [0, 1, 2, 3]
    assert [r["thermostat_warmup_n"] for r in metrics(sc) if "thermostat_warmup_n" in r] == [1, 2, 3, 4]
