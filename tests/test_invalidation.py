"""Exact invalidation (issue 15.3): a stage's code is what its entry module imports; comments and
docstrings are not code; a plug-in's code belongs only to the runs that enable it; keys that cannot
change a result change no id; a raised max_steps continues the run. The workflow-level dry-run diffs
are in test_workflow_dryrun.py (`touched`)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from train_fixtures import base_stage, clone, make_cache, make_model, run_adapter

from vlaforget import codedeps
from vlaforget import stageconfig as vsc
from vlaforget import study as vfs
from vlaforget.io import config_id


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """A private copy of the library that the code hashes read (edits stay in tmp)."""
    dest = tmp_path / "vlaforget"
    shutil.copytree(codedeps.PKG_DIR, dest, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codedeps, "PKG_DIR", dest)
    return dest


def hashes() -> dict[str, str]:
    return {s: codedeps.code_hash(s) for s in codedeps.STAGES_WITH_CODE}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


# ----------------------------------------------------------------------------- 1: deps from imports


def test_every_stage_has_an_entry_and_its_imports(pkg):
    for stage in codedeps.STAGES_WITH_CODE:
        mods = codedeps.code_modules(stage)
        assert codedeps.stage_entry(pkg, stage) in mods
        assert "vlaforget" in mods  # the package __init__ runs on every import
    # the ones the hand-kept list of issue 15 missed
    assert "vlaforget.data.instructions" in codedeps.code_modules("eval")
    assert "vlaforget.data.probe" in codedeps.code_modules("craft_anchors")
    assert "vlaforget.methods.thermostat" in codedeps.code_modules("forgetting")
    # the id plumbing is no stage's code
    assert not any(
        "freshness" in m or "codedeps" in m
        for s in codedeps.STAGES_WITH_CODE
        for m in codedeps.code_modules(s)
    )


def test_a_new_function_level_import_is_tracked_at_once(pkg):
    """Adding `from ..data import vqa` inside a function of the eval entry makes data/vqa.py part of
    eval's code: an edit of it then reruns eval; before, it did not."""
    vqa = pkg / "data" / "vqa.py"
    assert "vlaforget.data.vqa" not in codedeps.code_modules("eval")
    h0 = hashes()
    append(vqa, "\n_EDIT_1 = 1\n")
    h1 = hashes()
    assert h1["eval"] == h0["eval"] and h1["forgetting"] != h0["forgetting"]  # forgetting imports it
    append(
        pkg / "eval" / "closed_loop.py",
        "\n\ndef _uses_vqa():\n    from ..data import vqa\n\n    return vqa\n",
    )
    assert "vlaforget.data.vqa" in codedeps.code_modules("eval")
    h2 = hashes()
    append(vqa, "\n_EDIT_2 = 2\n")
    h3 = hashes()
    assert h3["eval"] != h2["eval"]


def test_a_real_edit_reruns_exactly_the_stages_that_import_the_file(pkg):
    before = hashes()
    append(pkg / "report" / "figures.py", "\n_X = 1\n")
    after = hashes()
    assert {s for s in before if before[s] != after[s]} == {"figures"}  # tables do not import figures
    before = after
    append(pkg / "envs" / "metaworld.py", "\n_X = 1\n")
    after = hashes()
    changed = {s for s in before if before[s] != after[s]}
    assert changed == {
        s for s in codedeps.STAGES_WITH_CODE if "vlaforget.envs.metaworld" in codedeps.code_modules(s)
    }
    assert {"demos", "eval"} <= changed


def test_the_stages_module_is_the_entry_once_it_exists(pkg):
    """A stage's entry is its stages/<name>.py recipe; an import added to the recipe is tracked at once."""
    assert codedeps.stage_entry(pkg, "cache") == "vlaforget.stages.cache"
    (pkg / "stages" / "cache.py").write_text("from ..data import cache as _c\nfrom ..data import vqa as _v\n")
    mods = codedeps.code_modules("cache")
    assert {
        "vlaforget.stages.cache",
        "vlaforget.stages",
        "vlaforget.data.cache",
        "vlaforget.data.vqa",
    } <= set(mods)


# ----------------------------------------------------------------------------- 3: comments, docstrings


