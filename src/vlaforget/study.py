"""The study: its names, its methods, its grid and its job graph, written once.

- names: run names (`{suite}__{method}__{shots}__s{seed}`), suites, the probe set, CRaFT anchor sets,
  the stages of a chain (study.chain);
- methods: the full plug-in block of a method or ablation (`method_config`) and the teacher
  artifacts it reads (`method_needs`);
- the grid: which runs a study trains, which suites each run and the teacher are evaluated on, which
  runs each table reads;
- initial states (eval.initial_states): shared, or per training seed — a block of states per seed
  (state_start), the teacher's closed-loop evals per seed (`teacher__s{seed}`, teacher_evals) and the
  config-time checks (check_initial_states);
- the job graph: every stage job (stage, key) (`stage_jobs`) and the jobs each one reads (`upstream`).

The workflow's input functions (workflow/rules/common.smk), `vlaforget plan`, the stage configs
(stageconfig.py) and the migration of an old data root (migrate.py) all read them from here. It
reads the study config as a dict and imports nothing above settings.py: config.py (loading and
validation) checks the names with it.
"""

from __future__ import annotations

import copy
import re

from . import settings
from .errors import ConfigError
from .settings import ProbeStageSettings

NAME_RE = r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*"  # method / suite names: no double underscore


# ----------------------------------------------------------------------------- methods


def all_method_names(cfg: dict) -> list[str]:
    return list(cfg["methods"]) + list(cfg.get("ablations") or {})


def method_defaults() -> dict[str, dict]:
    """Every plug-in block of a method, off: one per field of settings.MethodSettings."""
    return {name: {"enabled": False} for name in settings.method_blocks()}


def method_config(cfg: dict, method: str) -> dict:
    """The full plug-in config of a method or ablation (every block present, off unless enabled)."""
    defaults = method_defaults()
    if method in cfg["methods"]:
        block = cfg["methods"][method] or {}
    elif method in (cfg.get("ablations") or {}):
        spec = cfg["ablations"][method]
        block = copy.deepcopy(cfg["methods"][spec["base"]] or {})
        for dotted, value in (spec.get("set") or {}).items():
            parts = dotted.split(".")
            node = block
            for p in parts[:-1]:
                if p not in node and p not in defaults:
                    raise ConfigError(f"ablations.{method}.set: '{dotted}' names unknown block '{p}'")
                node = node.setdefault(p, {})
            node[parts[-1]] = value
    else:
        raise ConfigError(f"unknown method '{method}': define it under methods or ablations")
    out = defaults  # config.deep_merge, one level deep: each default is a flat block
    for k, v in block.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **copy.deepcopy(v)}
        else:
            out[k] = copy.deepcopy(v)
    return out


def method_needs(mcfg: dict) -> set[str]:
    """Which teacher artifacts a method reads ('icsm', 'probe', 'craft'): what its enabled plug-ins
    declare (settings.PluginSettings.READS)."""
    needs: set[str] = set()
    for name, block in settings.method_blocks().items():
        if (mcfg.get(name) or {}).get("enabled"):
            needs |= set(block.READS)
    return needs


# ----------------------------------------------------------------------------- names


def suites_all(cfg: dict) -> list[str]:
    out = list(cfg["study"].get("suites", []))
    for s in (
        cfg["study"].get("fewshot_suite"),
        cfg["study"].get("ablation_suite"),
        cfg["probe"].get("dataset"),
    ):
        if s and s not in out:
            out.append(s)
    for s in list(cfg["eval"].get("forgetting", {}).get("upstream_suites", [])) + chain_suites(cfg):
        if s not in out:
            out.append(s)
    mw = cfg["data"].get("metaworld") or {}
    for s in mw.get("datasets", {}):
        if s not in out:
            out.append(s)
    return out


def shots_name(shots: int | None) -> str:
    return "full" if not shots else f"{shots}shot"


def parse_shots(name: str) -> int | None:
    if name == "full" or re.fullmatch(r"chain\d+", name):  # a chain stage trains on the full suite
        return None
    m = re.fullmatch(r"(\d+)shot", name)
    if not m:
        raise ConfigError(f"shots '{name}': expected 'full', '<n>shot' or 'chain<k>'")
    return int(m.group(1))


def run_name(method: str, suite: str, shots: str, seed: int | str) -> str:
    return f"{suite}__{method}__{shots}__s{seed}"


