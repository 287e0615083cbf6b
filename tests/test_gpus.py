"""Lock-based GPU slots with simulated GPUs (VLAFORGET_NUM_GPUS): distinct ids, multi-GPU jobs,
release on exit, waiting when none are free, out of the way under SLURM."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from vlaforget import gpus


@pytest.fixture
def sim(tmp_path, monkeypatch):
    monkeypatch.setenv("VLAFORGET_NUM_GPUS", "4")
    monkeypatch.setenv("VLAFORGET_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def gpu_run(n, out, sleep=0.0, extra=(), env=None):
    """Start `vlaforget gpu-run --gpus n -- python -c <write CVD to out; sleep>` in the background."""
    code = (
        f"import os,time; open({str(out)!r},'w').write(os.environ.get('CUDA_VISIBLE_DEVICES','<unset>')); "
        f"time.sleep({sleep})"
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vlaforget.cli",
            "gpu-run",
            "--gpus",
            str(n),
            "--poll",
            "0.05",
            *extra,
            "--",
            sys.executable,
            "-c",
            code,
        ],
        env=env or os.environ.copy(),
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_file(p, timeout=20):
    t0 = time.time()
    while not (p.exists() and p.read_text()):
        assert time.time() - t0 < timeout, f"{p} never written"
        time.sleep(0.05)
    return p.read_text()


def test_visible_gpus_env(sim):
    assert gpus.visible_gpus() == ["0", "1", "2", "3"]


def test_visible_gpus_from_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("VLAFORGET_NUM_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert gpus.visible_gpus() == ["2", "5"]


def test_concurrent_jobs_get_distinct_ids(sim):
    procs = [gpu_run(1, sim / f"o{i}", sleep=1.5) for i in range(4)]
    ids = [wait_file(sim / f"o{i}") for i in range(4)]
    for p in procs:
        assert p.wait(20) == 0
    assert sorted(ids) == ["0", "1", "2", "3"]


def test_four_gpu_job_gets_four(sim):
    p = gpu_run(4, sim / "o")
    assert p.wait(20) == 0
    assert sorted(wait_file(sim / "o").split(",")) == ["0", "1", "2", "3"]


def test_released_slot_is_reused_and_waiting(sim):
    big = gpu_run(4, sim / "big", sleep=1.0)
    wait_file(sim / "big")
    t0 = time.time()
    small = gpu_run(1, sim / "small")
    assert small.wait(20) == 0
    waited = time.time() - t0
    assert big.wait(20) == 0
    assert wait_file(sim / "small") in {"0", "1", "2", "3"}
    assert waited > 0.5  # it could only start once the 4-GPU job exited
    assert "waiting for 1 free GPU" in small.stderr.read()


def test_killed_job_releases_its_slots(sim):
    p = gpu_run(4, sim / "o", sleep=60)
    wait_file(sim / "o")
    p.kill()
    p.wait(10)
    held = gpus.acquire(4, locks=sim / "locks", timeout=5, poll=0.05)
    assert sorted(held) == ["0", "1", "2", "3"]
    gpus.release(held)


def test_in_process_acquire_timeout_and_partial_release(sim):
    locks = sim / "locks"
    locks.mkdir()
    held = gpus.acquire(3, locks=locks, timeout=1)
    with pytest.raises(gpus.GpuAllocationError, match="no 2 free GPU"):
        gpus.acquire(2, locks=locks, timeout=0.2, poll=0.05)
    # the failed attempt held nothing: the one free GPU is still takeable
    one = gpus.acquire(1, locks=locks, timeout=1)
    assert set(one).isdisjoint(held)
    gpus.release(held)
    gpus.release(one)


def test_more_gpus_than_visible_is_a_clear_error(sim):
    p = gpu_run(8, sim / "o")
    assert p.wait(20) == 2
    assert "asks for 8 GPU(s) but this machine shows 4" in p.stderr.read()


def test_zero_gpus_and_slurm_are_plain_exec(sim):
    p = gpu_run(0, sim / "zero")
    assert p.wait(20) == 0 and wait_file(sim / "zero") == "<unset>"
    env = os.environ.copy()
    env.update(SLURM_JOB_ID="123", CUDA_VISIBLE_DEVICES="7")
    p = gpu_run(2, sim / "slurm", env=env)
    assert p.wait(20) == 0 and wait_file(sim / "slurm") == "7"
    assert not (sim / "locks").exists() or not list((sim / "locks").glob("gpu*.lock"))
