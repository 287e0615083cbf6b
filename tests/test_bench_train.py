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