def test_comment_and_docstring_edits_change_no_code_hash(pkg):
    before = hashes()
    loop = pkg / "train" / "loop.py"
    edit(loop, '"""The one training loop:', '"""EDITED module docstring.\n\nThe one training loop:')
    edit(
        loop,
        "    stop_after (tests): stop as if killed",
        "    EDITED docstring line.\n    stop_after (tests): stop as if killed",
    )
    edit(
        loop,
        "        # rank 0 evaluates the bare model (no DDP collective), every rank gets its score",
        "        # EDITED comment\n\n\n        # rank 0 evaluates the bare model (no DDP collective), every rank gets its score",
    )
    edit(loop, "    # every run segment", "    # EDITED trailing comment\n    # every run segment")
    edit(pkg / "models" / "tiny.py", "\n", "\n# a new comment line: β, λ (non-ASCII before code)\n")
    append(pkg / "methods" / "hsw.py", "\n\n# trailing comment at the end of the file\n")
    edit(
        pkg / "train" / "plugins" / "craft.py",
        "class CraftPlugin(Plugin):\n",
        "class CraftPlugin(Plugin):  # a comment after code\n",
    )
    assert hashes() == before
    # the same edit in a string that is not a docstring is code
    edit(loop, "desc=f\"train {sc['run_name']}\"", "desc=f\"training {sc['run_name']}\"")
    assert hashes()["train"] != before["train"]


def test_canonical_code_keeps_code_and_drops_only_comments_and_docstrings(tmp_path):
    f, g = tmp_path / "m.py", tmp_path / "n.py"
    f.write_text(
        '"""Doc."""\n\nX = "# not a comment"  # a comment\n\n\ndef f():\n    """Doc\n    two lines."""\n'
        '    return "λ"  # λ\n\n\nclass C:\n    """D."""\n\n    y = 1\n'
    )
    g.write_text('X = "# not a comment"\ndef f():\n    return "λ"\nclass C:\n    y = 1\n')
    assert codedeps.canonical_code(f) == codedeps.canonical_code(g)
    assert "\"str:'# not a comment'\"" in codedeps.canonical_code(f) and "Doc" not in codedeps.canonical_code(
        f
    )


def test_reformatting_the_library_reruns_nothing(pkg, demo_config):
    """`ruff format` of every module (here with line length 60 and single quotes, so most files
    change) leaves every stage's code hash, and every train run's code, as it was."""
    import subprocess
    import sys

    before, train_before = hashes(), _train_codes(demo_config)
    loop_text = (pkg / "train" / "loop.py").read_text()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "format",
            "--quiet",
            "--no-cache",
            "--isolated",
            "--line-length",
            "60",
            "--config",
            "format.quote-style='single'",
            str(pkg),
        ],
        check=True,
    )
    assert (pkg / "train" / "loop.py").read_text() != loop_text
    assert hashes() == before and _train_codes(demo_config) == train_before


# ----------------------------------------------------------------------------- 2: per plug-in


def _train_codes(cfg) -> dict[str, str]:
    runs = {
        "baseline": "baseline",
        "hsw+thermostat": "icsm_hsw_thermostat",
        "hsw only": "no_thermostat",
        "craft": "craft",
    }
    return {
        k: vsc.stage_config(cfg, "train", vfs.run_name(m, "mw_downstream", "full", 42))["code"]
        for k, m in runs.items()
    }


def test_a_plugin_edit_reruns_only_the_runs_that_enable_it(pkg, demo_config):
    cfg = demo_config
    c0 = _train_codes(cfg)
    assert len(set(c0.values())) == 4  # each combination of plug-ins has its own code
    append(pkg / "train" / "plugins" / "hsw.py", "\n_X = 1\n")
    c1 = _train_codes(cfg)
    assert {k for k in c0 if c0[k] != c1[k]} == {"hsw+thermostat", "hsw only"}
    append(pkg / "methods" / "thermostat.py", "\n_X = 1\n")
    c2 = _train_codes(cfg)
    assert {k for k in c1 if c1[k] != c2[k]} == {"hsw+thermostat"}
    append(pkg / "methods" / "craft.py", "\n_X = 1\n")
    c3 = _train_codes(cfg)
    assert {k for k in c2 if c2[k] != c3[k]} == {"craft"}
    append(pkg / "train" / "loop.py", "\n_X = 1\n")
    c4 = _train_codes(cfg)
    assert all(c3[k] != c4[k] for k in c4)  # the loop is every run's code
    base = codedeps.code_modules("train")
    assert not any("plugins.hsw" in m or "methods.craft" in m or "methods.icsm" in m for m in base)