def parse_run_name(name: str) -> dict:
    m = re.fullmatch(rf"({NAME_RE})__({NAME_RE})__(full|\d+shot|chain\d+)__s(\d+)", name)
    if not m:
        raise ConfigError(f"run name '{name}' is not suite__method__shots__s<seed>")
    return {"suite": m.group(1), "method": m.group(2), "shots": m.group(3), "seed": int(m.group(4))}


def probe_set_name(cfg: dict) -> str:
    p = cfg["probe"]
    return f"{p['dataset']}_{p.get('split', ProbeStageSettings.split)}_n{p['n']}_s{p.get('seed', ProbeStageSettings.seed)}"


def anchor_set(suite: str, shots: int | None, seed: int) -> str:
    """CRaFT anchor-cache key: the suite, or the few-shot subset `{suite}__{n}shot__s{seed}`."""
    return suite if not shots else f"{suite}__{int(shots)}shot__s{int(seed)}"


def parse_anchor_set(key: str) -> tuple[str, int | None, int | None]:
    m = re.fullmatch(r"(.+?)__(\d+)shot__s(\d+)", key)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else (key, None, None)


def trained_suites(cfg: dict) -> list[str]:
    """Every suite some run of the study fine-tunes on (main, few-shot, ablation runs)."""
    st = cfg["study"]
    out = list(st.get("suites", []) if st.get("methods") else [])
    if st.get("fewshot_suite") and st.get("fewshot_methods") and st.get("shots"):
        out.append(st["fewshot_suite"])
    if st.get("ablation_suite") and st.get("ablations"):
        out.append(st["ablation_suite"])
    if (st.get("chain") or {}).get("methods"):
        out += chain_suites(cfg)
    return sorted(set(out))


def tiny_pretrain_dataset(cfg: dict) -> str:
    """The tiny teacher's pretraining dataset: model.pretrain.dataset, else data.metaworld.upstream."""
    ds = (cfg["model"].get("pretrain") or {}).get("dataset") or (cfg["data"].get("metaworld") or {}).get(
        "upstream"
    )
    if not ds:
        raise ConfigError(
            "model.backend tiny needs model.pretrain.dataset (world libero: e.g. "
            "libero_goal_no_noops) or data.metaworld.upstream"
        )
    return ds


def tiny_corpus_datasets(cfg: dict) -> list[str]:
    """Datasets whose instructions the tiny tokenizer learns: every Meta-World dataset, or (LIBERO)
    every suite of the study and the pretraining dataset."""
    mw = cfg["data"].get("metaworld") or {}
    if mw.get("datasets"):
        return list(mw["datasets"])
    return list(dict.fromkeys(suites_all(cfg) + [tiny_pretrain_dataset(cfg)]))


def dataset_tasks(cfg: dict, dataset: str) -> list[str] | None:
    mw = cfg["data"].get("metaworld") or {}
    return (mw.get("datasets") or {}).get(dataset)


# ----------------------------------------------------------------------------- chained runs


def chain_suites(cfg: dict) -> list[str]:
    return list((cfg["study"].get("chain") or {}).get("suites") or [])


def chain_seeds(cfg: dict) -> list[int]:
    ch = cfg["study"].get("chain") or {}
    return list(ch.get("seeds") or cfg["study"].get("seeds") or [])


def chain_run(cfg: dict, method: str, k: int, seed: int) -> str:
    """Stage k (1-based) of the chain over study.chain.suites: stage 1 is the plain full-data run on the
    first suite (from the teacher, the same run as the main grid's); stage k > 1 is
    `{suite_k}__{method}__chain{k}__s{seed}`, which continues training stage k-1's adapter."""
    suites = chain_suites(cfg)
    return run_name(method, suites[k - 1], "full" if k == 1 else f"chain{k}", seed)


def chains(cfg: dict) -> list[list[str]]:
    """One list per (method, seed) of the chain: its stages' run names, in order (chain_runs: all)."""
    ch = cfg["study"].get("chain") or {}
    K = len(chain_suites(cfg))
    return [
        [chain_run(cfg, m, k, s) for k in range(1, K + 1)]
        for m in ch.get("methods") or []
        for s in chain_seeds(cfg)
    ]


