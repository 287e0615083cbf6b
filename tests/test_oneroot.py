"""One data root, many checkouts (issue 29): every output is named by the config that made it, so no
driver ever reports another config's result as its own. Each test here failed on the layout where a
run's outputs lived at one path per run name (runs/{run}/) and reruns were forced by rewriting or
touching shared stage-config files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_workflow, snakemake

RUN = "mw_downstream__icsm_hsw_thermostat__full__s42"
# The smallest study that still builds table_main through every stage: one run of the full method.
SMALL = """\
results_dir: results          # per checkout (the repo's results/)
study:
  methods: [icsm_hsw_thermostat]
  fewshot_methods: []
  ablations: []
"""


# table_main up to its training run (the evaluations add minutes on a shared CPU and nothing to the
# question; tests/test_workflow_dryrun.py: a table is rebuilt from the invoking config's evals)
TRAIN = ["table_main", "--until", "train"]


def _checkout(dest: Path, *overlays: str) -> Path:
    """A clone of the workflow (its own .snakemake and results/) with config/small.yaml (+ overlays)."""
    wf = copy_workflow(dest)
    (wf / "config" / "small.yaml").write_text(SMALL + "".join(overlays))
    return wf


def _files(wf: Path) -> list[str]:
    return [
        "--profile",
        "profiles/ci",
        "--configfiles",
        "config/demo.yaml",
        "config/ci.yaml",
        "config/small.yaml",
    ]


def _expected_train_id(wf: Path, env: dict) -> str:
    """The config id this checkout's own library gives the run (whatever the layout)."""
    code = (
        "import sys; from vlaforget.config import load_config; from vlaforget.stageconfig import stage_config; "
        "from vlaforget.io import config_id; "
        "cfg = load_config('config/config.yaml', 'config/demo.yaml', 'config/ci.yaml', 'config/small.yaml'); "
        f"print(config_id(stage_config(cfg, 'train', '{RUN}')))"
    )
    e = {**os.environ, **env, "PYTHONPATH": str(wf / "src")}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=wf, env=e, capture_output=True, text=True, check=True
    )
    return r.stdout.strip()


def _ids_of_run(root: Path) -> set[str]:
    """Config ids recorded by every finished training of RUN under the root, wherever it lies."""
    return {
        json.loads(p.read_text()).get("config_id") for p in (root / "runs" / RUN).rglob("final/done.json")
    }


def _nothing_to_do(r) -> bool:
    import re

    out = r.stdout + r.stderr
    return "Nothing to be done" in out or bool(re.search(r"^total\s+0$", out, re.MULTILINE))


def _env(tmp_path: Path) -> dict:
    return {
        "VLAFORGET_ROOT": str(tmp_path / "data" / "root"),
        "VLAFORGET_ALLOWED_ROOT": str(tmp_path / "data"),
        "VLAFORGET_SKIP_PREFLIGHT": "1",
    }