def test_periodic_eval_code_counts_only_with_early_stopping(pkg, demo_config):
    def code(**train):
        cfg = copy.deepcopy(demo_config)
        cfg["train"].update(train)
        return vsc.stage_config(cfg, "train", vfs.run_name("baseline", "mw_downstream", "full", 42))["code"]

    a, b, c = (
        code(eval_every=0),
        code(eval_every=5, early_stopping_patience=0),
        code(eval_every=5, early_stopping_patience=2),
    )
    assert a == b != c
    append(pkg / "eval" / "rollout.py", "\n_X = 1\n")
    assert code(eval_every=0) == a and code(eval_every=5, early_stopping_patience=2) != c


# ----------------------------------------------------------------------------- 4: non-semantic keys


def _train_sc(cfg, method="baseline", **train):
    cfg = copy.deepcopy(cfg)
    cfg["train"].update(train)
    return vsc.stage_config(cfg, "train", vfs.run_name(method, "mw_downstream", "full", 42))


def test_non_semantic_keys_change_neither_the_config_id_nor_the_run_id(demo_config):
    ref = _train_sc(demo_config)
    for over in (
        {"log_every": 3},
        {"save_steps": 7},
        {"num_workers": 2},
        {"use_wandb": True, "wandb_mode": "online", "wandb_project": "p"},
        {"eval_every": 10, "eval_episodes_per_task": 2},
    ):
        sc = _train_sc(demo_config, **over)
        assert sc["train"][next(iter(over))] == next(iter(over.values()))  # still in the file for the job
        assert (config_id(sc), sc["run_id"]) == (config_id(ref), ref["run_id"]), over
    # semantic ones change both
    for over in ({"lr": 0.123}, {"batch_size": 3}, {"eval_every": 10, "early_stopping_patience": 2}):
        sc = _train_sc(demo_config, **over)
        assert config_id(sc) != config_id(ref) and sc["run_id"] != ref["run_id"], over
    d = vsc.stage_config(demo_config, "demos", "mw_downstream")
    d2 = dict(d, workers=7)
    assert config_id(d2) == config_id(d)


def test_max_steps_changes_the_config_id_but_not_the_run_id_under_a_constant_lr(demo_config):
    ref = _train_sc(demo_config, lr_schedule="constant", warmup_steps=2)
    more = _train_sc(
        demo_config, lr_schedule="constant", warmup_steps=2, max_steps=ref["train"]["max_steps"] * 2
    )
    assert config_id(more) != config_id(ref)  # the job reruns ...
    assert more["run_id"] == ref["run_id"]  # ... and continues in the same checkpoint directory
    cos = _train_sc(demo_config, lr_schedule="cosine")
    cos2 = _train_sc(demo_config, lr_schedule="cosine", max_steps=ref["train"]["max_steps"] * 2)
    assert cos2["run_id"] != cos["run_id"]  # a decay planned over max_steps: another run


# ----------------------------------------------------------------------------- 5: raise max_steps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("inval") / "data" / "vlaforget"
    root.mkdir(parents=True)
    return root, make_cache(root), make_model(root)


def _run(sc, name, **train):
    out = clone(sc, out_dir=str(Path(sc["out_dir"]).parent / name))
    out["train"] = {**out["train"], **train}
    out["run_id"] = vsc.run_id_of(out, out["run_name"])
    return out


def _segments(sc):
    return json.loads((Path(sc["out_dir"]) / "checkpoints" / sc["run_id"] / "segments.json").read_text())