def chain_previous(cfg: dict, run: str) -> str | None:
    """The run a chain stage starts from (stage k-1), or None (stage 1 and every unchained run)."""
    r = parse_run_name(run)
    m = re.fullmatch(r"chain(\d+)", r["shots"])
    if not m:
        return None
    k, suites = int(m.group(1)), chain_suites(cfg)
    if not 2 <= k <= len(suites) or suites[k - 1] != r["suite"]:
        raise ConfigError(f"run {run}: study.chain.suites has no stage {k} on {r['suite']} (chain: {suites})")
    return chain_run(cfg, r["method"], k - 1, r["seed"])


# ----------------------------------------------------------------------------- the grid


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
    return [r for ch in chains(cfg) for r in ch]


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
    suites = [] if is_teacher(run) else [parse_run_name(run)["suite"]]
    extra = chain_suites(cfg) if run in set(chain_runs(cfg)) else []
    return _unique(suites + extra + upstream_suites(cfg))


def teacher_eval_suites(cfg: dict, runs: list[str]) -> list[str]:
    """The teacher's closed-loop suites for the given runs: every suite they are trained or measured on."""
    suites = [s for r in runs for s in run_eval_suites(cfg, r)] + upstream_suites(cfg)
    if set(runs) & set(chain_runs(cfg)):
        suites += chain_suites(cfg)
    return _unique(suites)


# ----------------------------------------------------------------------------- initial states
# eval.initial_states (settings.INITIAL_STATES): `shared` evaluates every run of every seed and the
# teacher (`teacher@{suite}`) on one set of initial states; `per_seed` gives the runs of each training
# seed a block of their own, shared by all methods of that seed, and evaluates the teacher on each
# seed's block (`teacher__s{seed}@{suite}`), so retention (run / teacher) and every paired comparison
# stay on the same states. The teacher's forgetting job (VQA, drift: no initial states) stays one.

TEACHER = "teacher"
TEACHER_RE = r"teacher(?:__s\d+)?"  # `__`: no method or suite name holds it (NAME_RE)
LIBERO_INIT_STATES = 50  # fixed init states per LIBERO task (envs.libero.NUM_INIT_STATES)
# data/metaworld_demos.generate tries at most int(factor * episodes_per_task) + 10 seeds per task
DEMO_ATTEMPTS_FACTOR = 3.0


def initial_states(cfg: dict) -> str:
    return (cfg.get("eval") or {}).get("initial_states") or settings.DEFAULT_INITIAL_STATES


def per_seed_states(cfg: dict) -> bool:
    return initial_states(cfg) == "per_seed"


def is_teacher(run: str) -> bool:
    return re.fullmatch(TEACHER_RE, run) is not None


def teacher_run(cfg: dict, seed: int | None) -> str:
    """The teacher's closed-loop eval key for the runs of a training seed: `teacher` (shared initial
    states), `teacher__s{seed}` (per_seed: on that seed's block)."""
    return f"{TEACHER}__s{int(seed)}" if per_seed_states(cfg) and seed is not None else TEACHER


def run_seed(run: str) -> int | None:
    """The training seed whose initial states a run's (or a teacher eval key's) evals use; None: the
    shared teacher."""
    m = re.fullmatch(r"teacher(?:__s(\d+))?", run)
    if m:
        return int(m.group(1)) if m.group(1) else None
    return parse_run_name(run)["seed"]


def initial_state_seeds(cfg: dict) -> list[int]:
    """Every training seed of the study, in order (study.seeds, ablation_seeds, chain seeds): a
    seed's index here numbers its LIBERO block of init states."""
    st = cfg["study"]
    return _unique(
        [int(s) for s in list(st.get("seeds") or []) + list(st.get("ablation_seeds") or [])]
        + [int(s) for s in chain_seeds(cfg)]
    )


def _episodes(cfg: dict) -> int:
    return int(cfg["eval"]["episodes_per_task"])


def _mw_first_seed(cfg: dict) -> int:
    return int((cfg["eval"].get("metaworld") or {}).get("seed", settings.EvalSettings.seed))


