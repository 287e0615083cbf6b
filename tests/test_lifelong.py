"""Chained multi-suite runs (study.chain, LIBERO's lifelong protocol; issue 18): run names and what
each stage starts from, the chained DAG of the real preset, the adapter carried from stage to stage,
the lifelong table on a hand-computed success matrix, and a micro chained study end to end."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, copy_workflow, snakemake
from test_workflow_dryrun import dry, planned

from vlaforget import config as vfc
from vlaforget import stageconfig as vsc
from vlaforget import study as vfs
from vlaforget.config import ConfigError
from vlaforget.report import lifelong as LL

PRESET = ["config/config.yaml", "config/profile_4090.yaml", "config/lifelong_libero.yaml"]
SUITES = ["libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops", "libero_10_no_noops"]


def _real(tmp_root, *extra):
    """config/config.yaml (+ overlays) with its data paths under the test's allowed root."""
    over = {"data": {"rlds_dir": str(tmp_root.parent / "rlds")}}
    return vfc.load_config(
        REPO / "config" / "config.yaml", *(REPO / "config" / e for e in extra), overrides=over
    )


def test_chain_run_names_and_previous_stage(tmp_root):
    cfg = _real(tmp_root, "lifelong_libero.yaml")
    chains = vfs.chains(cfg)
    assert len(chains) == 3 * 3 and all(len(c) == 4 for c in chains)  # methods x seeds, four stages
    first = chains[0]
    assert first == [
        "libero_spatial_no_noops__baseline__full__s42",
        "libero_object_no_noops__baseline__chain2__s42",
        "libero_goal_no_noops__baseline__chain3__s42",
        "libero_10_no_noops__baseline__chain4__s42",
    ]
    assert vfs.chain_previous(cfg, first[0]) is None  # stage 1: from the teacher (the main grid's run)
    for k in range(1, 4):
        assert vfs.chain_previous(cfg, first[k]) == first[k - 1]
        sc = vsc.stage_config(cfg, "train", first[k])
        assert sc["init_adapter"] == str(Path(vsc.job_output(cfg, "train", first[k - 1])) / "final")
        assert sc["inputs"]["init"]["rule"] == "train" and first[k - 1] in sc["inputs"]["init"]["file"]
        assert sc["shots"] is None  # a chain stage trains on the full suite
    # an unchained run's config (and so its run id) is the same with or without the chain
    plain = _real(tmp_root)
    assert "init_adapter" not in vsc.stage_config(cfg, "train", first[0])
    assert (
        vsc.stage_config(plain, "train", first[0])["run_id"]
        == vsc.stage_config(cfg, "train", first[0])["run_id"]
    )
    with pytest.raises(ConfigError, match="no stage 5"):
        vfs.chain_previous(cfg, "libero_10_no_noops__baseline__chain5__s42")


def test_chain_config_errors_name_the_key(tmp_root):
    cfg = _real(tmp_root)
    bad = {
        **cfg,
        "study": {**cfg["study"], "chain": {"suites": ["libero_spatial_no_noops"], "methods": ["baseline"]}},
    }
    with pytest.raises(ConfigError, match="study.chain.suites"):
        vfc.validate(bad)
    bad["study"]["chain"] = {"suites": SUITES[:2], "methods": ["nope"]}
    with pytest.raises(ConfigError, match="study.chain.methods names 'nope'"):
        vfc.validate(bad)


