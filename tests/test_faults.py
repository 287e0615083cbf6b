"""Fault injection (issue 17): kills, corruption, second owners, divergence, bad input, moved roots.

Each test injects one or more faults (marked `# FAULT`) and checks the pipeline survives them: it
resumes or refuses with a message naming the cause and the fix, and where it resumes, the result is
bit-for-bit the one of an uninterrupted run. docs/troubleshooting.md says what the user sees and does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from train_fixtures import base_stage, clone, make_cache, make_model

from vlaforget import config as vfc
from vlaforget import freshness, gpus
from vlaforget import stageconfig as vsc
from vlaforget import stagefile as vsf
from vlaforget import study as vfs
from vlaforget.config import ConfigError
from vlaforget.io import CorruptInputError, DirLock, LockedError, atomic_write_text, config_id, verify_files
from vlaforget.train import checkpoint as ckpt
from vlaforget.train.loop import TrainingError, run_training

PY = sys.executable


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "data" / "vlaforget"
    root.mkdir(parents=True)
    cache = make_cache(root)
    model = make_model(root)
    return root, cache, model


def fresh(sc, name, **over):
    out = clone(sc, out_dir=str(Path(sc["out_dir"]).parent / name), run_id=f"{name}-id")
    out["train"] = {**out["train"], **over}
    return out


def adapter_bytes(sc) -> bytes:
    return (Path(sc["out_dir"]) / "final" / "adapter_model.safetensors").read_bytes()


def steps_logged(sc) -> list[int]:
    return [
        json.loads(x)["step"]
        for x in (Path(sc["out_dir"]) / "metrics.jsonl").read_text().splitlines()
        if "train_loss" in json.loads(x)
    ]


def cli(args, env=None, timeout=300):
    e = dict(
        os.environ,
        PYTHONPATH=str(REPO / "src"),
        VLAFORGET_NO_PROGRESS="1",
        OMP_NUM_THREADS="1",
        VLAFORGET_THREADS="1",
    )
    e.update(env or {})
    return subprocess.run(
        [PY, "-m", "vlaforget.cli", *args], env=e, capture_output=True, text=True, timeout=timeout
    )


def write_cfg(sc, path: Path) -> Path:
    path.write_text(yaml.safe_dump(sc))
    return path


# ----------------------------------------------------------------------------- 7 / exactness: real kill -9


def test_kill9_train_at_several_points_resumes_bit_identical(world, tmp_path):
    """kill -9 of the trainer mid-interval and right after a checkpoint, twice in one run: the rerun
    continues from the last checkpoint, the adapter equals an uninterrupted run's to the bit, the logs
    hold each step once and done.json's wall time sums the segments."""
    root, cache, model = world
    base = base_stage(root, cache, model, lr=5e-3, max_steps=6, save_steps=2)
    full, a, b = fresh(base, "k_full"), fresh(base, "k_a"), fresh(base, "k_b")
    r = cli(["train", "--config", str(write_cfg(full, tmp_path / "full.yaml"))])
    assert r.returncode == 0, r.stderr[-2000:]
    ref = adapter_bytes(full)

    # FAULT: kill -9 at step 3 (last checkpoint at 2)
    cfg_a = write_cfg(a, tmp_path / "a.yaml")
    r = cli(["train", "--config", str(cfg_a)], env={"VLAFORGET_FAULT_KILL_AT_STEP": "3"})
    assert r.returncode == -signal.SIGKILL
    assert not (Path(a["out_dir"]) / "final").exists()
    r = cli(["train", "--config", str(cfg_a)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr and "from step 2" in r.stderr
    assert adapter_bytes(a) == ref
    assert steps_logged(a) == [1, 2, 3, 4, 5, 6]

    # FAULT: kill -9 right after the checkpoint of step 4, then FAULT: again at step 5 of the rerun
    cfg_b = write_cfg(b, tmp_path / "b.yaml")
    assert cli(["train", "--config", str(cfg_b)], env={"VLAFORGET_FAULT_KILL_AT_STEP": "4"}).returncode == -9
    assert cli(["train", "--config", str(cfg_b)], env={"VLAFORGET_FAULT_KILL_AT_STEP": "5"}).returncode == -9
    r = cli(["train", "--config", str(cfg_b)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert adapter_bytes(b) == ref
    assert steps_logged(b) == [1, 2, 3, 4, 5, 6]
    done = json.loads((Path(b["out_dir"]) / "final" / "done.json").read_text())
    assert done["segments"] == 3 and done["config_id"] == config_id(b)
    assert done["wall_time_s"] > done["last_segment_s"]  # the killed segments count too


# ----------------------------------------------------------------------------- 5: corrupted checkpoint


def test_truncated_latest_checkpoint_falls_back_to_previous(world, caplog):
    root, cache, model = world
    base = base_stage(root, cache, model, lr=5e-3, max_steps=6, save_steps=2)
    full, part = fresh(base, "t_full"), fresh(base, "t_part")
    run_training(full)
    assert run_training(part, stop_after=5) == {"stopped_at": 5}  # checkpoints at 2 and 4
    ck = Path(part["out_dir"]) / "checkpoints" / part["run_id"]
    latest = ck / "step_00000004" / "state.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])  # FAULT: truncated state.pt
    with caplog.at_level("WARNING"):
        run_training(part)
    assert str(latest) in caplog.text and "falling back" in caplog.text
    assert adapter_bytes(part) == adapter_bytes(full)  # resumed from step 2: still exact
    assert steps_logged(part) == [1, 2, 3, 4, 5, 6]


def test_unreadable_latest_json_still_resumes(world, tmp_path):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model, max_steps=6, save_steps=2), "lj")
    run_training(sc, stop_after=3)
    ck = Path(sc["out_dir"]) / "checkpoints" / sc["run_id"]
    (ck / "latest.json").write_text("{torn")  # FAULT: torn latest.json
    path, state = ckpt.load_latest(ck)
    assert path.parent.name == "step_00000002" and state["step"] == 2


# ----------------------------------------------------------------------------- 2: one owner per run


def _hold_lock(path: Path):
    code = (
        f"import sys,time; sys.path.insert(0, {str(REPO / 'src')!r}); from vlaforget.io import DirLock; "
        f"DirLock({str(path)!r}, 'x').acquire(); print('held', flush=True); time.sleep(120)"
    )
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_trainer_is_refused_naming_host_and_pid(world):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model), "lock")
    holder = _hold_lock(Path(sc["out_dir"]) / ".lock")  # FAULT: an orphaned trainer owns the run dir
    try:
        with pytest.raises(LockedError) as e:
            run_training(sc)
        msg = str(e.value)
        assert f"pid={holder.pid}" in msg and f"host={socket.gethostname()}" in msg and "kill" in msg
        assert not (Path(sc["out_dir"]) / "metrics.jsonl").exists()  # nothing of the run touched
    finally:
        holder.kill()
        holder.wait()
    assert run_training(sc)["steps"] == 6  # the lock died with its holder: no stale lock to delete