def state_start(cfg: dict, seed: int | None) -> int:
    """The first initial state of a training seed's block (None: the shared block): a Meta-World
    episode seed (eval.metaworld.seed + seed * episodes_per_task) or a LIBERO init state (the seed's
    index in initial_state_seeds * episodes_per_task). Episode i of a task uses state_start + i."""
    meta = cfg["world"] == "metaworld"
    if seed is None or not per_seed_states(cfg):
        return _mw_first_seed(cfg) if meta else 0
    if meta:
        return _mw_first_seed(cfg) + int(seed) * _episodes(cfg)
    seeds = initial_state_seeds(cfg)
    if int(seed) not in seeds:
        raise ConfigError(
            f"seed {seed} is no training seed of the study ({seeds}): it has no block of init states"
        )
    return seeds.index(int(seed)) * _episodes(cfg)


def demo_seed_range(cfg: dict) -> tuple[int, int] | None:
    """[first, last + 1) of the episode seeds the Meta-World demonstrations may use (None: LIBERO)."""
    mw = cfg["data"].get("metaworld") or {}
    if cfg["world"] != "metaworld" or mw.get("seed") is None:
        return None
    first = int(mw["seed"])
    return first, first + int(DEMO_ATTEMPTS_FACTOR * int(mw["episodes_per_task"])) + 10


def _libero_vqa_states(cfg: dict) -> int:
    """LIBERO init states the question set holds out (the last N of each task; data/libero_vqa.py),
    0 when no LIBERO question set is made (stageconfig.libero_vqa_params)."""
    f = cfg["eval"].get("forgetting") or {}
    if cfg["world"] != "libero" or not f.get("libero_vqa") or f.get("vqa_jsonl"):
        return 0
    return int(f["libero_vqa"].get("states_per_task", 2))  # libero_vqa_params' default


def check_initial_states(cfg: dict) -> None:
    """eval.initial_states at config load: per_seed blocks that fit the world, and no evaluation
    episode on a demonstration's seed (shared too). A ConfigError names the numbers and the fix."""
    n, per_seed = _episodes(cfg), per_seed_states(cfg)
    seeds = initial_state_seeds(cfg)
    if per_seed and any(s < 0 for s in seeds):
        raise ConfigError(
            f"eval.initial_states per_seed: training seeds must be >= 0 (a seed numbers its block of "
            f"initial states); got {[s for s in seeds if s < 0]}"
        )
    tr = cfg.get("train") or {}
    if per_seed and tr.get("eval_every") and int(tr.get("eval_episodes_per_task") or 0) > n:
        raise ConfigError(
            f"eval.initial_states per_seed: train.eval_episodes_per_task = {tr['eval_episodes_per_task']} "
            f"exceeds eval.episodes_per_task = {n}, the size of a seed's block: periodic evals would use "
            "the next seed's states; lower train.eval_episodes_per_task"
        )
    if cfg["world"] == "metaworld":
        demos = demo_seed_range(cfg)
        blocks = {s: state_start(cfg, s) for s in seeds} if per_seed else {"shared": state_start(cfg, None)}
        for s, a in blocks.items():
            if demos and a < demos[1] and demos[0] < a + n:
                raise ConfigError(
                    f"eval.initial_states {initial_states(cfg)}: the evaluation episodes of "
                    f"{'seed ' + str(s) if per_seed else 'every run'} use Meta-World seeds {a} … {a + n - 1}, "
                    f"which overlap the demonstrations' seeds {demos[0]} … {demos[1] - 1} "
                    f"(data.metaworld.seed {demos[0]}, up to {DEMO_ATTEMPTS_FACTOR:g} x episodes_per_task + 10 "
                    "tried per task): move eval.metaworld.seed past them (e.g. 500000)"
                )
        return
    if not per_seed:
        return
    held = _libero_vqa_states(cfg)
    free = LIBERO_INIT_STATES - held
    if len(seeds) * n > free:
        raise ConfigError(
            f"eval.initial_states per_seed: {len(seeds)} seeds x eval.episodes_per_task {n} = "
            f"{len(seeds) * n} init states per task, but LIBERO has {LIBERO_INIT_STATES}"
            + (f", {held} of them held out for eval.forgetting.libero_vqa" if held else "")
            + f" ({free} free): use at most {free // max(1, len(seeds))} episodes per task, at most "
            f"{free // max(1, n)} seeds, or eval.initial_states: shared"
        )


