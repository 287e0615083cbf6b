"""Every method under DDP on the CPU (gloo, 2 ranks, torchrun --standalone as train.smk launches it,
tiny model): the gradient the optimizer gets after HSW's surgery / CRaFT's projection equals one
process with the same global batch; β, γ, λ and the Thermostat's d are identical on every rank (rank
0's value broadcast, even when the ranks' own measurements differ); periodic evaluation and every
write happen on rank 0 only; a kill -9 of one rank kills the job and the rerun ends exactly where an
uninterrupted run ends; the GPU slots of `vlaforget gpu-run` stay held until every rank has exited.
What these cannot show (NCCL, step time and memory per GPU at 7B shape): docs/DEVELOPMENT.md, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ddp_worker import recorded
from train_fixtures import CRAFT_TEST, base_stage, clone, run_adapter, run_metrics, teacher_world

from vlaforget import gpus

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
HSW = {
    "enabled": True,
    "groups": "icsm",
    "beta": 0.8,
    "gamma": 0.6,
    "clamp": "per_token",
    "eps": 1e-12,
    "use_sensitivity_order": True,
}
# the user's law (the default): warm-up at steps 0-1 (measured after the backward, before the
# optimizer step), control at 2 and 3; k large enough to move γ on the tiny model
THERMO = {
    "enabled": True,
    "law": "user",
    "estimator": "paired",
    "metric": "raw",
    "every": 1,
    "warmup_steps": 2,
    "base_scale": 0.5,
    "k_beta": 100.0,
    "k_gamma": 1000.0,
    "probe_batch": 12,
    "gamma_min": 0.0,
    "gamma_max": 1.0,
    "beta_min": 0.2,
    "beta_max": 1.0,
}
CRAFT = dict(CRAFT_TEST, anchor_batch_size=6)
# the study's three methods, and all plug-ins at once (the resume test: every plug-in's state)
METHODS = {
    "baseline": {},
    "icsm_hsw_thermostat": {"hsw": HSW, "thermostat": THERMO},
    "craft": {"craft": CRAFT},
    "hsw_thermostat_craft": {"hsw": HSW, "thermostat": THERMO, "craft": CRAFT},
}
STEPS, GLOBAL_BATCH, RANKS = 4, 4, 2
# fields of metrics.jsonl that are a function of the run (not of the clock or the world size)
RUN_FIELDS = (
    "train_loss",
    "action_accuracy",
    "grad_norm",
    "lr",
    "hsw_beta",
    "hsw_gamma",
    "drift_d",
    "lambda",
    "L_ret",
    "grad_dot",
    "projection",
    "eval_success_rate",
    "hsw_g_norm",
    "hsw_gprime_norm",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return teacher_world(tmp_path_factory, "ddp")


def stage(world, method, out, world_size):
    root, cache, model = world
    sc = base_stage(
        root,
        cache,
        model,
        method_name=method,
        method=METHODS[method],
        max_steps=STEPS,
        save_steps=2,
        eval_every=2,
        lr=5e-3,
        batch_size=GLOBAL_BATCH // world_size,
        nproc=world_size,
    )
    return clone(sc, out_dir=str(root / out / method), run_id=f"{method}-ddp")


def torchrun(tmp, name, runs, ranks=RANKS, kill=None, perturb=False, watch=None, timeout=240):
    rec = tmp / name
    rec.mkdir(parents=True, exist_ok=True)
    spec = rec / "spec.json"
    spec.write_text(
        json.dumps({"runs": runs, "record_dir": str(rec), "kill": kill, "perturb": perturb, "watch": watch})
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
        OMP_NUM_THREADS="1",
        VLAFORGET_THREADS="1",
        VLAFORGET_NO_PROGRESS="1",
    )
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        "--monitor-interval",
        "0.2",
        str(REPO / "tests" / "ddp_worker.py"),
        str(spec),
    ]
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    recs = [
        torch.load(rec / f"rank{i}.pt", weights_only=False)
        for i in range(ranks)
        if (rec / f"rank{i}.pt").exists()
    ]
    return r, recs


@pytest.fixture(scope="module")
def ddp(world, tmp_path_factory):
    """Every method: 2 ranks x batch 2 (perturbed ranks > 0, writes of rank 1 audited) and the
    one-process reference with batch 4, same seed and data order."""
    tmp = tmp_path_factory.mktemp("ddp_rec")
    root = world[0]
    runs = [stage(world, m, "ddp2", RANKS) for m in METHODS]
    r, recs = torchrun(tmp, "ddp2", runs, perturb=True, watch=str(root / "ddp2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    ref_runs = [stage(world, m, "one", 1) for m in METHODS]
    from vlaforget.train import loop

    with recorded(0) as ref:
        for sc in ref_runs:
            loop.run_training(sc)  # the recorder's wrapper (it passes the periodic evaluator)
    return {"runs": runs, "recs": recs, "ref_runs": ref_runs, "ref": ref}


def _close(a, b, what, rel=1e-4, floor=1e-12):
    """a == b to rel x ||b|| + floor (float32 sums in another order: DDP averages two half-batch gradients)."""
    assert (a is None) == (b is None), what
    if a is not None:
        err, scale = float((a.double() - b.double()).norm()), float(b.double().norm())
        assert err <= rel * scale + floor, f"{what}: |a - b| = {err:.3g}, |b| = {scale:.3g}"


@pytest.mark.parametrize("method", list(METHODS))
def test_update_equals_one_process_with_the_global_batch(ddp, method):
    i = list(METHODS).index(method)
    ref = ddp["ref"][i]["steps"]
    for rec in ddp["recs"]:
        steps = rec["runs"][i]["steps"]
        assert len(steps) == len(ref) == STEPS
        for s, (a, b) in enumerate(zip(steps, ref)):
            assert len(a["grads"]) == len(b["grads"])
            # HSW flow_down at γ = 0 (the Thermostat's floor here) leaves some lower LoRA gradients 1e3 x
            # smaller than the step's: float32 rounding of the components it subtracts is absolute, at the
            # scale of the unsurgered gradient, so the floor is relative to the whole step's gradient
            total = math.sqrt(sum(float(g.double().norm()) ** 2 for g in b["grads"] if g is not None))
            for k, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
                _close(ga, gb, f"{method} rank {rec['rank']} step {s + 1} grad {k}", floor=1e-6 * total)
    m_ddp, m_one = run_metrics(ddp["runs"][i]), run_metrics(ddp["ref_runs"][i])
    assert [r["step"] for r in m_ddp] == [r["step"] for r in m_one]
    for a, b in zip(m_ddp, m_one):  # logged values are the global batch's, not rank 0's half
        for k in RUN_FIELDS:
            assert (k in a) == (k in b), (method, k)
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (method, a["step"], k)
    ad, ao = run_adapter(ddp["runs"][i]), run_adapter(ddp["ref_runs"][i])
    assert ad.keys() == ao.keys()
    # HSW flow_down at γ = 0: Adam normalises the tiny gradients above, so their float32 rounding (checked
    # step by step above) reaches the weights at ~1e-4 of a tensor's norm after 4 steps
    rel = 1e-3 if "hsw" in METHODS[method] else 1e-4
    for k in ad:
        _close(ad[k], ao[k], f"{method} final adapter {k}", rel=rel)


def test_controllers_identical_on_every_rank(ddp):
    """Ranks > 0 measure d and L_ret 1e-6 apart from rank 0 (worker `perturb`): β, γ, d, the
    Thermostat's warm-up history and baseline (its whole law state) and λ must still be
    bit-identical, i.e. broadcast, not computed on each rank."""
    keys = ("beta", "gamma", "d", "law_state", "law_beta", "law_gamma", "lmbda")
    r0 = ddp["recs"][0]
    seen = set()
    for rec in ddp["recs"][1:]:
        for run0, run in zip(r0["runs"], rec["runs"]):
            for s, (a, b) in enumerate(zip(run0["steps"], run["steps"])):
                for k in keys:
                    if k in a:
                        seen.add(k)
                        assert a[k] == b[k], (
                            f"{run['run_id']} step {s + 1}: {k} rank 0 {a[k]!r} vs rank {rec['rank']} {b[k]!r}"
                        )
    assert seen == set(keys)
    th = ddp["recs"][0]["runs"][1]["steps"]
    assert len({round(s["gamma"], 9) for s in th}) > 1, "the Thermostat never moved γ: the test shows nothing"
    cr = ddp["recs"][0]["runs"][2]["steps"]
    assert len({s["lmbda"] for s in cr}) > 1, "λ never moved: the test shows nothing"


def test_eval_and_writes_on_rank_0_only(ddp):
    for rec in ddp["recs"]:
        for run in rec["runs"]:
            evals = run["evals"]
            if rec["rank"] == 0:
                assert [e["rank"] for e in evals] == [0], run["run_id"]  # step 2 of 4 (eval_every 2)
                assert not evals[0]["ddp_wrapped"]  # the bare model: no DDP collective on one rank
            else:
                assert evals == [], f"rank {rec['rank']} ran the periodic evaluation of {run['run_id']}"
        if rec["rank"] > 0:
            assert rec["writes"] == [], f"rank {rec['rank']} wrote {rec['writes'][:5]}"
    for sc in ddp["runs"]:
        evals = [r for r in run_metrics(sc) if "eval_success_rate" in r]
        assert [(r["step"], r["eval_success_rate"]) for r in evals] == [(2, 0.25)]
        done = json.loads((Path(sc["out_dir"]) / "final" / "done.json").read_text())
        assert done["world_size"] == RANKS and done["steps"] == STEPS


def test_kill_9_of_one_rank_resumes_exactly(ddp, world, tmp_path):
    method = "hsw_thermostat_craft"  # HSW gains, Thermostat law + probe generator, λ + anchor generator
    i = list(METHODS).index(method)
    sc = clone(ddp["runs"][i], out_dir=str(Path(world[0]) / f"killed_{method}" / method))
    r, _ = torchrun(
        tmp_path, "killed", [sc], kill={"rank": 1, "step": 3}, perturb=True
    )  # FAULT: rank 1 killed in step 3
    assert r.returncode != 0
    out = Path(sc["out_dir"])
    assert not (out / "final").exists()
    latest = json.loads((out / "checkpoints" / sc["run_id"] / "latest.json").read_text())
    assert latest["step"] == 2
    r, recs = torchrun(tmp_path, "rerun", [sc], perturb=True)
    assert r.returncode == 0, r.stderr[-6000:]
    assert [len(rec["runs"][0]["steps"]) for rec in recs] == [STEPS - 2] * RANKS  # steps 3, 4 only
    a, b = run_adapter(sc), run_adapter(ddp["runs"][i])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs"
    ma, mb = run_metrics(sc), run_metrics(ddp["runs"][i])
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for x, y in zip(ma, mb):
        assert {k: x.get(k) for k in RUN_FIELDS} == {k: y.get(k) for k in RUN_FIELDS}, x["step"]


SLOT_WORKER = r"""
import os, sys, time, torch.distributed as dist
dist.init_process_group("gloo")
rank, d = dist.get_rank(), sys.argv[1]
open(os.path.join(d, f"pid{rank}"), "w").write(str(os.getpid()))
dist.barrier()
if rank == 1:  # the last rank lingers until told (or 60 s)
    for _ in range(600):
        if os.path.exists(os.path.join(d, "go")):
            break
        time.sleep(0.1)