def test_two_stage_processes_on_one_output_are_refused(tmp_path):
    out = tmp_path / "x.json"
    with DirLock(tmp_path / ".x.json.lock", f"output {out}"):
        with pytest.raises(LockedError, match=f"pid={os.getpid()}"):
            DirLock(tmp_path / ".x.json.lock", f"output {out}").acquire()  # FAULT: two drivers
    DirLock(tmp_path / ".x.json.lock", "x").acquire().release()


# ----------------------------------------------------------------------------- 3: GPU slot outlives its launcher


def test_gpu_slot_is_held_while_a_worker_of_the_job_lives(tmp_path, monkeypatch):
    monkeypatch.setenv("VLAFORGET_NUM_GPUS", "1")
    monkeypatch.setenv("VLAFORGET_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    pidfile = tmp_path / "worker.pid"
    # the launcher starts a worker that does not inherit the lock fd (like torchrun's), then dies
    # FAULT: the launcher is gone while its worker still uses the GPU
    launcher = (
        "import subprocess,sys; p=subprocess.Popen(['sleep','120'], close_fds=True, "
        "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        f"open({str(pidfile)!r},'w').write(str(p.pid))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    r = subprocess.run(
        [PY, "-m", "vlaforget.cli", "gpu-run", "--gpus", "1", "--", PY, "-c", launcher],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    worker = int(pidfile.read_text())
    try:
        locks = gpus.lock_dir()
        assert gpus.try_acquire(1, ["0"], locks) is None  # still busy
        with pytest.raises(gpus.GpuAllocationError):
            gpus.acquire(1, ids=["0"], locks=locks, timeout=0.5, poll=0.1)
    finally:
        os.kill(worker, signal.SIGKILL)
        for _ in range(100):
            if gpus.job_alive(open(locks / "gpu0.lock").read().split("job=")[1].strip()) is None:
                break
            time.sleep(0.05)
    held = gpus.try_acquire(1, ["0"], locks)
    assert held is not None and list(held) == ["0"]
    gpus.release(held)


# ----------------------------------------------------------------------------- 4: divergence


def _poison(monkeypatch, bad_calls):
    from vlaforget.models.base import VLABackend

    orig = VLABackend.action_metrics
    calls = {"n": 0}

    def poisoned(self, batch, logits):
        out = orig(self, batch, logits)
        calls["n"] += 1
        if bad_calls(calls["n"]):
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(VLABackend, "action_metrics", poisoned)


def test_nan_streak_rolls_back_once_with_lower_lr(world, monkeypatch, caplog):
    root, cache, model = world
    sc = fresh(
        base_stage(root, cache, model, max_steps=8, save_steps=2),
        "nan_rb",
        max_bad_steps=3,
        rollback_lr_factor=0.25,
    )
    _poison(monkeypatch, lambda n: 6 <= n <= 8)  # FAULT: three NaN steps in a row after step 5
    with caplog.at_level("WARNING"):
        res = run_training(sc)
    assert res["rollbacks"] == 1 and res["steps"] == 8
    assert "rolled back to the checkpoint of step 4" in caplog.text
    recs = [json.loads(x) for x in (Path(sc["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("rollback_lr_factor") == 0.25 for r in recs)
    assert recs[-1]["lr"] == pytest.approx(sc["train"]["lr"] * 0.25)
    assert [r["step"] for r in recs if "train_loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8]  # step 5 redone once


def test_persistent_nan_stops_after_one_rollback(world, monkeypatch):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model, max_steps=8, save_steps=2), "nan_stop", max_bad_steps=2)
    _poison(monkeypatch, lambda n: n >= 4)  # FAULT: every step NaN from step 4 on
    with pytest.raises(TrainingError, match="again after rolling back once.*lower train.lr"):
        run_training(sc)
    assert not (Path(sc["out_dir"]) / "final" / "done.json").exists()


def test_nan_before_first_checkpoint_says_so(world, monkeypatch):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model, max_steps=8, save_steps=4), "nan_early", max_bad_steps=2)
    _poison(monkeypatch, lambda n: n >= 2)  # FAULT
    with pytest.raises(TrainingError, match="no earlier checkpoint"):
        run_training(sc)


def test_flat_loss_run_is_not_marked_done(world):
    root, cache, model = world
    # FAULT: lr 1e10: no NaN with clipping, the loss never improves
    sc = fresh(
        base_stage(root, cache, model, max_steps=8, save_steps=4),
        "flat",
        lr=1e10,
        max_grad_norm=1.0,
        loss_check_min_steps=4,
    )
    with pytest.raises(TrainingError, match="did not improve.*train.lr"):
        run_training(sc)
    assert not (Path(sc["out_dir"]) / "final").exists()


# ----------------------------------------------------------------------------- 5: corrupted artifacts


def test_corrupted_cache_files_are_named_with_the_rule(world, tmp_path):
    _, cache, _ = world
    import shutil

    c = tmp_path / "cache"
    shutil.copytree(cache, c)
    m = json.loads((c / "manifest.json").read_text())
    freshness.verify_cache(c, m)  # intact
    import numpy as np

    a = np.load(c / "actions.npy")
    np.save(c / "actions.npy", a[::-1].copy())  # FAULT: overwritten with wrong data, same size
    with pytest.raises(CorruptInputError, match=r"actions.npy.*sha256.*'cache' rule"):
        freshness.verify_cache(c, m)
    np.save(c / "actions.npy", a)
    img = c / "images.u8"
    img.write_bytes(img.read_bytes()[:-100])  # FAULT: truncated images
    with pytest.raises(CorruptInputError, match=r"images.u8 has .* bytes but was written with"):
        freshness.verify_cache(c, m)


def test_hash_is_checked_once_then_again_when_mtime_changes(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 100)
    import hashlib

    want = hashlib.sha256(f.read_bytes()).hexdigest()
    calls = []

    def h(p):
        calls.append(p)
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()

    verify_files(tmp_path, {"a.bin": want}, rule="cache", hash_fn=h)
    verify_files(tmp_path, {"a.bin": want}, rule="cache", hash_fn=h)
    assert len(calls) == 1
    f.write_bytes(b"y" * 100)  # FAULT: rewritten
    with pytest.raises(CorruptInputError):
        verify_files(tmp_path, {"a.bin": want}, rule="cache", hash_fn=h)
    assert len(calls) == 2


def test_corrupted_adapter_is_refused_by_its_consumers(world):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model), "adapter_corrupt")
    run_training(sc)
    done = Path(sc["out_dir"]) / "final" / "done.json"
    consumer = {
        "stage": "eval",
        "inputs": {"train": {"file": str(done), "id": config_id(sc), "rule": "train"}},
    }
    freshness.check_inputs(consumer)
    f = Path(sc["out_dir"]) / "final" / "adapter_model.safetensors"
    b = bytearray(f.read_bytes())
    b[-10] ^= 0xFF
    f.write_bytes(bytes(b))  # FAULT: a flipped byte in the adapter
    with pytest.raises(CorruptInputError, match="adapter_model.safetensors.*'train' rule"):
        freshness.check_inputs(consumer)


# ----------------------------------------------------------------------------- 1: stale results


def _cfg(tmp_root, **over):
    files = [REPO / "config" / "config.yaml", REPO / "config" / "demo.yaml", REPO / "config" / "ci.yaml"]
    return vfc.load_config(*files, overrides=over or None)


RUN = "mw_downstream__baseline__full__s42"


def test_stale_adapter_is_refused_by_eval(tmp_root):
    r2 = vsc.stage_config(_cfg(tmp_root), "train", RUN)
    r4 = vsc.stage_config(_cfg(tmp_root, train={"lora": {"r": 4}}), "train", RUN)
    assert r2["run_id"] != r4["run_id"]
    for where in (r2, r4):  # FAULT: the r=2 run copied by hand to the r=4 run's path
        done = Path(where["out_dir"]) / "final" / "done.json"
        done.parent.mkdir(parents=True)
        done.write_text(json.dumps({"run_id": r2["run_id"], "config_id": config_id(r2)}))  # made with r=2
    ev4 = vsc.stage_config(_cfg(tmp_root, train={"lora": {"r": 4}}), "eval", f"{RUN}@mw_downstream")
    with pytest.raises(freshness.StaleInputError, match=r"final/done.json was made for config id .* 'train'"):
        freshness.check_inputs({**ev4, "inputs": {"train": ev4["inputs"]["train"]}})
    ev2 = vsc.stage_config(_cfg(tmp_root), "eval", f"{RUN}@mw_downstream")
    freshness.check_inputs({**ev2, "inputs": {"train": ev2["inputs"]["train"]}})


def test_a_changed_config_builds_beside_the_old_result(tmp_root):
    """A config change never rewrites the old result: its outputs get another path (issue 29), so
    whatever .snakemake holds, Snakemake finds the changed job's output missing."""
    sc2 = vsc.stage_config(_cfg(tmp_root), "train", RUN)
    sc4 = vsc.stage_config(_cfg(tmp_root, train={"lora": {"r": 4}}), "train", RUN)
    assert sc2["out_dir"] != sc4["out_dir"] and Path(sc2["out_dir"]).parent == Path(sc4["out_dir"]).parent
    assert config_id(sc2) in sc2["out_dir"] and config_id(sc4) in sc4["out_dir"]


def test_moving_the_data_root_keeps_ids_and_reruns_nothing(tmp_path, monkeypatch):
    ids = []
    for name in ("a", "b"):
        allowed = tmp_path / name
        allowed.mkdir()
        monkeypatch.setenv("VLAFORGET_ALLOWED_ROOT", str(allowed))
        monkeypatch.setenv("VLAFORGET_ROOT", str(allowed / "root"))
        cfg = _cfg(None)
        ids.append(
            {
                (st, k): (vsc.stage_config(cfg, st, k).get("run_id"), config_id(vsc.stage_config(cfg, st, k)))
                for st, k in [("train", RUN), ("eval", f"{RUN}@mw_downstream"), ("cache", "mw_downstream")]
            }
        )
    assert ids[0] == ids[1]  # same ids: the same relative paths under either root


def test_fresh_checkout_reruns_a_changed_config(tmp_path):
    """The issue's case end to end: every output present, `.snakemake` deleted, lora.r 2 -> 4: the
    workflow reruns every training run (it printed "Nothing to be done")."""
    import shutil

    from conftest import copy_workflow, snakemake

    wf = copy_workflow(tmp_path / "wf")
    env = {
        "VLAFORGET_ROOT": str(tmp_path / "data" / "root"),
        "VLAFORGET_ALLOWED_ROOT": str(tmp_path / "data"),
    }
    ci = ["--profile", "profiles/ci"]
    r = snakemake([*ci, "--summary"], cwd=wf, env=env)
    for line in r.stdout.splitlines()[1:]:
        p = Path(line.split("\t")[0])
        p = p if p.is_absolute() else wf / p
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    r = snakemake([*ci, "--touch", "--forceall"], cwd=wf, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.rmtree(wf / ".snakemake")  # FAULT: a fresh clone / second checkout on the same root
    old = next((Path(env["VLAFORGET_ROOT"]) / "configs" / "train" / RUN).glob("*.yaml"))
    r = subprocess.run(
        [
            PY,
            "-m",
            "vlaforget.cli",
            "stage-config",
            "--configfile",
            "config/config.yaml",
            "config/demo.yaml",
            "config/ci.yaml",
            "--stage",
            "train",
            "--key",
            RUN,
            "--out",
            str(old),
        ],
        cwd=wf,
        env={**os.environ, **env, "PYTHONPATH": str(wf / "src")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr  # (--touch left it empty: the text the workflow writes)
    (wf / "config" / "r4.yaml").write_text("train:\n  lora:\n    r: 4\n")
    over = [*ci, "--configfiles", "config/demo.yaml", "config/ci.yaml", "config/r4.yaml"]
    r = snakemake(["-n", *over], cwd=wf, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    # the dry-run says what changed against the config built before (which stays where it is)
    assert re.search(
        rf"train {RUN} builds \w+ beside {old.stem}: train\.lora\.r 2 -> 4$", r.stderr, re.MULTILINE
    ), r.stderr[-3000:]
    trained = {
        line.split("/runs/")[1].split("/")[0]
        for line in r.stdout.splitlines()
        if "/runs/" in line and "output:" in line
    }
    assert "mw_downstream__baseline__full__s42" in trained and len(trained) >= 5


# ----------------------------------------------------------------------------- 6 + 8: bad input


@pytest.mark.parametrize(
    "over,words",
    [
        (
            {"study": {"suites": ["mw_dwnstream"]}},
            ["study.suites", "mw_dwnstream", "Did you mean 'mw_downstream'"],
        ),
        ({"eval": {"forgetting": {"upstream_suites": ["mw_upstrem"]}}}, ["upstream_suites", "mw_upstrem"]),
        ({"train": {"lora": {"layers": [0, 9]}}}, ["train.lora.layers", "out of range", "4 decoder layers"]),
        ({"train": {"lora": {"layers": "0-3"}}}, ["train.lora.layers", "malformed", "[first, last]"]),
        ({"train": {"lora": {"layers": [2, 1]}}}, ["train.lora.layers", "out of range"]),
        ({"data": {"metaworld": {"datasets": {"mw_downstream": []}}}}, ["mw_downstream", "empty task list"]),
        ({"study": {"suites": []}}, ["study.suites is empty"]),
    ],
)
def test_bad_config_is_refused_at_config_time(tmp_root, over, words):
    t = time.time()
    with pytest.raises(ConfigError) as e:  # FAULT
        _cfg(tmp_root, **over)
    assert time.time() - t < 5
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_data_problems_are_found_before_any_job(tmp_root, tmp_path, monkeypatch):
    from vlaforget.validation import data_checks

    cfg = _cfg(
        tmp_root, probe={"n": 100000}, eval={"forgetting": {"vqa_jsonl": str(tmp_root / "nope.jsonl")}}
    )
    probs = "\n".join(data_checks(cfg))  # FAULT x2
    assert "probe.n = 100000" in probs and "lower probe.n" in probs
    assert "eval.forgetting.vqa_jsonl" in probs and "does not exist" in probs
    monkeypatch.setenv("VLAFORGET_ALLOWED_ROOT", "/opt/data/private")
    monkeypatch.setenv("VLAFORGET_ROOT", "/opt/data/private/vlaforget")
    real = vfc.load_config(
        REPO / "config" / "config.yaml", overrides={"data": {"rlds_dir": "/opt/data/private/missing_rlds"}}
    )
    assert any("data.rlds_dir" in p and "does not exist" in p for p in data_checks(real))  # FAULT
    rl = tmp_path / "rlds"
    (rl / "libero_spatial_no_noops").mkdir(parents=True)
    monkeypatch.setenv("VLAFORGET_ALLOWED_ROOT", str(tmp_path))
    monkeypatch.setenv("VLAFORGET_ROOT", str(tmp_path / "root"))
    real = vfc.load_config(REPO / "config" / "config.yaml", overrides={"data": {"rlds_dir": str(rl)}})
    probs = "\n".join(data_checks(real))  # FAULT: three suites' builder dirs missing
    assert "libero_object_no_noops" in probs and "'libero_spatial_no_noops' but" not in probs


def test_yaml_1e_minus_4_is_a_number(tmp_root, tmp_path):
    f = tmp_path / "lr.yaml"
    f.write_text("train:\n  lr: 1e-4\n")  # FAULT: YAML 1.1 reads this as a string
    files = [REPO / "config" / "config.yaml", REPO / "config" / "demo.yaml", f]
    assert vfc.load_config(*files)["train"]["lr"] == 1e-4
    cfg = vfc.load_config(REPO / "config" / "config.yaml", REPO / "config" / "demo.yaml")
    cfg["train"]["lr"] = "1e-4"  # as Snakemake's loader hands it over
    vfc.validate(cfg)
    assert cfg["train"]["lr"] == 1e-4


def test_symlinked_root_cannot_escape_the_allowed_root(tmp_path, monkeypatch):
    from vlaforget.paths import PathPolicyError, check_under

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "root").symlink_to(outside)  # FAULT
    with pytest.raises(PathPolicyError, match="a symlink to"):
        check_under(allowed / "root" / "runs", allowed, "root")


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "t.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "t.json").stat().st_mode & 0o777 == 0o664


def test_one_atomic_writer_for_files_videos_and_figures(tmp_path):
    """io.atomic_path is the one temp-file-then-replace: a failed write leaves the old file and no
    temp file; videos and figures go through it (umask-honouring mode, no stray .tmp files)."""
    from vlaforget.io import atomic_path

    target = tmp_path / "out" / "x.bin"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="writer died"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")  # FAULT
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]
    with atomic_path(target, suffix=".png") as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png"
        tmp.write_text("new")
    assert target.read_text() == "new"

    import numpy as np

    from vlaforget.eval.video import write_video
    from vlaforget.report.figures import _plt, _save

    old = os.umask(0o002)
    try:
        v = write_video(tmp_path / "v" / "a.mp4", [np.zeros((4, 4, 3), np.uint8)] * 3, fps=5)
        fig = _plt().figure()
        figs = _save(fig, tmp_path / "f", "fig")
    finally:
        os.umask(old)
    for p in [v, *figs]:
        assert p.stat().st_size > 0 and p.stat().st_mode & 0o777 == 0o664
        assert sorted(q.name for q in p.parent.iterdir() if q.name.startswith(".")) == []


def test_kill_while_writing_the_final_adapter_keeps_the_previous_one(world, monkeypatch):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model), "atomic_final")
    run_training(sc)
    final = Path(sc["out_dir"]) / "final"
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    ck = Path(sc["out_dir"]) / "checkpoints" / sc["run_id"]
    import shutil

    shutil.rmtree(ck)
    from peft import PeftModel

    def dies(self, path, **kw):
        Path(path, "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt("killed")  # FAULT: the process dies mid-save

    monkeypatch.setattr(PeftModel, "save_pretrained", dies)
    with pytest.raises(KeyboardInterrupt):
        run_training(sc)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before  # previous adapter + done.json intact


def test_failed_attempts_keep_their_logs_and_done_json():
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    train = (REPO / "workflow" / "rules" / "train.smk").read_text()
    assert "tee -a {log}.attempts" in common  # Snakemake deletes {log} before each attempt
    assert "done=update(" in train  # a failing rerun restores the previous done.json
    # the library half: a resumed run cuts the logs it will redo (not appended twice)
    from vlaforget.train.loop import cut_logs

    assert callable(cut_logs)


def test_cut_logs_drops_redone_steps_and_torn_lines(tmp_path):
    from vlaforget.train.loop import cut_logs

    j, h = tmp_path / "metrics.jsonl", tmp_path / "train_progress.log"
    j.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo'
    )
    h.write_text("".join(f"Step {s}/10 | Loss: 1\n" for s in range(1, 8)) + "Step 8/1")  # FAULT: torn by kill
    kept = cut_logs(j, h, 5)
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5]
    assert h.read_text().splitlines() == [f"Step {s}/10 | Loss: 1" for s in range(1, 6)]


def test_hex_ids_survive_the_stage_config_round_trip(tmp_root, tmp_path):
    # a config id like 34565307e335 is a float to a YAML 1.2 reader: stage configs must read it back
    sc = {
        "stage": "eval",
        "root": str(tmp_root),
        "allowed_root": str(tmp_root.parent),
        "inputs": {"x": {"id": "34565307e335"}},
    }
    p = tmp_path / "sc.yaml"
    p.write_text(yaml.safe_dump(sc))
    assert vsf.load_stage_config(p)["inputs"]["x"]["id"] == "34565307e335"


def test_output_killed_before_its_id_was_recorded_is_refused_by_its_consumers(tmp_root, tmp_path):
    """The stage wrote its completion file and died before recording its id (driver killed too, so
    Snakemake's incomplete marker may be gone with another checkout): no job reads it as valid."""
    cfg = _cfg(tmp_root)
    sc = vsc.stage_config(cfg, "icsm", vfs.probe_set_name(cfg))
    meta = Path(sc["out_dir"]) / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text("{}")  # FAULT: the stage wrote its completion file, then died before the stamp
    train = vsc.stage_config(cfg, "train", "mw_downstream__icsm_hsw_thermostat__full__s42")
    with pytest.raises(freshness.StaleInputError, match="records no config id"):
        freshness.check_inputs({**train, "inputs": {"icsm": train["inputs"]["icsm"]}})
    freshness.stamp(sc)
    assert freshness.recorded_id(meta) == config_id(sc)
    # anchors.pt is not JSON: its id lives beside it, valid only for that very file
    a = vsc.stage_config(_cfg(tmp_root), "craft_anchors", "mw_downstream")
    f = Path(a["out_dir"]) / "anchors.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x")
    freshness.stamp(a)
    assert freshness.recorded_id(f) == config_id(a)
    atomic_write_text(f, "y")  # FAULT: rewritten by a later, unfinished attempt
    assert freshness.recorded_id(f) is None