def teacher_evals(cfg: dict, runs: list[str]) -> list[tuple[str, str]]:
    """(teacher eval key, suite) of the teacher's closed-loop evals the given runs are compared with:
    `teacher` on teacher_eval_suites (shared), or per_seed `teacher__s{seed}` on the suites of that
    seed's runs."""
    if not per_seed_states(cfg):
        return [(TEACHER, s) for s in teacher_eval_suites(cfg, runs)]
    out = []
    for seed in _unique(run_seed(r) for r in runs):
        suites = teacher_eval_suites(cfg, [r for r in runs if run_seed(r) == seed])
        out += [(teacher_run(cfg, seed), s) for s in suites]
    return out


def anchor_set_of(cfg: dict, run: str) -> str | None:
    """The CRaFT anchor set a run reads (None: its method reads none)."""
    r = parse_run_name(run)
    if "craft" not in method_needs(method_config(cfg, r["method"])):
        return None
    return anchor_set(r["suite"], parse_shots(r["shots"]), r["seed"])


def stage_jobs(cfg: dict) -> list[tuple[str, str]]:
    """(stage, key) of every stage job the study asks for, upstream first."""
    base, ps = cfg["model"]["base"], probe_set_name(cfg)
    jobs = []
    if cfg["world"] == "metaworld":
        jobs += [("demos", d) for d in (cfg["data"].get("metaworld") or {}).get("datasets") or {}]
    jobs += [("cache", d) for d in suites_all(cfg)]
    if cfg["model"]["backend"] == "tiny":
        jobs += [("cache", d) for d in tiny_corpus_datasets(cfg)]
    jobs += [("model", base), ("probe", ps), ("icsm", ps)]
    runs = all_runs(cfg)
    for r in runs:
        aset = anchor_set_of(cfg, r)
        if aset:
            jobs.append(("craft_anchors", aset))
        jobs.append(("train", r))
        jobs += [("eval", f"{r}@{s}") for s in run_eval_suites(cfg, r)] + [("forgetting", r)]
    jobs += [("eval", f"{t}@{s}") for t, s in teacher_evals(cfg, runs)] + [("forgetting", TEACHER)]
    return _unique(jobs)


# ----------------------------------------------------------------------------- the job graph


def upstream(cfg: dict, stage: str, key: str) -> list[tuple[str, str, str]]:
    """(input name, stage, key) of every stage job a stage job reads: the edges of the job graph.
    The stage config's `inputs` (stageconfig.stage_inputs) and so the rules' inputs are made from it."""
    base, meta = cfg["model"]["base"], cfg["world"] == "metaworld"
    ps = probe_set_name(cfg)
    if stage == "demos":
        return []
    if stage == "cache":
        return [("rlds", "demos", key)] if meta else []
    if stage == "model":
        if cfg["model"]["backend"] != "tiny":
            return []
        return [(f"cache:{d}", "cache", d) for d in tiny_corpus_datasets(cfg)]
    if stage == "probe":
        return [("model", "model", base), ("cache", "cache", cfg["probe"]["dataset"])]
    if stage == "icsm":
        return [("model", "model", base), ("probe", "probe", ps)]
    if stage == "craft_anchors":
        return [("model", "model", base), ("cache", "cache", parse_anchor_set(key)[0])]
    if stage == "train":
        r = parse_run_name(key)
        needs = method_needs(method_config(cfg, r["method"]))
        out = [("model", "model", base), ("cache", "cache", r["suite"])]
        if "icsm" in needs:
            out.append(("icsm", "icsm", ps))
        if "probe" in needs:
            out.append(("probe", "probe", ps))
        if "craft" in needs:
            out.append(
                ("anchors", "craft_anchors", anchor_set(r["suite"], parse_shots(r["shots"]), r["seed"]))
            )
        prev = chain_previous(cfg, key)
        if prev:
            out.append(("init", "train", prev))
        return out
    if stage == "eval":
        run, suite = key.rsplit("@", 1)
        out = [("model", "model", base), ("cache", "cache", suite)]
        return out + ([("train", "train", run)] if not is_teacher(run) else [])
    if stage == "forgetting":
        out = [("model", "model", base), ("probe", "probe", ps), ("icsm", "icsm", ps)]
        if key != "teacher":
            out.append(("train", "train", key))
        if meta:
            f = cfg["eval"].get("forgetting", {})
            out += [
                (f"cache:{s}", "cache", s)
                for s in _unique(
                    list(f.get("upstream_suites", [])) + list(f.get("downstream_vqa_suites") or [])
                )
            ]
        return out
    return []