@pytest.mark.slow
def test_a_b_a_each_checkout_keeps_its_results(tmp_path):
    """A trains; B (train.lora.r 3), then C (an edit of methods/hsw.py) retrain on the same root; A,
    with its .snakemake kept, must still find its own run and rerun nothing: on the old layout it
    printed "reruns: train.lora.r 3 -> 2", then "Nothing to be done" and served B's adapter."""
    env = _env(tmp_path)
    root = Path(env["VLAFORGET_ROOT"])
    a = _checkout(tmp_path / "a")
    b = _checkout(tmp_path / "b", "train:\n  lora:\n    r: 3\n")
    c = _checkout(tmp_path / "c")
    hsw = c / "src" / "vlaforget" / "methods" / "hsw.py"
    hsw.write_text(hsw.read_text() + "\n\ndef _a_new_helper():\n    return 1\n")  # FAULT: a code change
    ida, idb, idc = (_expected_train_id(w, env) for w in (a, b, c))
    assert len({ida, idb, idc}) == 3

    r = snakemake([*TRAIN, *_files(a)], cwd=a, env=env, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    for other, want in ((b, idb), (c, idc)):
        r = snakemake([*TRAIN, *_files(other)], cwd=other, env=env, timeout=1500)
        assert r.returncode == 0, r.stderr[-3000:]
        assert want in _ids_of_run(root)
        # A comes back, .snakemake kept: its own result, its own table
        r = snakemake([*TRAIN, *_files(a)], cwd=a, env=env, timeout=1500)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ida in _ids_of_run(root), f"A's run was replaced by another config's: {_ids_of_run(root)}"
        assert _nothing_to_do(r), "switching back must rerun nothing: " + r.stderr[-2000:]

    # copying the finished root elsewhere (cp -a) reruns nothing
    moved = tmp_path / "data" / "copy"
    shutil.copytree(root, moved, symlinks=True)
    r = snakemake(["-n", *TRAIN, *_files(a)], cwd=a, env={**env, "VLAFORGET_ROOT": str(moved)})
    assert r.returncode == 0 and _nothing_to_do(r), r.stdout[-3000:]


@pytest.mark.slow
def test_two_drivers_on_one_root_never_exit_0_with_another_configs_run(tmp_path):
    """Two checkouts (lora r 2 / r 3) start the same run 3 s apart on one root: whichever driver exits
    0 has its own run (on the old layout B's driver exited 0 with A's adapter in 2 of 3 trials)."""
    env = _env(tmp_path)
    root = Path(env["VLAFORGET_ROOT"])
    a = _checkout(tmp_path / "a")
    b = _checkout(tmp_path / "b", "train:\n  lora:\n    r: 3\n")
    ida, idb = _expected_train_id(a, env), _expected_train_id(b, env)
    # the shared upstream first (same config in both): the race is on the run
    r = snakemake(["table_main", "--until", "icsm", *_files(a)], cwd=a, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    e = {**os.environ, **env, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    procs = []
    for wf in (a, b):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "snakemake", *TRAIN, *_files(wf)],
                cwd=wf,
                env={**e, "PYTHONPATH": str(wf / "src")},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        time.sleep(3)
    rcs = [p.wait(timeout=900) for p in procs]
    for wf, rc, want in ((a, rcs[0], ida), (b, rcs[1], idb)):
        if rc == 0:
            assert want in _ids_of_run(root), f"{wf.name} exited 0 without its own run: {_ids_of_run(root)}"
    assert 0 in rcs  # at least one finished


# ----------------------------------------------------------------------------- the layout (fast)


def _ci_cfg(**over):
    from vlaforget.config import deep_merge, load_config

    cfg = load_config(
        *(Path(__file__).parents[1] / "config" / f for f in ("config.yaml", "demo.yaml", "ci.yaml"))
    )
    return deep_merge(cfg, over)


def test_every_output_path_holds_its_config_id(tmp_root):
    from vlaforget.io import config_id
    from vlaforget.stageconfig import job_output, stage_config
    from vlaforget.stagefile import stage_config_text
    from vlaforget.study import stage_jobs

    cfg, cfg3 = _ci_cfg(), _ci_cfg(train={"lora": {"r": 3}})
    for stage, key in stage_jobs(cfg):
        sc = stage_config(cfg, stage, key)
        cid = config_id(sc)
        assert cid in Path(job_output(cfg, stage, key)).name
        changed = config_id(stage_config(cfg3, stage, key)) != cid
        # lora.r changes the runs and what reads them, never the teacher's artifacts
        assert changed == (stage in ("train", "eval", "forgetting") and not key.startswith("teacher")), (
            stage,
            key,
        )
    sc = stage_config(cfg, "train", RUN)
    f = tmp_root / "configs" / "train" / RUN / f"{config_id(sc)}.yaml"
    f.parent.mkdir(parents=True)
    f.write_text(stage_config_text(sc))
    assert "{root}" in f.read_text() and str(tmp_root) not in f.read_text()  # a copied root reads itself


def test_a_job_refuses_a_stage_config_that_is_not_the_id_its_path_names(tmp_root):
    """The trainer can only write the run its driver named: a file whose content is another config
    (another driver's, a hand edit) is refused, naming both ids."""
    from vlaforget.config import ConfigError
    from vlaforget.io import config_id
    from vlaforget.stageconfig import stage_config
    from vlaforget.stagefile import load_stage_config, stage_config_text

    a, b = (
        stage_config(_ci_cfg(), "train", RUN),
        stage_config(_ci_cfg(train={"lora": {"r": 3}}), "train", RUN),
    )
    f = tmp_root / "configs" / "train" / RUN / f"{config_id(a)}.yaml"
    f.parent.mkdir(parents=True)
    f.write_text(stage_config_text(b))  # FAULT: B's config at A's path
    with pytest.raises(ConfigError, match=f"holds a config of id {config_id(b)}, not the id {config_id(a)}"):
        load_stage_config(f, "train")
    f.write_text(stage_config_text(a))
    assert load_stage_config(f, "train")["out_dir"] == a["out_dir"]


def test_a_copied_root_reads_its_configs_where_they_now_are(tmp_root, monkeypatch):
    from vlaforget.io import config_id
    from vlaforget.stageconfig import stage_config
    from vlaforget.stagefile import load_stage_config, stage_config_text

    sc = stage_config(_ci_cfg(), "train", RUN)
    f = tmp_root / "configs" / "train" / RUN / f"{config_id(sc)}.yaml"
    f.parent.mkdir(parents=True)
    f.write_text(stage_config_text(sc))
    copy = tmp_root.parent / "copy"
    shutil.copytree(tmp_root, copy)
    monkeypatch.delenv("VLAFORGET_ROOT")
    got = load_stage_config(copy / f.relative_to(tmp_root), "train")
    assert got["out_dir"].startswith(str(copy) + "/") and config_id(got) == config_id(sc)


def test_keys_outside_the_id_come_from_the_driver_not_the_file(tmp_root, monkeypatch):
    from vlaforget.io import config_id
    from vlaforget.stageconfig import stage_config
    from vlaforget.stagefile import NON_SEMANTIC_ENV, load_stage_config, stage_config_text

    sc = stage_config(_ci_cfg(), "train", RUN)
    f = tmp_root / "configs" / "train" / RUN / f"{config_id(sc)}.yaml"
    f.parent.mkdir(parents=True)
    f.write_text(stage_config_text(sc))
    monkeypatch.setenv(NON_SEMANTIC_ENV, json.dumps({"train.log_every": 7, "train.lr": 1.0}))
    got = load_stage_config(f, "train")
    assert got["train"]["log_every"] == 7  # outside the id: the driver's current value
    assert got["train"]["lr"] == sc["train"]["lr"]  # inside the id: never from outside the file


def test_anchor_id_record_survives_a_copied_root(tmp_root):
    """CRaFT's anchors.pt records its id beside it; the record held the file's inode, so a copied
    root (cp -a, another disk) retrained every CRaFT run."""
    from vlaforget import freshness
    from vlaforget.io import config_id
    from vlaforget.stageconfig import stage_config

    sc = stage_config(_ci_cfg(), "craft_anchors", "mw_downstream")
    out = Path(sc["out_dir"])
    out.mkdir(parents=True)
    (out / "anchors.pt").write_bytes(b"anchor features")
    freshness.stamp(sc)
    copy = tmp_root.parent / "copy"
    shutil.copytree(tmp_root, copy)
    moved = copy / (out / "anchors.pt").relative_to(tmp_root)
    assert freshness.recorded_id(moved) == config_id(sc)
    moved.write_bytes(b"anchor featureZ")  # other bytes, same size: no longer the recorded file
    assert freshness.recorded_id(moved) is None


# ----------------------------------------------------------------------------- the workflow (dry-runs)


def _touched_root(tmp_path, wf, env, files) -> None:
    """Every output of the study present (empty files), as `snakemake --summary` lists them."""
    r = snakemake(["--summary", *files], cwd=wf, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in r.stdout.splitlines()[1:]:
        p = Path(line.split("\t")[0])
        p = p if p.is_absolute() else wf / p
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()


def _snapshot(*dirs: Path) -> dict:
    """Every file (mtime, bytes) and folder below dirs (a folder's mtime changes with its entries)."""
    return {
        str(p): (p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else "folder"
        for d in dirs
        for p in d.rglob("*")
        if ".snakemake" not in p.parts
    }


def test_parsing_the_workflow_writes_nothing(tmp_path):
    """A dry-run of a root whose jobs are all done (benchmarks missing) leaves root and checkout as they
    were: it wrote placeholder benchmarks (and moved tables to .stale on a real run's parse)."""
    wf = copy_workflow(tmp_path / "wf")
    env = _env(tmp_path)
    files = ["--profile", "profiles/ci"]
    _touched_root(tmp_path, wf, env, files)
    root = Path(env["VLAFORGET_ROOT"])
    shutil.rmtree(root / "benchmarks", ignore_errors=True)
    before = _snapshot(root, wf)
    r = snakemake(["-n", *files], cwd=wf, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _snapshot(root, wf) == before


def test_an_overlay_run_for_one_target_changes_nothing_other_jobs_read(tmp_path):
    """A one-off run with an overlay (train.lora.r 4) for one target writes that target alone: before,
    its parse rewrote every job's stage config, so runs with valid outputs retrained afterwards."""
    wf = copy_workflow(tmp_path / "wf")
    env = _env(tmp_path)
    ci = ["--profile", "profiles/ci"]
    _touched_root(tmp_path, wf, env, ci)  # every job done
    configs = Path(env["VLAFORGET_ROOT"]) / "configs"
    before = _snapshot(configs)
    assert len(before) > 30
    (wf / "config" / "r4.yaml").write_text("train:\n  lora:\n    r: 4\n")
    over = [*ci, "--configfiles", "config/demo.yaml", "config/ci.yaml", "config/r4.yaml"]
    r = snakemake(["--summary", *over], cwd=wf, env=env)
    one = "mw_downstream__baseline__full__s42"
    target = next(line.split("\t")[0] for line in r.stdout.splitlines() if f"/configs/train/{one}" in line)
    r = snakemake([target, *over, "--cores", "1"], cwd=wf, env=env)  # the one-off run: one stage config
    assert r.returncode == 0, r.stderr[-2000:]
    after = _snapshot(configs)
    assert {k: v for k, v in after.items() if k in before} == before
    assert [k for k in after if k not in before and k.endswith(".yaml")] in ([target], [])


CONFIGS = [
    ["config.yaml"],
    ["config.yaml", "demo.yaml"],
    ["config.yaml", "demo.yaml", "ci.yaml"],
    ["config.yaml", "lifelong_libero.yaml"],
    ["config.yaml", "pilot.yaml"],
    ["config.yaml", "rehearsal.yaml"],
]


@pytest.mark.slow
@pytest.mark.parametrize("files", CONFIGS, ids=lambda f: "+".join(x[:-5] for x in f))
def test_plan_runs_are_the_workflows_train_jobs(tmp_path, files, monkeypatch):
    """`vlaforget plan` and the workflow read one study grid (vlaforget.study): plan missed 27 of the
    36 chain runs of config/lifelong_libero.yaml."""
    import re

    from vlaforget.config import load_config
    from vlaforget.plan import study_runs

    wf = copy_workflow(tmp_path / "wf")
    env = {**_env(tmp_path), "VLAFORGET_ALLOWED_ROOT": "/"}  # config.yaml names /opt/data/private paths
    r = snakemake(["-n", "--nolock", "--configfiles", *(f"config/{f}" for f in files)], cwd=wf, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    trained = set(re.findall(r"output: \S*/runs/([^/]+)/", r.stdout))
    # the in-process load sees the same environment as the dry-run (CI exports its own allowed root)
    for k, v in env.items():
        if k.startswith("VLAFORGET_"):
            monkeypatch.setenv(k, v)
    cfg = load_config(*(wf / "config" / f for f in files))
    assert set(study_runs(cfg)) == trained and len(study_runs(cfg)) == len(trained)


# ----------------------------------------------------------------------------- smaller holes


def test_empty_seed_list_is_refused(tmp_root):
    from vlaforget.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"study.seeds is empty"):
        validate(_ci_cfg(study={"seeds": []}))


def test_a_symlink_out_of_the_allowed_root_is_refused_before_any_job(tmp_root, tmp_path):
    from vlaforget import disk

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_root / "runs").mkdir(parents=True)
    (tmp_root / "runs" / "big").symlink_to(outside)
    import io as _io

    rep = disk.report(_ci_cfg(), scan_dir=tmp_path / "nothing", out=_io.StringIO())
    assert not rep["ok"] and any(
        "is a symlink to" in p and "outside the allowed root" in p for p in rep["problems"]
    )


def test_preflight_checks_the_tiny_teachers_pretraining_dataset(tmp_root):
    from vlaforget import preflight as P
    from vlaforget.config import load_config
    from vlaforget.study import suites_all

    rlds = tmp_root.parent / "rlds"
    conf = Path(__file__).parents[1] / "config"
    cfg = load_config(
        conf / "config.yaml",
        conf / "rehearsal.yaml",
        overrides={  # the tiny teacher on LIBERO
            "data": {"fixture": None, "rlds_dir": str(rlds)},
            "model": {"pretrain": {"dataset": "libero_90_no_noops"}},
        },
    )
    for s in suites_all(cfg):
        v = rlds / s / "1.0.0"
        v.mkdir(parents=True)
        (v / "features.json").write_text("{}")
        (v / "dataset_info.json").write_text("{}")
        (v / f"{s}-train.tfrecord-00000-of-00001").write_bytes(b"x")
    rep = P.Report()
    P.check_rlds(cfg, rep)
    assert "libero_90_no_noops" in rep.message()


def test_a_full_disk_is_one_message_naming_the_path_and_the_space(tmp_root, monkeypatch, capsys):
    import errno

    from vlaforget import cli
    from vlaforget.stages import cache

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_root / "datasets" / "shard_3.u8"))

    monkeypatch.setattr(cache, "main", full)
    monkeypatch.setattr(cli, "run_stage", lambda name, mod, args: mod.main(args))
    assert cli.main(["cache", "--config", str(tmp_root / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert "shard_3.u8 is full" in err and "GB free" in err and "needs" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- migration of an old root

LEGACY_STUDY = "study:\n  methods: [baseline, craft]\n  fewshot_methods: []\n  ablations: []\n"


def _settings_of(now, old, root: str):
    """`now`'s values where they are settings, `old`'s where they say where things lie (paths under
    the root, written as {root} today and as the root's path then)."""
    if isinstance(now, dict):
        old = old if isinstance(old, dict) else {}
        out = {}
        for k, v in now.items():
            if isinstance(v, str) and (v.startswith("{root}") or v.startswith(root)):
                if k in old:
                    out[k] = old[k]
            else:
                out[k] = _settings_of(v, old.get(k), root)
        return out
    if isinstance(now, list) and isinstance(old, list) and len(old) == len(now):
        return [_settings_of(v, o, root) for v, o in zip(now, old)]
    return now


def test_migrate_root_moves_an_old_root_once_and_reruns_nothing(tmp_path):
    """tests/data/legacy_root_ci.tar.gz: a root as the layout before issue 29 made it (profiles/ci with
    LEGACY_STUDY, every job done by `snakemake --touch`): runs/{run}/, evals/{run}/{suite}.json,
    configs/{stage}/{key}.yaml. `vlaforget migrate-root` moves each output under its config id, and
    the workflow then plans only the tables (they record the eval paths they read)."""
    import re
    import tarfile

    import yaml

    from vlaforget import migrate
    from vlaforget.config import load_config
    from vlaforget.stageconfig import stage_config

    env = _env(tmp_path)
    root = Path(env["VLAFORGET_ROOT"])
    root.mkdir(parents=True)
    with tarfile.open(Path(__file__).parent / "data" / "legacy_root_ci.tar.gz") as t:
        t.extractall(root, filter="tar")
    wf = copy_workflow(tmp_path / "wf")
    (wf / "config" / "small.yaml").write_text(LEGACY_STUDY)
    files = [wf / "config" / f for f in ("config.yaml", "demo.yaml", "ci.yaml", "small.yaml")]
    os.environ.update(env)  # the test process computes the current stage configs for this root
    try:
        cfg = load_config(*files)
        # the fixture's code hashes and method settings are its day's: give them today's library and
        # config (as if today's code had made the old layout; paths stay the old ones), keeping each
        # output's record of its old file's id consistent
        from vlaforget.io import LOCATION_KEYS

        for f in (root / "configs").rglob("*.yaml"):
            old = yaml.safe_load(f.read_text())
            now = stage_config(cfg, old["stage"], f.stem)
            where = {k: old[k] for k in (*LOCATION_KEYS, *migrate.LEGACY_LOCATION_KEYS, "inputs") if k in old}
            old = {**_settings_of(now, old, str(root)), **where}
            f.write_text(yaml.safe_dump(old, sort_keys=True))
            _, _, comp = migrate.legacy_paths(root, now, old["stage"], f.stem)
            side = comp.parent / f".{comp.name}.config_id"
            rec = json.loads(side.read_text())
            side.write_text(json.dumps({**rec, "config_id": migrate.legacy_config_id(old)}))
        rep = migrate.migrate(cfg)
    finally:
        for k in env:
            os.environ.pop(k, None)
    assert not rep["kept"], rep["kept"]
    assert (
        not rep["absent"]
        and len(rep["moved"]) >= 15
        and not (root / "runs" / "mw_downstream__craft__full__s42" / "final").exists()
    )
    r = snakemake(
        ["-n", "--configfiles", *(f"config/{f.name}" for f in files[1:]), "--profile", "profiles/ci"],
        cwd=wf,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    planned = set(re.findall(r"^(?:local)?rule (\w+):", r.stdout, re.MULTILINE))
    assert planned <= {"table_main_build", "table_fewshot_build", "table_ablation_build", "figures", "all"}, (
        planned
    )
    again = migrate.migrate(load_config(*files)) if os.environ.update(env) is None else None
    for k in env:
        os.environ.pop(k, None)
    assert not again["moved"] and len(again["already"]) == len(rep["moved"])  # once


# ----------------------------------------------------------------------------- integrity without mtimes


def _flip(path: Path) -> None:
    """Change one byte in the middle of a file and put its mtime back (what a bit rot or a careless
    copy leaves: a different file that looks unchanged to anything that trusts mtimes)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_flipped_bytes_in_small_artifacts_are_caught_with_the_mtime_put_back(tmp_path):
    """ICSM bases and adapters are hashed at every stage start: the hash of a file verified before was
    remembered by (size, mtime), so flipped bytes with the mtime restored passed silently."""
    from vlaforget.io import CorruptInputError, sha256_file, verify_files

    d = tmp_path / "adapter"
    d.mkdir()
    f = d / "adapter_model.safetensors"
    f.write_bytes(os.urandom(4096))
    want = {f.name: sha256_file(f)}
    verify_files(d, want, rule="train", trust_mtime=False)
    _flip(f)
    with pytest.raises(CorruptInputError, match=r"adapter_model.safetensors does not match .* 'train' rule"):
        verify_files(d, want, rule="train", trust_mtime=False)


def test_icsm_bases_are_hashed_at_every_stage_start(tmp_path):
    import torch

    from vlaforget.freshness import verify_icsm
    from vlaforget.io import CorruptInputError, sha256_file

    d = tmp_path / "icsm"
    d.mkdir()
    torch.save({"U": torch.randn(16, 4)}, d / "basis0.pt")
    (d / "meta.json").write_text(json.dumps({"tensor_hashes": {"basis0.pt": sha256_file(d / "basis0.pt")}}))
    verify_icsm(d)
    _flip(d / "basis0.pt")
    with pytest.raises(CorruptInputError, match=r"basis0.pt does not match .* 'icsm' rule"):
        verify_icsm(d)


def _flipped_cache(root: Path) -> Path:
    """The tests' 120-row cache (two blocks of 64 rows) with one byte flipped in the middle of images.u8
    (row 60, block 0), mtime put back, after the stage-start check had remembered the file as good."""
    from train_fixtures import make_cache

    from vlaforget.freshness import verify_cache

    cache = make_cache(root)
    m = json.loads((cache / "manifest.json").read_text())
    assert m["num_transitions"] == 120  # block 0: rows 0..63 (data.cache.BLOCK_ROWS), block 1: 64..119
    verify_cache(cache, m)  # as every stage start does; today it remembers (size, mtime) -> sha256
    _flip(cache / "images.u8")
    verify_cache(cache, m)  # sizes only for images.u8: its bytes are checked as they are read
    return cache


def test_a_flipped_byte_in_a_cache_is_caught_when_its_block_is_read(tmp_path):
    """A dataset cache's images.u8 (many GB for LIBERO) was hashed whole once and then trusted while its
    (size, mtime) held: a flipped byte with the mtime put back trained a different adapter, exit 0. Each
    block of 64 rows is now hashed the first time a row of it is read, in each process."""
    import pickle

    from vlaforget.data.cache import CachedDataset
    from vlaforget.io import CorruptInputError

    cache = _flipped_cache(tmp_path)
    ds = CachedDataset(cache, split="all")
    for i in range(64, 120):  # the other block reads fine
        ds[i]
    rule = r"images.u8 rows 0\.\.63 \(block 0, 64 rows a block\) do not match the sha256 .* rerun the 'cache' rule"
    with pytest.raises(CorruptInputError, match=rule):
        ds[3]  # the first read of the block, not only of the flipped row
    with pytest.raises(CorruptInputError, match=rule):
        ds[60]
    worker = pickle.loads(pickle.dumps(ds))  # a DataLoader worker hashes the blocks it reads itself
    assert not worker._verified
    with pytest.raises(CorruptInputError, match=rule):
        worker[10]


def test_a_cache_made_before_block_hashes_is_read_with_a_warning(tmp_path, caplog):
    """Format-3 caches without `blocks` keep today's check (whole files at stage start) and say so."""
    from train_fixtures import make_cache

    from vlaforget.data.cache import CachedDataset
    from vlaforget.freshness import verify_cache
    from vlaforget.io import CorruptInputError

    cache = make_cache(tmp_path)
    m = json.loads((cache / "manifest.json").read_text())
    del m["blocks"]
    (cache / "manifest.json").write_text(json.dumps(m))
    ds = CachedDataset(cache, split="all")
    assert ds[60]["image"].shape == (32, 32, 3)
    assert "per-block hashes" in caplog.text and str(cache) in caplog.text
    (cache / "images.u8").write_bytes(bytes(reversed((cache / "images.u8").read_bytes())))  # mtime changes
    with pytest.raises(CorruptInputError, match=r"images.u8 does not match the sha256"):
        verify_cache(cache, m)  # the whole-file hash at stage start, as before


def test_training_on_a_cache_with_a_flipped_byte_stops_naming_the_file_and_the_rule(tmp_path):
    import yaml
    from conftest import REPO
    from train_fixtures import base_stage, make_model

    root = tmp_path / "data" / "vlaforget"
    root.mkdir(parents=True)
    cache = _flipped_cache(root)
    sc = base_stage(root, cache, make_model(root))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(sc))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "VLAFORGET_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "vlaforget.cli", "train", "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(r"images.u8 rows 0\.\.63 .* do not match the sha256 .*'cache' rule", r.stderr), r.stderr[
        -2000:
    ]
    assert not (Path(sc["out_dir"]) / "final" / "done.json").exists()


def test_a_checkpoint_with_flipped_bytes_is_not_resumed_from(tmp_path, caplog):
    import torch

    from vlaforget.train import checkpoint as ckpt

    class Sampler:
        def state_dict(self):
            return {"pos": 0}

    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (2, 4):
        ckpt.save(
            tmp_path,
            step,
            skipped=0,
            model=model,
            optimizer=opt,
            scheduler=sched,
            scaler=None,
            sampler=Sampler(),
            plugins={},
            aug_gen=torch.Generator(),
        )
    newest = tmp_path / "step_00000004" / "state.pt"
    _flip(newest)
    path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 2 and path.parent.name == "step_00000002"
    assert "do not match the checksum" in caplog.text and str(newest) in caplog.text