def test_kill9_icsm_after_its_outputs_before_its_id_reruns_identically(world, tmp_path):
    """kill -9 at the most delicate point of a stage: its outputs are complete but not yet recorded as
    made for this config. A consumer refuses them; the rerun gives the same tensors to the bit."""
    from train_fixtures import make_teacher_artifacts

    root, cache, model = world
    if not (root / "artifacts" / "icsm" / "meta.json").exists():
        make_teacher_artifacts(root, cache, model)
    sc = yaml.safe_load((root / "icsm.yaml").read_text())
    runs = {}
    for name in ("icsm_ref", "icsm_killed"):
        runs[name] = dict(sc, out_dir=str(root / "artifacts" / name))
        write_cfg(runs[name], tmp_path / f"{name}.yaml")
    assert cli(["icsm", "--config", str(tmp_path / "icsm_ref.yaml")]).returncode == 0
    k = runs["icsm_killed"]
    r = cli(
        ["icsm", "--config", str(tmp_path / "icsm_killed.yaml")],
        env={"VLAFORGET_FAULT_KILL_BEFORE_STAMP": "icsm"},
    )  # FAULT: kill -9 before the stamp
    assert r.returncode == -9
    meta = Path(k["out_dir"]) / "meta.json"
    consumer = {"stage": "train", "inputs": {"icsm": {"file": str(meta), "id": config_id(k), "rule": "icsm"}}}
    with pytest.raises(freshness.StaleInputError, match="records no config id"):
        freshness.check_inputs(consumer)
    assert cli(["icsm", "--config", str(tmp_path / "icsm_killed.yaml")]).returncode == 0
    freshness.check_inputs(consumer)  # recorded now, and its tensors match meta.json's sha256
    ref = json.loads((root / "artifacts" / "icsm_ref" / "meta.json").read_text())["tensor_hashes"]
    assert json.loads(meta.read_text())["tensor_hashes"] == ref
    t = Path(k["out_dir"]) / sorted(n for n in ref if n.startswith("U"))[0]
    torch_mod = __import__("torch")
    torch_mod.save(torch_mod.zeros(3), t)  # FAULT: an ICSM tensor replaced
    with pytest.raises(CorruptInputError, match="'icsm' rule"):
        freshness.check_inputs(consumer)


