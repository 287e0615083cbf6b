"""`vlaforget export` on the tiny backend: a really trained run -> merged checkpoint -> loaded alone,
it predicts what the adapter-merged backend predicts. (OpenVLA's architecture and openvla's own
loaders: tests/test_export_openvla.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import base_stage, make_cache, make_model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained for real by the train stage (a few LoRA steps), its config and root."""
    from vlaforget.train.loop import run_training

    allowed = tmp_path_factory.mktemp("data")
    root = allowed / "vlaforget"
    torch.set_num_threads(1)
    sc = base_stage(root, make_cache(root), make_model(root), max_steps=4, lr=5e-3)
    run_training(sc)
    return root, sc


def _images_and_text(n=3, size=32, seed=1):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return imgs, ["open the drawer", "press the button", "open the drawer"][:n]


def test_export_loads_alone_and_predicts_like_the_merged_run(trained_run):
    from vlaforget.export import RECORD, default_out_dir, export_run
    from vlaforget.models import load_backend

    root, sc = trained_run
    run_dir = root / "runs" / sc["run_name"]
    rec = export_run(run_dir)
    out = default_out_dir(sc)
    assert out == root / "exports" / sc["run_name"] and out.is_dir()
    assert json.loads((out / RECORD).read_text())["unnorm_key"] == rec["unnorm_key"] == "toy"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    # the suite's statistics under its unnorm key, in openvla's dataset_statistics.json layout
    run_stats = json.loads((run_dir / "final" / "dataset_statistics.json").read_text())
    assert json.loads((out / "dataset_statistics.json").read_text()) == run_stats
    assert list(run_stats) == ["toy"] and "q01" in run_stats["toy"]["action"]

    exported = load_backend({"backend": "tiny", "path": str(out)})  # no adapter, no stats given
    merged = load_backend(sc["model"], adapter_dir=run_dir / "final", stats=run_stats["toy"])
    base = load_backend(sc["model"], stats=run_stats["toy"])
    assert exported.stats == merged.stats
    imgs, text = _images_and_text()
    ours = merged.predict_actions(imgs, text)
    assert np.array_equal(exported.predict_actions(imgs, text), ours)

    # the adapter is really in the weights (training moved them), and nothing PEFT is left
    sd_e, sd_b = exported.model.state_dict(), base.model.state_dict()
    assert sd_e.keys() == sd_b.keys() and not any("lora" in k for k in sd_e)
    assert any(not torch.equal(sd_e[k], sd_b[k]) for k in sd_b)


def test_export_replaces_an_old_export_and_cli(trained_run, capsys):
    from vlaforget.cli import main
    from vlaforget.export import RECORD

    root, sc = trained_run
    out = root / "elsewhere" / "ckpt"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an earlier export")
    assert main(["export", "--run-dir", str(root / "runs" / sc["run_name"]), "--out", str(out)]) == 0
    assert not (out / "stale.txt").exists() and (out / RECORD).exists() and (out / "config.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]


def test_a_failed_export_leaves_the_previous_one_whole(trained_run, monkeypatch):
    from vlaforget.export import export_run
    from vlaforget.models.tiny import TinyBackend

    root, sc = trained_run
    run_dir, out = root / "runs" / sc["run_name"], root / "atomic" / "ckpt"
    export_run(run_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = TinyBackend.save

    def save_then_die(self, d, norm_stats=None):
        real_save(self, d, norm_stats=norm_stats)  # weights half-way into the temp folder
        raise KeyboardInterrupt

    monkeypatch.setattr(TinyBackend, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_run(run_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]  # temp folder removed


def test_export_refuses_unfinished_runs_and_paths_outside_root(trained_run, tmp_path):
    import shutil

    from vlaforget.export import ExportError, export_run
    from vlaforget.paths import PathPolicyError

    root, sc = trained_run
    run_dir = root / "runs" / sc["run_name"]
    with pytest.raises(PathPolicyError, match="outside the allowed root"):
        export_run(run_dir, tmp_path / "outside")
    with pytest.raises(ExportError, match="not a run folder"):
        export_run(root / "runs")
    half = root / "runs" / "half"
    shutil.copytree(run_dir, half)
    (half / "final" / "done.json").unlink()
    with pytest.raises(ExportError, match="has not finished"):
        export_run(half)


def test_workflow_plans_one_export_per_run_only_when_asked(tmp_path):
    """`snakemake exports` plans an export after each run's training; `rule all` plans none."""
    pytest.importorskip("snakemake", reason="the DAG test needs Snakemake (not in the OpenVLA test venv)")
    from conftest import copy_workflow, snakemake
    from test_workflow_dryrun import planned, trained_runs

    wf = copy_workflow(tmp_path / "wf")
    root = tmp_path / "data" / "root"
    env = {"VLAFORGET_ROOT": str(root), "VLAFORGET_ALLOWED_ROOT": str(tmp_path / "data")}
    outs = {}
    for target in ([], ["exports"]):
        r = snakemake(["-n", "--nolock", "--profile", "profiles/ci", *target], cwd=wf, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        outs[bool(target)] = r.stdout + r.stderr
    assert "export" not in planned(outs[False])
    runs = trained_runs(outs[True])
    assert runs and sorted(str(Path(p).parent) for p in planned(outs[True])["export"]) == sorted(
        str(root / "exports" / r) for r in runs
    )  # exports/{run}/{config id of its training}
