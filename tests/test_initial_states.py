"""Issue 27 item 2: eval.initial_states. `shared` evaluates every run of every seed on one set of
initial states; `per_seed` gives each training seed's runs (every method, few-shot, ablation) and the
teacher (`teacher__s{seed}`) a block of their own, so seed-to-seed variation includes the states and
retention and every paired comparison stay on the same states. From stage configs, no simulation."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from conftest import REPO

from vlaforget import stageconfig as vsc
from vlaforget import study
from vlaforget.config import load_config
from vlaforget.errors import ConfigError
from vlaforget.report import paper
from vlaforget.report.lifelong import success_matrix
from vlaforget.report.tables import build_table, load_evals, teacher_of

DEMO = [REPO / "config" / f for f in ("config.yaml", "demo.yaml")]
LIBERO = [REPO / "config" / f for f in ("config.yaml", "rehearsal.yaml")]


def _demo(**over):
    return load_config(*DEMO, overrides=over)


def _per_seed(seeds=(42, 123), **over):
    over.setdefault("study", {}).update(seeds=list(seeds), ablation_seeds=list(seeds[:1]))
    over.setdefault("eval", {}).update(initial_states="per_seed")
    return _demo(**over)


def _episode_seeds(cfg, key: str) -> range:
    e = vsc.stage_config(cfg, "eval", key)["eval"]
    return range(e["seed"], e["seed"] + e["episodes_per_task"])


# ----------------------------------------------------------------------------- block arithmetic


def test_block_arithmetic(tmp_root):
    shared = _demo()
    assert study.initial_states(shared) == "shared"
    assert study.state_start(shared, 42) == study.state_start(shared, None) == 500000
    cfg = _per_seed()
    n = cfg["eval"]["episodes_per_task"]
    assert study.state_start(cfg, 42) == 500000 + 42 * n and study.state_start(cfg, 123) == 500000 + 123 * n
    assert study.state_start(cfg, None) == 500000  # the shared block (no seed)
    assert study.teacher_run(cfg, 42) == "teacher__s42" and study.teacher_run(shared, 42) == "teacher"
    assert study.run_seed("teacher__s42") == 42 and study.run_seed("teacher") is None
    assert study.run_seed("mw_downstream__baseline__5shot__s123") == 123
    assert study.is_teacher("teacher__s7") and not study.is_teacher("teacher_s7")
    # LIBERO: blocks by the seed's index in study.seeds (+ ablation / chain seeds)
    lib = load_config(
        *LIBERO,
        overrides={
            "study": {"seeds": [7, 3, 11]},
            "eval": {"initial_states": "per_seed", "episodes_per_task": 5},
        },
    )
    assert [study.state_start(lib, s) for s in (7, 3, 11)] == [0, 5, 10]
    e = vsc.stage_config(lib, "eval", "teacher__s11@libero_spatial_no_noops")["eval"]
    assert (e["first_init_state"], e["state_block"]) == (10, 11)
    with pytest.raises(ConfigError, match="no training seed"):
        study.state_start(lib, 99)


def test_the_bounds_the_checks_use_are_the_code_they_stand_for():
    from vlaforget.data.metaworld_demos import generate

    assert inspect.signature(generate).parameters["max_attempts_factor"].default == study.DEMO_ATTEMPTS_FACTOR
    src = inspect.getsource(inspect.getmodule(generate))
    assert "limit = int(max_attempts_factor * episodes_per_task) + 10" in src
    libero_src = (REPO / "src" / "vlaforget" / "envs" / "libero.py").read_text()
    assert f"NUM_INIT_STATES = {study.LIBERO_INIT_STATES}\n" in libero_src


# ----------------------------------------------------------------------------- validation


def test_metaworld_eval_seeds_overlapping_the_demonstrations_are_refused(tmp_root):
    # demos: data.metaworld.seed 1000, 24 per task -> seeds 1000 ... 1081 may be tried
    assert study.demo_seed_range(_demo()) == (1000, 1082)
    n = 3  # config/demo.yaml's eval.episodes_per_task
    with pytest.raises(ConfigError, match=r"seed 42 use Meta-World seeds 1050 … 1052, which overlap"):
        _per_seed(eval={"metaworld": {"seed": 1050 - 42 * n}})
    with pytest.raises(ConfigError, match="every run use Meta-World seeds 1081 … 1083"):
        _demo(eval={"metaworld": {"seed": 1081}})  # shared states too
    _per_seed(eval={"metaworld": {"seed": 1082 - 42 * n}})  # the block just past the demos: fine


def test_per_seed_refusals_name_the_numbers_and_the_fix(tmp_root):
    with pytest.raises(ConfigError, match=r"seeds must be >= 0"):
        _per_seed(seeds=(42, -1))
    with pytest.raises(
        ConfigError, match=r"train.eval_episodes_per_task = 4 exceeds eval.episodes_per_task = 3"
    ):
        _per_seed(train={"eval_every": 10, "eval_episodes_per_task": 4})
    # LIBERO: 50 init states per task, the question set holds out the last states_per_task of them
    over = {"eval": {"initial_states": "per_seed", "episodes_per_task": 20}}
    lib = load_config(
        *LIBERO, overrides={**over, "study": {"seeds": [1, 2], "ablation_seeds": [2]}}
    )  # 40 <= 49
    assert study.state_start(lib, 2) == 20
    with pytest.raises(
        ConfigError,
        match=r"3 seeds x eval.episodes_per_task 20 = 60 .* LIBERO has 50, 1 of them held out.*\(49 free\): use at most 16 episodes per task, at most 2 seeds",
    ):
        load_config(*LIBERO, overrides={**over, "study": {"seeds": [1, 2], "ablation_seeds": [3]}})
    load_config(
        *LIBERO, overrides={"study": {"seeds": [1, 2, 3]}, "eval": {"episodes_per_task": 20}}
    )  # shared


# ----------------------------------------------------------------------------- the study grid


def test_shared_keeps_one_teacher_eval_per_suite(tmp_root):
    jobs = study.stage_jobs(_demo())
    teacher = [k for s, k in jobs if s == "eval" and k.startswith("teacher")]
    assert teacher == ["teacher@mw_downstream", "teacher@mw_upstream"]
    e = vsc.stage_config(_demo(), "eval", "mw_downstream__baseline__full__s42@mw_upstream")["eval"]
    assert "state_block" not in e and "first_init_state" not in e and e["seed"] == 500000


def test_per_seed_adds_one_teacher_eval_per_seed_and_suite(tmp_root):
    cfg = _per_seed(seeds=(42, 123, 456))
    jobs = study.stage_jobs(cfg)
    teacher = sorted(k for s, k in jobs if s == "eval" and k.startswith("teacher"))
    assert teacher == sorted(
        f"teacher__s{s}@{suite}" for s in (42, 123, 456) for suite in ("mw_downstream", "mw_upstream")
    )
    assert [k for s, k in jobs if s == "forgetting" and study.is_teacher(k)] == [
        "teacher"
    ]  # VQA / drift: once
    # the teacher eval reads no training run; its block is its seed's
    assert [st for _, st, _ in study.upstream(cfg, "eval", "teacher__s42@mw_upstream")] == ["model", "cache"]
    sc = vsc.stage_config(cfg, "eval", "teacher__s42@mw_upstream")
    assert sc["adapter_dir"] is None and sc["run_name"] == "teacher__s42"
    assert vsc.job_dir(cfg, "eval", "teacher__s42@mw_upstream").parent.name == "teacher__s42"


def test_methods_of_a_seed_share_their_states_and_seeds_do_not(tmp_root):
    cfg = _per_seed(seeds=(42, 123))
    suite = "mw_upstream"
    s42 = [
        f"mw_downstream__baseline__full__s42@{suite}",
        f"mw_downstream__icsm_hsw_thermostat__full__s42@{suite}",
        f"mw_downstream__craft__full__s42@{suite}",
        f"mw_downstream__baseline__5shot__s42@{suite}",  # few-shot
        f"mw_downstream__no_thermostat__full__s42@{suite}",  # ablation
        f"teacher__s42@{suite}",
    ]
    blocks = {k: _episode_seeds(cfg, k) for k in s42}
    assert len(set(blocks.values())) == 1, blocks
    other = _episode_seeds(cfg, f"mw_downstream__baseline__full__s123@{suite}")
    assert other == _episode_seeds(cfg, f"teacher__s123@{suite}")
    assert not set(blocks[s42[0]]) & set(other)
    demos = range(*study.demo_seed_range(cfg))
    assert not set(demos) & (set(other) | set(blocks[s42[0]]))
    # every eval job of the study: two seeds never share an episode seed
    by_seed: dict[int, set] = {}
    for stage, key in study.stage_jobs(cfg):
        if stage == "eval":
            by_seed.setdefault(study.run_seed(key.rsplit("@", 1)[0]), set()).update(_episode_seeds(cfg, key))
    assert set(by_seed) == {42, 123} and not by_seed[42] & by_seed[123]
    # the periodic eval during training runs on the run's own block too
    cfg = _per_seed(seeds=(42, 123), train={"eval_every": 10})
    pe = vsc.stage_config(cfg, "train", "mw_downstream__baseline__full__s123")["periodic_eval"]
    assert (pe["seed"], pe["state_block"]) == (other.start, 123)


def test_demo_gpu_study_is_ten_seeds_on_their_own_states(tmp_root):
    cfg = load_config(*DEMO, REPO / "config" / "demo_gpu.yaml")
    assert study.per_seed_states(cfg) and len(cfg["study"]["seeds"]) == 10
    assert len(cfg["study"]["ablation_seeds"]) == 3
    teacher = [k for s, k in study.stage_jobs(cfg) if s == "eval" and study.is_teacher(k.split("@")[0])]
    assert len(teacher) == 10 * 2
    assert not study.per_seed_states(load_config(*DEMO))  # the CPU demo stays shared


def test_closed_loop_episodes_and_protocol_use_the_block(tmp_root):
    pytest.importorskip("metaworld")
    from vlaforget.eval.closed_loop import build_episodes

    cfg = _per_seed(seeds=(42, 123))
    sc = vsc.stage_config(cfg, "eval", "teacher__s123@mw_downstream")
    _, eps, protocol = build_episodes(sc["world"], sc["suite"], sc["eval"])
    first = 500000 + 123 * 3
    assert sorted({e.seed for e in eps}) == [first, first + 1, first + 2]
    assert protocol["seeds"] == [first, first + 2]
    assert protocol["initial_states"] == "per_seed" and protocol["state_block"] == 123
    sc = vsc.stage_config(_demo(), "eval", "teacher@mw_downstream")
    _, _, protocol = build_episodes(sc["world"], sc["suite"], sc["eval"])
    assert "state_block" not in protocol and protocol["seeds"] == [500000, 500002]


# ----------------------------------------------------------------------------- retention


def _write(root, run: str, suite: str, outcomes: list[int], first_seed: int) -> str:
    d = root / run
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{suite}.json"
    eps = [
        {"task": "t", "seed": first_seed + i, "index": i, "success": bool(o)} for i, o in enumerate(outcomes)
    ]
    p.write_text(
        json.dumps(
            {
                "run": run,
                "suite": suite,
                "success_rate": float(np.mean(outcomes)),
                "n_episodes": len(outcomes),
                "per_task": {"t": {"success_rate": float(np.mean(outcomes))}},
                "episodes": eps,
            }
        )
    )
    return str(p)


def _forgetting(root, run: str, vqa: float) -> str:
    (root / run).mkdir(parents=True, exist_ok=True)
    p = root / run / "forgetting.json"
    p.write_text(json.dumps({"run": run, "vqa_accuracy": vqa, "drift_mean": 0.1}))
    return str(p)


@pytest.fixture
def per_seed_evals(tmp_path):
    """Teacher upstream 16/20 on seed 1's states, 8/20 on seed 2's; every run scores 8/20 upstream on
    its seed's states: retention 0.5 for seed 1, 1.0 for seed 2 (shared-teacher arithmetic: 8/12)."""
    first = {1: 500020, 2: 500040}
    files = [_forgetting(tmp_path, "teacher", 0.8)]
    files += [_write(tmp_path, "teacher__s1", "up", [1] * 16 + [0] * 4, first[1])]
    files += [_write(tmp_path, "teacher__s2", "up", [1] * 8 + [0] * 12, first[2])]
    files += [_write(tmp_path, f"teacher__s{s}", "down", [0] * 20, first[s]) for s in (1, 2)]
    for s in (1, 2):
        for m, up in (("baseline", [0] * 12 + [1] * 8), ("good", [1] * 8 + [0] * 12)):
            files += [_write(tmp_path, f"down__{m}__full__s{s}", "up", up, first[s])]
            files += [_write(tmp_path, f"down__{m}__full__s{s}", "down", [1] * 10 + [0] * 10, first[s])]
            files += [_forgetting(tmp_path, f"down__{m}__full__s{s}", 0.4)]
    return files