"""


def _alive(pid):
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _wait(cond, what, timeout=60):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, what
        time.sleep(0.05)


def test_gpu_slots_held_until_every_rank_exits(tmp_path, monkeypatch):
    """`gpu-run --gpus 2 -- torchrun --nproc-per-node 2 ...` (train.smk's line) on 2 fake GPU slots:
    busy while any rank lives -- after rank 0 has exited, and after the launcher is killed -9 while
    rank 1 still runs -- and free once the last rank is gone."""
    monkeypatch.setenv("VLAFORGET_NUM_GPUS", "2")
    monkeypatch.setenv("VLAFORGET_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    worker = tmp_path / "slot_worker.py"
    worker.write_text(SLOT_WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(
        [
            PY,
            "-m",
            "vlaforget.cli",
            "gpu-run",
            "--gpus",
            "2",
            "--poll",
            "0.05",
            "--",
            PY,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(worker),
            str(tmp_path),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    locks = gpus.lock_dir()
    pids = {}
    try:
        _wait(
            lambda: all(
                (tmp_path / f"pid{r}").exists() and (tmp_path / f"pid{r}").read_text() for r in (0, 1)
            ),
            "the ranks never started",
        )
        pids = {r: int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)}
        _wait(lambda: not _alive(pids[0]), "rank 0 never exited")
        assert _alive(pids[1])
        assert gpus.try_acquire(1, ["0", "1"], locks) is None  # rank 1 still runs: both slots busy
        os.kill(launcher.pid, signal.SIGKILL)  # FAULT: the launcher (gpu-run exec'd torchrun) dies
        launcher.wait(30)
        if _alive(pids[1]):  # an orphaned rank keeps the job's slots
            assert gpus.try_acquire(1, ["0", "1"], locks) is None
        (tmp_path / "go").write_text("1")
        _wait(lambda: not _alive(pids[1]), "rank 1 never exited")
    finally:
        (tmp_path / "go").write_text("1")
        if launcher.poll() is None:
            os.kill(launcher.pid, signal.SIGKILL)
            launcher.wait(30)

    def free():
        held = gpus.try_acquire(2, ["0", "1"], locks)
        if held is not None:
            gpus.release(held)
        return held is not None

    _wait(free, "the slots stayed busy after every rank exited", timeout=20)
