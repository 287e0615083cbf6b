"""The study grid and its job graph, written once: which runs a study trains, which suites each run
and the teacher are evaluated on, which runs each table reads, and every stage job (stage, key).
The workflow's input functions (workflow/rules/common.smk), `vlaforget plan` and the migration of
an old data root (migrate.py) all read them from here.
"""

from __future__ import annotations

from .config import (
    anchor_set,
    chain_suites,
    method_config,
    method_needs,
    parse_run_name,
    probe_set_name,
    run_name,
    shots_name,
    stage_config,
    suites_all,
)
from .config import chain_runs as _chain_runs


def _unique(xs):
    return list(dict.fromkeys(xs))


def main_runs(cfg: dict) -> list[str]:
    st = cfg["study"]
    return [
        run_name(m, s, "full", seed)
        for s in st.get("suites", [])
        for m in st.get("methods", [])
        for seed in st.get("seeds", [])
    ]


def fewshot_runs(cfg: dict) -> list[str]:
    st = cfg["study"]
    if not st.get("fewshot_suite"):
        return []
    return [
        run_name(m, st["fewshot_suite"], shots_name(k), seed)
        for m in st.get("fewshot_methods", [])
        for k in st.get("shots", [])
        for seed in st.get("seeds", [])
    ]


def ablation_methods(cfg: dict) -> list[str]:
    """The listed ablations plus the full methods they ablate (their bases), bases first."""
    abl = list(cfg["study"].get("ablations", []))
    return _unique([cfg["ablations"][a]["base"] for a in abl]) + abl


def ablation_runs(cfg: dict) -> list[str]:
    st = cfg["study"]
    if not st.get("ablation_suite") or not st.get("ablations"):
        return []
    return [
        run_name(m, st["ablation_suite"], "full", seed)
        for m in ablation_methods(cfg)
        for seed in st.get("ablation_seeds", [])
    ]


def chain_runs(cfg: dict) -> list[str]:
    """Every stage of every chain (study.chain: method x seed), stage 1 first in each chain."""
    return [r for ch in _chain_runs(cfg) for r in ch]


def all_runs(cfg: dict) -> list[str]:
    """Every training run of the study, each once."""
    return _unique(main_runs(cfg) + fewshot_runs(cfg) + ablation_runs(cfg) + chain_runs(cfg))


def upstream_suites(cfg: dict) -> list[str]:
    return list((cfg["eval"].get("forgetting") or {}).get("upstream_suites") or [])


def table_runs(cfg: dict) -> dict[str, list[str]]:
    """The runs each table is built from (lifelong only with study.chain)."""
    out = {"main": main_runs(cfg), "fewshot": fewshot_runs(cfg), "ablation": ablation_runs(cfg)}
    if chain_suites(cfg):
        out["lifelong"] = chain_runs(cfg)
    return out


def run_eval_suites(cfg: dict, run: str) -> list[str]:
    """Suites a run (or the teacher) is evaluated on in closed loop: its own + the upstream suites;
    a chain stage: every chain suite (its row of the success matrix)."""
    suites = [] if run == "teacher" else [parse_run_name(run)["suite"]]
    extra = chain_suites(cfg) if run in set(chain_runs(cfg)) else []
    return _unique(suites + extra + upstream_suites(cfg))


def teacher_eval_suites(cfg: dict, runs: list[str]) -> list[str]:
    """The teacher's closed-loop suites for the given runs: every suite they are trained or measured on."""
    suites = [s for r in runs for s in run_eval_suites(cfg, r)] + upstream_suites(cfg)
    if set(runs) & set(chain_runs(cfg)):
        suites += chain_suites(cfg)
    return _unique(suites)


def anchor_set_of(cfg: dict, run: str) -> str | None:
    """The CRaFT anchor set a run reads (None: its method reads none)."""
    r = parse_run_name(run)
    if "craft" not in method_needs(method_config(cfg, r["method"])):
        return None
    from .config import parse_shots

    return anchor_set(r["suite"], parse_shots(r["shots"]), r["seed"])


def stage_jobs(cfg: dict) -> list[tuple[str, str]]:
    """(stage, key) of every stage job the study asks for, upstream first."""
    base, ps = cfg["model"]["base"], probe_set_name(cfg)
    jobs = []
    if cfg["world"] == "metaworld":
        jobs += [("demos", d) for d in (cfg["data"].get("metaworld") or {}).get("datasets") or {}]
    jobs += [("cache", d) for d in suites_all(cfg)]
    if cfg["model"]["backend"] == "tiny":
        from .config import tiny_corpus_datasets

        jobs += [("cache", d) for d in tiny_corpus_datasets(cfg)]
    jobs += [("model", base), ("probe", ps), ("icsm", ps)]
    runs = all_runs(cfg)
    for r in runs:
        aset = anchor_set_of(cfg, r)
        if aset:
            jobs.append(("craft_anchors", aset))
        jobs.append(("train", r))
        jobs += [("eval", f"{r}@{s}") for s in run_eval_suites(cfg, r)] + [("forgetting", r)]
    jobs += [("eval", f"teacher@{s}") for s in teacher_eval_suites(cfg, runs)] + [("forgetting", "teacher")]
    return _unique(jobs)


def stage_configs(cfg: dict) -> dict[tuple[str, str], dict]:
    """Every stage job's stage config (ids and paths included)."""
    return {job: stage_config(cfg, *job) for job in stage_jobs(cfg)}