def test_retention_divides_by_the_teacher_on_the_same_states(per_seed_evals):
    evals = load_evals(per_seed_evals)
    assert set(evals) == {"teacher"} | {
        f"down__{m}__full__s{s}" for m in ("baseline", "good") for s in (1, 2)
    }
    t = evals["teacher"]
    assert sorted(t["blocks"]) == [1, 2] and t["suites"]["up"] == pytest.approx(24 / 40)  # pooled
    assert len(t["episodes"]["up"]) == 40 and t["forgetting"]["vqa_accuracy"] == 0.8
    assert teacher_of(t, 2)["suites"]["up"] == pytest.approx(8 / 20)
    assert teacher_of(t, 3)["suites"] == {}  # no block: no closed-loop teacher, not another seed's
    rows = {r["method"]: r for r in build_table(evals, "main", ["down", "up"])}
    assert rows["teacher"]["upstream_success_mean"] == pytest.approx(0.6)  # every block
    b = rows["baseline"]
    assert b["upstream_retention_mean"] == pytest.approx((0.5 + 1.0) / 2)  # per seed: 8/16, 8/8
    assert b["upstream_retention_std"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert b["vqa_retention_mean"] == pytest.approx(0.5)  # the teacher's one forgetting job
    p = paper.build_paper(evals, "main", ["down", "up"])
    prow = {r["method"]: r for r in p["rows"]}
    ret = prow["baseline"]["upstream_retention"]
    assert (ret["k"], ret["n"]) == (16, 40) and ret["value"] == pytest.approx((16 / 40) / (24 / 40))
    c = prow["good"]["comparison"]
    # McNemar pairs within a seed on that seed's states: 20 + 20 pairs, good wins 8, baseline 8 per seed
    assert c["upstream_pairs"] == 40 and (c["upstream_method_only"], c["upstream_reference_only"]) == (16, 16)
    assert c["upstream_diff"] == pytest.approx(0.0)


def test_a_seed_subset_table_pools_only_its_seeds_teacher_blocks(per_seed_evals):
    evals = load_evals([f for f in per_seed_evals if "__s2" not in f])  # e.g. ablation_seeds [1]
    evals["teacher"] = load_evals(per_seed_evals)["teacher"]  # the teacher evaluated on both blocks
    prow = {r["method"]: r for r in paper.build_paper(evals, "main", ["down", "up"])["rows"]}
    assert prow["baseline"]["upstream_retention"]["value"] == pytest.approx((8 / 20) / (16 / 20))


def test_lifelong_teacher_row_is_the_chains_seed(tmp_path):
    files = [
        _write(tmp_path, "teacher__s1", "a", [1] * 4, 0),
        _write(tmp_path, "teacher__s1", "b", [0] * 4, 0),
        _write(tmp_path, "teacher__s2", "a", [0] * 4, 4),
        _write(tmp_path, "teacher__s2", "b", [0] * 4, 4),
    ]
    files += [_write(tmp_path, "a__m__full__s2", s, [1, 0, 0, 0], 4) for s in ("a", "b")]
    files += [_write(tmp_path, "b__m__chain2__s2", s, [1, 1, 0, 0], 4) for s in ("a", "b")]
    M = success_matrix(load_evals(files), ["a", "b"], ["a__m__full__s2", "b__m__chain2__s2"])
    assert M[0].tolist() == [0.0, 0.0]  # seed 2's teacher, not the pooled 0.5
