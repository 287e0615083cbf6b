"""`vlaforget bench train` times the method as the study runs it (issue 28, noticed in session 10):
the user's Thermostat law — a measure-only warm-up measuring every step with the paired estimator on
thermostat.probe_batch samples — not only the issue-16 calibrated law (64 probes every K steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _bench(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLAFORGET_ROOT": str(tmp_path / "root")}
    env["VLAFORGET_ALLOWED_ROOT"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "vlaforget.cli", "bench", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def test_bench_train_times_the_users_thermostat_law(tmp_path):
    icsm = tmp_path / "icsm"
    _bench(
        [
            "icsm",
            "--shape",
            "tiny",
            "--out",
            str(icsm),
            "--n-probe",
            "24",
            "--sens",
            "8",
            "--r",
            "8",
            "--probe-batch",
            "8",
        ],
        tmp_path,
    )
    out = tmp_path / "train.json"
    _bench(
        [
            "train",
            "--shape",
            "tiny",
            "--icsm-dir",
            str(icsm),
            "--methods",
            "icsm_hsw_thermostat",
            "--steps",
            "5",
            "--warmup",
            "1",
            "--thermostat-warmup",
            "3",
            "--thermostat-probes",
            "16",
            "--batch",
            "2",
            "--accum",
            "1",
            "--json",
            str(out),
        ],
        tmp_path,
    )
    res = json.loads(out.read_text())["methods"]["icsm_hsw_thermostat"]
    assert "error" not in res, res
    assert res["thermostat_law"] == "user"
    # the warm-up measures at every one of its 3 steps, then every 50 (settings default): none more
    assert res["thermostat_measurements"] == 3
    assert res["thermostat_time_s_median"] > 0


def test_bench_export_merge_keeps_fp16_weights_fp16():
    """Issue 28 run 3's fp16 out-of-memory: the trained model's LoRA is fp32 under fp16
    (prepare_model, for GradScaler), and peft 0.11.1's merge (`W = W + ΔW`) then turned every merged
    fp16 weight into fp32 — the 7B model grew to ~28 GiB. The bench's merge emulates the export
    stage, which loads the adapter in the base dtype: weights stay fp16. (Fails on the old code with
    peft 0.11.1; newer peft casts ΔW itself, so there it passes either way.)"""
    import torch

    from vlaforget.bench import _export_merge
    from vlaforget.models.tiny import random_tiny_backend
    from vlaforget.settings import TrainSettings
    from vlaforget.train.loop import prepare_model

    backend = random_tiny_backend(action_dim=7, device="cpu")
    backend.model.half()
    for p in backend.model.parameters():
        p.requires_grad_(False)
    ts = TrainSettings.of(
        {
            "max_steps": 1,
            "batch_size": 1,
            "lr": 1e-4,
            "precision": "fp16",
            "gradient_checkpointing": False,
            "lora": {"r": 4, "alpha": 4},
        }
    )
    model = prepare_model(backend, ts, seed=0)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # as training holds them
    backend.model = model
    with torch.no_grad():  # LoRA B is zero at init: give it values so the merge changes W
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    out = _export_merge(backend)
    assert out["export_merged_layers"] > 0
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float16 for n in before)
    assert all(after[n].shape == before[n].shape for n in before)
    # and the merge did merge: every merged weight moved by its B A
    assert all(not torch.equal(after[n].float(), before[n].float()) for n in before)