def _steps_logged(sc):
    lines = (Path(sc["out_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if "train_loss" in json.loads(x)]


def test_raising_max_steps_continues_from_the_old_target(world, caplog):
    """Run to 4, raise to 7: the run id stays, steps 5..7 run from the checkpoint of step 4 (none
    before it again), and the adapter equals a run trained to 7 in one go, to the bit."""
    from vlaforget.train.loop import run_training

    root, cache, model = world
    base = base_stage(root, cache, model, lr=5e-3, save_steps=3, log_every=1)
    direct = _run(base, "direct", max_steps=7)
    run_training(direct)
    first = _run(base, "raised", max_steps=4)
    run_training(first)
    logged_at_4 = (Path(first["out_dir"]) / "metrics.jsonl").read_text()
    raised = _run(base, "raised", max_steps=7)
    assert raised["run_id"] == first["run_id"]
    caplog.set_level("INFO", logger="vlaforget.train")
    res = run_training(raised)
    assert "from step 4" in caplog.text and "max_steps 4 -> 7" in caplog.text
    segs = _segments(raised)
    assert [(g["from_step"], g["to_step"]) for g in segs] == [(0, 4), (4, 7)]
    assert _steps_logged(raised) == [1, 2, 3, 4, 5, 6, 7]
    assert (
        (Path(raised["out_dir"]) / "metrics.jsonl").read_text().startswith(logged_at_4)
    )  # 1..4 kept, not redone
    assert res["steps"] == 7
    a, b = run_adapter(direct), run_adapter(raised)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_lowering_max_steps_resumes_at_or_before_the_new_target(world, caplog):
    """Run to 7 (checkpoints at 6 and 7), lower to 5: nothing at or before 5 is kept, so it trains
    from step 0; the result equals a run to 5, and the checkpoints past 5 are dropped."""
    from vlaforget.train.loop import run_training

    root, cache, model = world
    base = base_stage(root, cache, model, lr=5e-3, save_steps=3, log_every=1)
    direct = _run(base, "direct5", max_steps=5)
    run_training(direct)
    long = _run(base, "lowered", max_steps=7)
    run_training(long)
    low = _run(base, "lowered", max_steps=5)
    run_training(low)
    a, b = run_adapter(direct), run_adapter(low)
    assert all((a[k] == b[k]).all() for k in a)
    kept = sorted(p.name for p in (Path(low["out_dir"]) / "checkpoints" / low["run_id"]).glob("step_*"))
    assert kept == ["step_00000003", "step_00000005"]


def test_periodic_eval_without_early_stopping_changes_no_step(world, monkeypatch):
    """The loop isolates the RNGs around periodic evaluation: an evaluator that draws from every
    RNG leaves the adapter bit-identical to a run without it (so eval cadence is non-semantic)."""
    import random

    import numpy as np
    import torch

    from vlaforget.train import loop

    def noisy_eval(backend, model):
        torch.rand(10)
        np.random.rand(10)
        random.random()
        return 0.5

    root, cache, model = world
    base = base_stage(
        root,
        cache,
        model,
        lr=5e-3,
        save_steps=100,
        max_steps=6,
        lora={"r": 4, "alpha": 8, "dropout": 0.3, "targets": ["attn", "mlp"], "layers": "all"},
    )
    plain = _run(base, "plain_eval0")
    loop.run_training(plain)
    evald = _run(base, "with_eval", eval_every=2)
    evald["periodic_eval"] = {"suite": "toy"}
    loop.run_training(evald, evaluator=noisy_eval)
    assert any(
        "eval_success_rate" in json.loads(x)
        for x in (Path(evald["out_dir"]) / "metrics.jsonl").read_text().splitlines()
    )
    a, b = run_adapter(plain), run_adapter(evald)
    assert all((a[k] == b[k]).all() for k in a)


def test_early_stopping_resumes_with_its_patience_count(world, monkeypatch):
    """A run killed between two periodic evaluations resumes with the best score and the count of
    evaluations without improvement it had, so it stops where the uninterrupted run stops (before:
    it forgot them and trained on to step 10)."""
    from vlaforget.train import loop

    calls = []

    def evaluator(backend, model):  # evaluation k (at step 2k) scores 0.5, 0.4, 0.3, ...
        calls.append(1)
        return 0.6 - 0.1 * len(calls)

    root, cache, model = world
    base = base_stage(
        root, cache, model, lr=5e-3, save_steps=5, max_steps=12, eval_every=2, early_stopping_patience=2
    )
    plain = _run(base, "es_plain")
    plain["periodic_eval"] = {"suite": "toy"}
    assert (
        loop.run_training(plain, evaluator=evaluator)["steps"] == 6
    )  # best 0.5 at 2, no improvement at 4 and 6
    calls.clear()
    killed = _run(base, "es_killed")
    killed["periodic_eval"] = {"suite": "toy"}
    assert loop.run_training(killed, stop_after=5, evaluator=evaluator) == {
        "stopped_at": 5
    }  # checkpoint at 5, after eval 2
    assert loop.run_training(killed, evaluator=evaluator)["steps"] == 6