def _blocks(out: str) -> list[tuple[str, str, str]]:
    """(rule, input line, output line) of every job of a dry-run, in the order printed."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if m:
            i = re.search(r"^\s+input: (.*)$", block, re.MULTILINE)
            o = re.search(r"^\s+output: (.*)$", block, re.MULTILINE)
            jobs.append((m.group(1), i.group(1) if i else "", o.group(1) if o else ""))
    return jobs


def test_dryrun_of_the_preset_chains_the_stages_in_order(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    env = {"VLAFORGET_ROOT": "", "VLAFORGET_ALLOWED_ROOT": ""}  # the real paths; a dry-run writes nothing
    out = dry(["--profile", "profiles/4090", "--configfiles", *PRESET, "-p", "--", "table_lifelong"], wf, env)
    jobs = _blocks(out)
    train = {re.search(r"/runs/([^/]+)/\w{12}/final", o).group(1): i for r, i, o in jobs if r == "train"}
    assert len(train) == 36  # 3 methods x 3 seeds x 4 stages
    for m in ("baseline", "icsm_hsw_thermostat", "craft"):
        for seed in (42, 123, 456):
            stages = LL.stage_runs(SUITES, m, seed)
            assert "/runs/" not in train[stages[0]]  # stage 1 starts from the teacher
            for k in range(1, 4):  # stage k waits for stage k-1's adapter, and only for it
                prev = re.findall(r"/runs/([^/]+)/\w{12}/final/done.json", train[stages[k]])
                assert prev == [stages[k - 1]], (stages[k], prev)
    evals = planned(out)["eval"]
    for r in [s for m in ("baseline", "craft") for s in LL.stage_runs(SUITES, m, 42)] + ["teacher"]:
        for s in SUITES:  # the success matrix: every stage (and the teacher) on every chain suite
            assert any(re.search(rf"/evals/{r}/{s}/\w{{12}}\.json$", e) for e in evals), (r, s)
    (build,) = [(i, o) for r, i, o in jobs if r == "table_lifelong_build"]
    assert build[1].startswith("results/table_lifelong.csv")
    assert f"--chain-suites {' '.join(SUITES)} " in out
    assert re.search(
        r"benchmarks/train/libero_10_no_noops__craft__chain4__s456/\w{12}\.tsv", out
    )  # GPU rules


def test_init_from_adapter_carries_the_lora_weights(tmp_path):
    from peft import LoraConfig, get_peft_model

    from vlaforget.train.loop import TrainingError, init_from_adapter

    def net(seed, r=2):
        torch.manual_seed(0)  # the same teacher under every stage
        base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        torch.manual_seed(seed)  # LoRA init by the run seed
        return get_peft_model(base, LoraConfig(r=r, target_modules=["0", "2"], init_lora_weights="gaussian"))

    prev = net(0)
    with torch.no_grad():
        for n, p in prev.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p))  # "trained"
    prev.save_pretrained(str(tmp_path / "final"))

    def lora(m):
        return {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}

    nxt = net(1)
    assert any(not torch.equal(a, b) for a, b in zip(lora(prev).values(), lora(nxt).values()))
    init_from_adapter(nxt, tmp_path / "final")
    for (n, a), b in zip(lora(prev).items(), lora(nxt).values()):
        assert torch.equal(a, b), n
    x = torch.randn(4, 6)
    assert torch.allclose(prev(x), nxt(x))  # the same function: training continues from it
    with pytest.raises(TrainingError, match="LoRA r=2"):
        init_from_adapter(net(1, r=4), tmp_path / "final")
    with pytest.raises(TrainingError, match="no PEFT adapter"):
        init_from_adapter(nxt, tmp_path / "missing")


def _evals(M: np.ndarray, suites, method, seed):
    runs = ["teacher"] + LL.stage_runs(suites, method, seed)
    return {r: {"suites": dict(zip(suites, map(float, row))), "forgetting": None} for r, row in zip(runs, M)}


def test_lifelong_table_on_a_hand_computed_matrix(tmp_path):
    suites = ["a", "b", "c"]
    # rows: teacher, after stage 1, 2, 3; columns: suites a, b, c
    M = np.array([[0.2, 0.1, 0.0], [0.8, 0.3, 0.1], [0.5, 0.9, 0.2], [0.4, 0.6, 0.7]])
    # curves (before, final): a [0.2, 0.8], b [0.3, 0.9], c [0.2, 0.7]
    # FWT_k = mean of the clamped curve: 0.5, 0.6, 0.45 -> FWT = 1.55 / 3
    # NBT_1 = ((0.8-0.5) + (0.8-0.4)) / 2 = 0.35, NBT_2 = 0.9-0.6 = 0.3 -> NBT = 0.325
    # AUC_1 = (0.5 + 0.5 + 0.4) / 3, AUC_2 = (0.6 + 0.6) / 2, AUC_3 = 0.45
    m = LL.chain_metrics(M)
    assert m["curves"] == [[0.2, 0.8], [0.3, 0.9], [0.2, 0.7]]
    assert m["fwt"] == pytest.approx(1.55 / 3)
    assert m["nbt"] == pytest.approx(0.325)
    assert m["auc"] == pytest.approx((1.4 / 3 + 0.6 + 0.45) / 3)
    assert m["final_acc"] == pytest.approx(1.7 / 3)
    # periodic evals go between "before" and "final"; the carried adapter (final) is NBT's reference
    p = LL.chain_metrics(M, [[0.9, 0.7], [], []])
    assert p["curves"][0] == [0.2, 0.9, 0.7, 0.8] and p["fwt_k"][0] == pytest.approx((0.2 + 0.9 * 3) / 4)
    assert p["nbt"] == pytest.approx(0.325)

    # the table: two seeds of one method, mean and CI over them; the matrix in the Markdown
    M2 = M + 0.1
    evals = {**_evals(M, suites, "baseline", 0), **_evals(M2, suites, "baseline", 1)}
    evals["teacher"] = _evals(M, suites, "baseline", 0)["teacher"]
    M2[0] = M[0]
    rows, detail = LL.build(evals, suites)
    assert len(rows) == 1 and rows[0]["n_seeds"] == 2 and len(detail) == 2
    want = [LL.chain_metrics(M)["fwt"], LL.chain_metrics(M2)["fwt"]]
    assert rows[0]["fwt_mean"] == pytest.approx(np.mean(want)) and rows[0]["fwt_n"] == 2
    md = LL.to_markdown(rows, suites)
    assert "| stage 2 (b) | 0.550 | 0.950 | 0.250 |" in md  # mean of M and M + 0.1, row 2
    with pytest.raises(LL.LifelongInputError, match="every chain suite"):
        LL.build(
            {k: v for k, v in evals.items() if k != "c__baseline__chain3__s1"}
            | {"c__baseline__chain3__s1": {"suites": {"a": 0.1}, "forgetting": None}},
            suites,
        )


def test_lifelong_table_reads_periodic_evals(tmp_path):
    run_dir = tmp_path / "b__baseline__chain2__s0"
    run_dir.mkdir()
    recs = [
        {"step": 2, "loss": 1.0},
        {"step": 4, "eval_success_rate": 0.4},
        {"step": 8, "eval_success_rate": 0.6},
        {"step": 4, "eval_success_rate": 0.5},
    ]  # step 4 logged again after a resume: the last wins
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert LL.read_periodic(run_dir) == [0.5, 0.6]
    assert LL.read_periodic(tmp_path / "none") == []


CHAIN_OVERLAY = {
    "data": {"metaworld": {"datasets": {"mw_chain": ["door-open-v3"]}}},
    "train": {"eval_every": 2, "eval_episodes_per_task": 1},
    "study": {"chain": {"suites": ["mw_downstream", "mw_chain"], "methods": ["baseline"]}},
}


@pytest.mark.slow
def test_micro_chained_study_produces_the_matrix_and_metrics(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    (wf / "config" / "chain_micro.yaml").write_text(yaml.safe_dump(CHAIN_OVERLAY))
    env = {
        "VLAFORGET_ROOT": str(tmp_path / "data" / "root"),
        "VLAFORGET_ALLOWED_ROOT": str(tmp_path / "data"),
        "VLAFORGET_NO_PROGRESS": "1",
    }
    args = [
        "--profile",
        "profiles/ci",
        "--configfiles",
        "config/demo.yaml",
        "config/ci.yaml",
        "config/chain_micro.yaml",
        "--",
        "table_lifelong",
    ]
    r = snakemake(args, cwd=wf, env=env, timeout=3000)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    root = tmp_path / "data" / "root"
    (res,) = (root / "results").glob("ci-*")  # results_dir null: {root}/results/<study>-<id>
    (chain,) = json.loads((res / "table_lifelong.json").read_text())
    stages = ["mw_downstream__baseline__full__s42", "mw_chain__baseline__chain2__s42"]
    assert chain["runs"] == stages and np.asarray(chain["matrix"]).shape == (3, 2)
    # the matrix is the eval stages' numbers, the metrics the formulas on it
    for i, run in enumerate(["teacher"] + stages):
        for j, s in enumerate(chain["suites"]):
            (ev,) = (root / "evals" / run / s).glob("*.json")  # one config: one id
            assert chain["matrix"][i][j] == json.loads(ev.read_text())["success_rate"]
    periodic = [LL.read_periodic(next((root / "runs" / s).glob("*/final")).parent) for s in stages]
    assert all(len(p) == 1 for p in periodic)  # eval_every 2 of max_steps 4: step 2 (the final step: M[k][k])
    again = LL.chain_metrics(np.asarray(chain["matrix"]), periodic)
    for k in ("fwt", "nbt", "auc"):
        assert chain[k] == pytest.approx(again[k])
    assert (res / "table_lifelong.md").read_text().startswith("# Table: lifelong")
    row = next(iter(__import__("csv").DictReader((res / "table_lifelong.csv").open())))
    assert row["method"] == "baseline" and float(row["fwt_mean"]) == pytest.approx(chain["fwt"])
    # stage 2 started from stage 1's adapter
    (cfg2,) = (root / "runs" / stages[1]).glob("*/config.yaml")  # one config: one id folder
    sc2 = json.loads(cfg2.read_text())
    (final1,) = (root / "runs" / stages[0]).glob("*/final")
    assert sc2["init_adapter"] in (str(final1), "{root}/" + final1.relative_to(root).as_posix())
    (log2,) = (root / "logs" / "train" / stages[1]).glob("*.log")
    assert "chain: LoRA initialised from" in log2.read_text()
    (bench2,) = (root / "benchmarks" / "train" / stages[1]).glob("*.tsv")
    assert bench2.read_text().startswith("s\t")
    shutil.rmtree(root / "datasets", ignore_errors=True)


def test_a_chain_stage_trains_on_from_the_previous_adapter_with_the_teachers_calibration(tmp_path_factory):
    """The train loop with init_adapter: the thermostat calibrates at student = teacher (before the
    previous adapter is loaded), the stage starts from that adapter (its first loss is the previous
    stage's last level, not a fresh LoRA's), and a resumed stage is not re-initialised."""
    from pathlib import Path

    from train_fixtures import base_stage, clone, run_adapter, run_metrics, teacher_world

    from vlaforget.train.loop import run_training

    thermo = {
        "hsw": {
            "enabled": True,
            "groups": "icsm",
            "beta": 1.0,
            "gamma": 1.0,
            "clamp": "per_token",
            "eps": 1e-12,
            "use_sensitivity_order": True,
        },
        "thermostat": {
            "enabled": True,
            "law": "calibrated",
            "estimator": "full",
            "every": 2,
            "probe_batch": 24,
            "warmup_measurements": 2,
            "metric": "basis",
            "threshold_sigmas": 0.0,
            "gain": 50.0,
            "gamma_min": 0.0,
            "gamma_max": 1.0,
            "beta_min": 0.2,
            "beta_max": 1.0,
            "smoothing": 0.0,
        },
    }
    root, cache, model = teacher_world(tmp_path_factory, "chain")

    def stage(name, **over):
        sc = base_stage(
            root, cache, model, method_name="icsm_hsw_thermostat", method=thermo, max_steps=8, lr=5e-3
        )
        return clone(sc, out_dir=str(root / "runs" / name), run_id=f"{name}-id", **over)

    first = stage("s1")
    run_training(first)
    prev = str(Path(first["out_dir"]) / "final")
    chained, fresh = stage("s2", init_adapter=prev), stage("s2_fresh")
    run_training(chained)
    run_training(fresh)

    def calib(sc):
        return next(r["thermostat_calibration_d"] for r in run_metrics(sc) if "thermostat_calibration_d" in r)

    assert calib(chained) == calib(fresh)  # the noise floor of the teacher, not of the chained student

    def loss(sc):
        return [r["train_loss"] for r in run_metrics(sc) if "train_loss" in r]

    assert loss(chained)[0] < loss(fresh)[0]  # it starts where stage 1 left off
    assert any(
        not torch.equal(a, b) for a, b in zip(run_adapter(chained).values(), run_adapter(first).values())
    )