def test_optional_paths_outside_the_allowed_root_are_refused_by_validation(tmp_root):
    with pytest.raises(ConfigError, match="eval.libero.config_path = /elsewhere"):  # FAULT
        _cfg(tmp_root, eval={"libero": {"config_path": "/elsewhere/libero"}})


def test_kill9_teacher_pretraining_leaves_no_teacher_and_reruns_identically(tmp_root, tmp_path):
    """kill -9 in the middle of the tiny teacher's pretraining: no half-saved teacher is left (it is
    built in a temp dir and renamed into place), and the rerun equals an uninterrupted build."""
    import numpy as np

    from vlaforget.data.cache import write_cache
    from vlaforget.models.tiny import TEST_TINY

    c = _cfg(tmp_root)
    c["model"]["tiny"] = dict(TEST_TINY)
    c["model"]["pretrain"] = {
        "steps": 6,
        "batch_size": 4,
        "lr": 1e-3,
        "vqa_fraction": 0.5,
        "seed": 0,
        "threads": 1,
    }
    rng = np.random.default_rng(0)
    for d, tasks in c["data"]["metaworld"]["datasets"].items():
        eps = [
            {
                "images": rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
                "states": np.zeros((5, 4), np.float32),
                "actions": rng.uniform(-1, 1, (5, 4)).astype(np.float32),
                "env_states": rng.uniform(-0.3, 0.9, (5, 39)).astype(np.float32),
                "instruction": f"do task {k % len(tasks)}",
                "task": tasks[k % len(tasks)],
                "seed": k,
            }
            for k in range(8)
        ]
        csc = vsc.stage_config(c, "cache", d)
        write_cache(eps, csc["out_dir"], d, 32, train_split=0.75, transform="metaworld")
        freshness.stamp(csc)  # as the cache stage records it
    sc = vsc.stage_config(c, "model", c["model"]["base"])
    out = Path(sc["out_dir"])
    ref_sc = dict(sc, out_dir=str(out.parent / "ref"))
    assert cli(["model", "--config", str(write_cfg(ref_sc, tmp_path / "ref.yaml"))]).returncode == 0
    p = write_cfg(sc, tmp_path / "model.yaml")
    r = cli(
        ["model", "--config", str(p)], env={"VLAFORGET_FAULT_KILL_AT_STEP": "3"}
    )  # FAULT: mid-pretraining
    assert r.returncode == -9
    assert not out.exists()  # nothing half-written where consumers look
    r = cli(["model", "--config", str(p)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert freshness.recorded_id(out / "done.json") == config_id(sc)
    ref = out.parent / "ref"
    weights = sorted(f.name for f in ref.iterdir() if f.suffix in (".safetensors", ".bin"))
    assert weights and all((out / w).read_bytes() == (ref / w).read_bytes() for w in weights)
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize(
    "argv,mode",
    [
        (["snakemake", "--profile", "profiles/ci"], "run"),
        (["snakemake", "-n", "--profile", "profiles/ci"], "inspect"),
        (["snakemake", "-np"], "inspect"),
        (["snakemake", "--summary"], "inspect"),
        (["snakemake", "--touch", "--forceall"], "touch"),
        (["snakemake", "-d", "/some/dir", "-j4"], "run"),  # -d is --directory, not a dry-run
    ],
)
def test_sync_mode_from_the_command_line(argv, mode):
    assert freshness.sync_mode(argv) == mode


def test_stale_snakemake_lock_of_a_killed_driver_is_cleared_safely(tmp_path):
    import io

    locks = tmp_path / ".snakemake" / "locks"
    drivers = tmp_path / ".snakemake" / "vlaforget-drivers"
    locks.mkdir(parents=True)
    drivers.mkdir()
    (locks / "0.input.lock").write_text("x")  # FAULT: the driver was killed -9, its lock stayed
    dead = subprocess.Popen(["true"])
    dead.wait()
    (drivers / f"{socket.gethostname()}-{dead.pid}").touch()
    out = io.StringIO()
    assert freshness.clear_stale_snakemake_lock(tmp_path, out=out)
    assert not list(locks.iterdir()) and "no --unlock needed" in out.getvalue()
    # a driver of another host (shared working dir): the lock stays, Snakemake asks for --unlock
    (locks / "0.input.lock").write_text("x")
    (drivers / "otherhost-123").touch()
    out = io.StringIO()
    assert not freshness.clear_stale_snakemake_lock(tmp_path, out=out)
    assert (locks / "0.input.lock").exists() and "pid 123 on otherhost" in out.getvalue()


# ----------------------------------------------------------------------------- 7 / exactness: eval kill -9


def _eval_result(path: Path) -> dict:
    """The eval JSON without its wall-clock parts (timing, worker memory): what a rerun must repeat."""
    out = json.loads(path.read_text())
    out = {
        k: v
        for k, v in out.items()
        if k not in ("timing", "memory", "wall_time_s", "provenance", "versions", "config_id", "out_file")
    }
    # per episode: what the rollout did, not how long it took
    out["episodes"] = [
        {k: v for k, v in e.items() if not (k.endswith("_s") or "time" in k)} for e in out.get("episodes", [])
    ]
    return out


def test_kill9_eval_mid_rollout_and_before_its_stamp_reruns_identically(demo_config, tmp_root, tmp_path):
    """kill -9 of a closed-loop eval while its workers roll out leaves no result (the JSON is written
    last, atomically); kill -9 after the JSON but before the config id is recorded leaves an output the
    workflow reruns. Both reruns give the uninterrupted run's episodes and success rates exactly."""
    from vlaforget.envs.metaworld import rendering_available
    from vlaforget.models.tiny import random_tiny_backend

    ok, why = rendering_available(size=16)
    if not ok:
        pytest.skip(f"no headless rendering: {why}")
    cfg = vfc.deep_merge(
        demo_config,
        {
            "eval": {
                "num_envs": 2,
                "episodes_per_task": 2,
                "videos_per_task": 0,
                "metaworld": {"max_steps": 40, "seed": 5},
            }
        },
    )
    sc = vsc.stage_config(cfg, "eval", "teacher@mw_downstream")
    random_tiny_backend({"image_size": 64}, action_dim=4, seed=0).save(Path(sc["model"]["path"]))
    sc["inputs"] = {}  # the random teacher has no model-stage record; freshness is tested elsewhere
    env = {"VLAFORGET_ALLOWED_ROOT": str(tmp_root.parent), "VLAFORGET_ROOT": str(tmp_root)}

    def run(name, extra=None, kill_after=None):
        s = {**sc, "out_file": str(tmp_root / "evals" / name / "mw_downstream.json")}
        path = write_cfg(s, tmp_path / f"{name}.yaml")
        if kill_after is None:
            r = cli(["eval", "--config", str(path)], env={**env, **(extra or {})})
            return s, r.returncode, r.stderr
        e = dict(
            os.environ,
            PYTHONPATH=str(REPO / "src"),
            VLAFORGET_NO_PROGRESS="1",
            OMP_NUM_THREADS="1",
            VLAFORGET_THREADS="1",
            **env,
        )
        p = subprocess.Popen(
            [PY, "-m", "vlaforget.cli", "eval", "--config", str(path)],
            env=e,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(kill_after)
        alive = p.poll() is None
        os.killpg(p.pid, signal.SIGKILL)  # the eval and its simulator workers, as a killed job's group
        p.wait()
        return s, alive, ""

    t0 = time.monotonic()
    full, rc, err = run("full")
    wall = time.monotonic() - t0
    assert rc == 0, err[-2000:]
    ref = _eval_result(Path(full["out_file"]))
    assert ref["n_episodes"] == 4

    # FAULT: kill -9 mid-rollout (at a third of the uninterrupted run's wall time: the JSON is written last)
    killed, alive, _ = run("killed", kill_after=0.35 * wall)
    assert alive, "the eval finished before the kill: raise eval.metaworld.max_steps in this test"
    assert not Path(killed["out_file"]).exists()
    _, rc, err = run("killed")
    assert rc == 0, err[-2000:]
    assert _eval_result(Path(killed["out_file"])) == ref

    # FAULT: kill -9 after the result, before its config id is stamped
    stamped, rc, _ = run("stamp", extra={"VLAFORGET_FAULT_KILL_BEFORE_STAMP": "eval"})
    assert rc == -signal.SIGKILL
    comp = freshness.completion_file(stamped)
    assert comp.exists() and freshness.recorded_id(comp) is None
    _, rc, err = run("stamp")
    assert rc == 0, err[-2000:]
    assert _eval_result(Path(stamped["out_file"])) == ref
    assert freshness.recorded_id(comp) == config_id(stamped)


def test_loss_check_compares_the_first_and_last_logged_means():
    """A 30-step run logged every 10 steps that learned (3.18, 4.03, 3.14, 2.48: the embedded 5-shot
    baseline of session 6) is marked done; the old rule (first logged value against the mean of the
    last 3) refused it. A flat run that drops a hair on its first update is still refused."""
    from types import SimpleNamespace

    from vlaforget.train.loop import check_loss_improved

    tcfg = {"max_steps": 30, "batch_size": 4, "lr": 3e-4, "lora": {"r": 4}, "loss_check_min_steps": 20}
    sc = {"run_name": "r", "out_dir": "/tmp/x", "run_id": "r-1"}

    def logger(losses):
        return SimpleNamespace(records=[{"train_loss": v} for v in losses])

    check_loss_improved(logger([3.1833, 4.0298, 3.1438, 2.4831]), tcfg, sc)
    with pytest.raises(TrainingError, match="did not improve"):
        check_loss_improved(logger([3.20, 3.19, 3.19, 3.19, 3.19, 3.19, 3.19, 3.19]), tcfg, sc)
    with pytest.raises(TrainingError, match="did not improve"):
        check_loss_improved(logger([3.0, 3.4, 3.6, 3.9]), tcfg, sc)  # diverging
