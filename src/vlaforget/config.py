"""Study config: load + merge overlays, validate against the schema, and derive per-stage configs.

A *stage config* is the exact subset of the study config (plus derived paths) that shapes one
stage's output. Its id (io.config_id) names where the job's outputs live (`job_dir/{id}/`) and where
the workflow writes it (`{root}/configs/{stage}/{key}/{id}.yaml`); the stage command reads only that
file. So a config change gives exactly the stages whose stage config changed new outputs beside the
old ones, and every stage is runnable by hand with the same file (`vlaforget <stage> --config FILE`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .paths import Layout, PathPolicyError, check_under, resolve_allowed_root, resolve_root
from .settings import (
    DEFAULT_MODEL_DTYPE,
    CacheStageSettings,
    CraftAnchorSettings,
    CraftAnchorsStageSettings,
    DemosStageSettings,
    EvalSettings,
    ForgettingSettings,
    ModelSettings,
    ProbeStageSettings,
    TrainSettings,
)

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
PKG_DIR = Path(__file__).resolve().parent

NAME_RE = r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*"  # method / suite names: no double underscore


# ----------------------------------------------------------------------------- loading


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# YAML 1.1 (PyYAML, and Snakemake's configfile loader) reads `1e-4` as a string: it needs a dot
# (1.0e-4). We read YAML 1.2 floats too, and validate() converts such strings where they arrive.
FLOAT_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_RE, list("-+0123456789."))


def _coerce_floats(obj, path=()):
    """Strings that are YAML 1.2 floats (1e-4) -> float, in place (Snakemake loads with YAML 1.1)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in list(items):
        if isinstance(v, str) and FLOAT_RE.match(v.strip()):
            obj[k] = float(v)
        elif isinstance(v, (dict, list)):
            _coerce_floats(v, path + (k,))
    return obj


def load_yaml(path: str | Path, yaml12_floats: bool = False) -> dict:
    """A YAML mapping. yaml12_floats (study configs) also reads `1e-4` as a number; stage configs are
    read as written (yaml.safe_dump leaves a hex id like `5e1234` unquoted: it must stay a string)."""
    with open(path) as f:
        data = (yaml.load(f, Loader=_Loader) if yaml12_floats else yaml.safe_load(f)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(*paths: str | Path, overrides: dict | None = None) -> dict:
    cfg: dict = {}
    for p in paths:
        cfg = deep_merge(cfg, load_yaml(p, yaml12_floats=True))
    if overrides:
        cfg = deep_merge(cfg, overrides)
    validate(cfg)
    return cfg


def _format_path(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def validate(cfg: dict) -> dict:
    """Schema + semantic checks. Raises ConfigError naming the offending key."""
    import jsonschema

    _coerce_floats(cfg)
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = []
        for e in errors[:10]:
            where = _format_path(e.absolute_path)
            if e.validator == "additionalProperties":
                extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
                known = ", ".join(sorted(e.schema.get("properties", {})))
                for key in extra:
                    full = f"{where}.{key}" if e.absolute_path else key
                    msgs.append(f"unknown config key '{full}' (misspelled?). Known keys here: {known}")
            else:
                hint = ""
                if (
                    e.validator == "type"
                    and isinstance(e.instance, str)
                    and re.fullmatch(r"\s*[-+]?[\d.]+[eE][-+]?\d+\s*", e.instance)
                ):
                    hint = " (YAML reads this as a string: write it with a dot, e.g. 1.0e-4)"
                msgs.append(f"config key '{where}': {e.message}{hint}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(msgs) + "\nSee config/README.md.")
    _semantic_checks(cfg)
    return cfg


def _semantic_checks(cfg: dict) -> None:
    allowed = resolve_allowed_root(cfg)
    root = resolve_root(cfg)
    check_under(root, allowed, "root")
    rlds = cfg["data"].get("rlds_dir")
    if rlds:
        check_under(rlds, allowed, "data.rlds_dir")
    ModelSettings.of(cfg["model"])  # the model block's types (models/ reads the stage config's copy)
    mpath = cfg["model"].get("path")
    if mpath and (mpath.startswith("/") or mpath.startswith(".")):
        check_under(mpath, allowed, "model.path")
    if cfg["model"].get("cache_dir"):
        check_under(cfg["model"]["cache_dir"], allowed, "model.cache_dir")
    if (cfg.get("train") or {}).get("init_adapter"):
        check_under(cfg["train"]["init_adapter"], allowed, "train.init_adapter")
    if cfg["model"]["backend"] == "tiny" and not cfg["model"].get("tiny"):
        raise ConfigError(
            "model.backend is 'tiny' but model.tiny is empty: give the tiny sizes (see config/demo.yaml)"
        )
    if cfg["world"] == "metaworld" and not (cfg["data"].get("metaworld") or {}).get("datasets"):
        raise ConfigError("world is 'metaworld' but data.metaworld.datasets is empty")
    if cfg["world"] == "libero" and not rlds and not cfg["data"].get("fixture"):
        raise ConfigError(
            "world is 'libero' but data.rlds_dir is not set: point it at the folder "
            "holding modified_libero_rlds datasets"
        )
    names = all_method_names(cfg)
    for m in cfg["study"].get("methods", []) + cfg["study"].get("fewshot_methods", []):
        if m not in names:
            raise ConfigError(f"study.methods names '{m}', which is neither in methods nor ablations")
    chain = cfg["study"].get("chain") or {}
    for m in chain.get("methods") or []:
        if m not in names:
            raise ConfigError(f"study.chain.methods names '{m}', which is neither in methods nor ablations")
    cs = chain.get("suites") or []
    if chain and (len(cs) < 2 or len(set(cs)) != len(cs)):
        raise ConfigError(f"study.chain.suites = {cs}: a chain needs two or more distinct suites, in order")
    for a in cfg["study"].get("ablations", []):
        if a not in (cfg.get("ablations") or {}):
            raise ConfigError(f"study.ablations names '{a}', which is not defined under ablations")
    for a, spec in (cfg.get("ablations") or {}).items():
        if spec["base"] not in cfg["methods"]:
            raise ConfigError(f"ablations.{a}.base = '{spec['base']}' is not a method under methods")
        method_config(cfg, a)  # checks the dotted keys
    for name in names:
        if not re.fullmatch(NAME_RE, name):
            raise ConfigError(f"method name '{name}': use letters, digits and single underscores")
    for s in suites_all(cfg):
        if not re.fullmatch(NAME_RE, s):
            raise ConfigError(f"suite / dataset name '{s}': use letters, digits and single underscores")
    from .validation import late_checks

    late_checks(cfg)


# ----------------------------------------------------------------------------- methods


def all_method_names(cfg: dict) -> list[str]:
    return list(cfg["methods"]) + list(cfg.get("ablations") or {})


METHOD_DEFAULTS: dict[str, dict] = {
    "hsw": {"enabled": False},
    "thermostat": {"enabled": False},
    "craft": {"enabled": False},
}


def method_config(cfg: dict, method: str) -> dict:
    """The full plug-in config of a method or ablation (every block present, off unless enabled)."""
    if method in cfg["methods"]:
        block = cfg["methods"][method] or {}
    elif method in (cfg.get("ablations") or {}):
        spec = cfg["ablations"][method]
        block = copy.deepcopy(cfg["methods"][spec["base"]] or {})
        for dotted, value in (spec.get("set") or {}).items():
            parts = dotted.split(".")
            node = block
            for p in parts[:-1]:
                if p not in node and p not in METHOD_DEFAULTS:
                    raise ConfigError(f"ablations.{method}.set: '{dotted}' names unknown block '{p}'")
                node = node.setdefault(p, {})
            node[parts[-1]] = value
    else:
        raise ConfigError(f"unknown method '{method}': define it under methods or ablations")
    out = deep_merge(METHOD_DEFAULTS, block)
    return out


def method_needs(mcfg: dict) -> set[str]:
    """Which teacher artifacts a method reads: 'icsm', 'probe', 'craft'."""
    needs = set()
    if mcfg["hsw"].get("enabled") or mcfg["thermostat"].get("enabled"):
        needs |= {"icsm", "probe"}
    if mcfg["craft"].get("enabled"):
        needs.add("craft")
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


def chain_runs(cfg: dict) -> list[list[str]]:
    """One list per (method, seed) of the chain: its stages' run names, in order."""
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


def layout(cfg: dict) -> Layout:
    return Layout(resolve_root(cfg))


def rlds_root(cfg: dict) -> Path:
    """Folder holding {dataset}/ TFDS builder dirs (world libero; Meta-World: rlds_dir)."""
    if cfg["data"].get("fixture"):  # generated here, in a folder named by what it was made from
        return layout(cfg).root / "datasets" / "rlds" / "fixture" / stable_hash_of(fixture_params(cfg))
    return Path(cfg["data"]["rlds_dir"])


def rlds_dir(cfg: dict, dataset: str) -> str:
    """One dataset's RLDS: the demos job's output (Meta-World), else {rlds_root}/{dataset}."""
    if cfg["world"] == "metaworld":
        return job_output(cfg, "demos", dataset)
    return str(rlds_root(cfg) / dataset)


def fixture_params(cfg: dict) -> dict:
    """What the LIBERO-format fixture (data.fixture, the rehearsal) is made from: its folder's name."""
    fx = {
        "tasks": 2,
        "episodes": 3,
        "steps": 24,
        "seed": 0,
        "shards": 1,
        "source": "synthetic",
        **(cfg["data"].get("fixture") or {}),
    }
    out = suites_all(cfg)
    if cfg["model"]["backend"] == "tiny":
        out += [d for d in tiny_corpus_datasets(cfg) if d not in out]
    return {**fx, "suites": out}


def libero_vqa_params(cfg: dict) -> dict | None:
    """What the LIBERO question set (eval.forgetting.libero_vqa) is made from (None: not made here)."""
    f = cfg["eval"].get("forgetting") or {}
    v = f.get("libero_vqa")
    if not v or f.get("vqa_jsonl"):
        return None
    return {
        "suites": list(
            v.get("suites") or ["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"]
        ),
        "n": int(v.get("n", 600)),
        "seed": int(v.get("seed", cfg["seed"])),
        "states_per_task": int(v.get("states_per_task", 2)),
        "tasks_per_suite": int(v["tasks_per_suite"]) if v.get("tasks_per_suite") else None,
        "config_path": (cfg["eval"].get("libero") or {}).get("config_path"),
    }


def libero_vqa_dir(cfg: dict) -> Path:
    """The question set's folder: {root}/vqa/libero/{hash of what it is made from}."""
    return layout(cfg).libero_vqa() / stable_hash_of(libero_vqa_params(cfg) or {})


def model_path(cfg: dict, own: bool = False) -> str:
    """Where the base model is loaded from: built here (tiny: the model job's output folder) or
    path/hub id (openvla). `own`: for the model job itself (its output path is filled in later)."""
    from .io import OUT_TAG

    m = cfg["model"]
    if m["backend"] == "tiny" and not m.get("path"):
        return OUT_TAG if own else job_output(cfg, "model", m["base"])
    return str(m["path"])


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


# ----------------------------------------------------------------------------- code hashes

# A stage's code = what its entry module imports, transitively (vlaforget.codedeps), hashed without
# comments and docstrings; it goes into the stage config (`code`), since Snakemake's code trigger
# sees only the rule body: editing that code reruns the stage. Optional parts count only for the
# jobs that use them: a method plug-in (train/plugins/<name>.py) for the runs that enable it, the
# periodic evaluation (eval/) for runs whose early stopping it drives.
STAGES_WITH_CODE = (
    "demos",
    "libero_fixture",
    "cache",
    "model",
    "probe",
    "icsm",
    "craft_anchors",
    "train",
    "eval",
    "forgetting",
    "libero_vqa",
    "vqa_convert",
    "export",
    "table",
    "figures",
)
OPTIONAL_CODE: dict[str, dict[str, str]] = {"train": {"periodic_eval": "vlaforget.eval.closed_loop"}}
# Plumbing that records and compares ids, never what a stage computes: not followed from an entry.
CODE_EXCLUDED = ("vlaforget.freshness", "vlaforget.codedeps")


def optional_code(stage: str) -> dict[str, str]:
    """name -> module of the optional parts of a stage's code (train: each plug-in, periodic eval)."""
    out = dict(OPTIONAL_CODE.get(stage, {}))
    if stage == "train":
        for f in sorted((PKG_DIR / "train" / "plugins").glob("*.py")):
            if f.stem != "__init__":
                out[f.stem] = f"vlaforget.train.plugins.{f.stem}"
    return out


def code_modules(stage: str, enabled=()) -> list[str]:
    """The vlaforget modules a stage job's output depends on: the closure of its entry module's
    imports, without the optional parts, plus the closure of each enabled optional part."""
    from . import codedeps

    if stage == "report":  # older rule files: table and figures together
        return sorted(set(code_modules("table")) | set(code_modules("figures")))
    opt = optional_code(stage)
    unknown = set(enabled) - set(opt)
    if unknown:
        raise ConfigError(f"stage {stage}: no optional code named {sorted(unknown)} (known: {sorted(opt)})")
    stop = set(opt.values()) | set(CODE_EXCLUDED)
    mods = codedeps.closure(PKG_DIR, [codedeps.stage_entry(PKG_DIR, stage)], stop=stop)
    for name in enabled:
        mods |= codedeps.closure(PKG_DIR, [opt[name]], stop=stop - {opt[name]})
    return sorted(mods)


_CODE_HASHES: dict = {}


def _stats(files) -> tuple:
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def _code(stage: str, enabled) -> tuple[str, dict]:
    from . import codedeps

    enabled = tuple(sorted(enabled))
    # memoised on the files it read (stage configs ask for it once per input of every job): an edit
    # of one of them, or a new stages/<stage>.py or plug-in module, recomputes it
    key = (stage, enabled, str(PKG_DIR))
    probe = [PKG_DIR / "stages" / f"{stage}.py", PKG_DIR / "cli.py"]
    plugin_dir = PKG_DIR / "train" / "plugins"
    listing = tuple(sorted(p.name for p in plugin_dir.glob("*.py"))) if stage == "train" else ()
    hit = _CODE_HASHES.get(key)
    if hit is not None and hit[0] == listing and hit[1] == _stats(probe + hit[2]):
        return hit[3]
    mods = code_modules(stage, enabled)
    files = [codedeps.module_file(PKG_DIR, m) for m in mods]
    files = [f for f in files if f is not None]
    val = (codedeps.hash_modules(PKG_DIR, mods), codedeps.module_hashes(PKG_DIR, mods))
    _CODE_HASHES[key] = (listing, _stats(probe + files), files, val)
    return val


def code_hash(stage: str, enabled=()) -> str:
    """Hash of a stage's code (code_modules) without comments and docstrings."""
    return _code(stage, enabled)[0]


def code_files(stage: str, enabled=()) -> dict[str, str]:
    """{file: hash} behind code_hash: recorded in the stage config so a dry-run can name the file
    whose edit reruns a job (freshness.config_changes names them); not part of the id (`code` covers it)."""
    return dict(_code(stage, enabled)[1])


def train_code_parts(sc: dict) -> list[str]:
    """The optional code a train job runs: its enabled plug-ins, and the periodic evaluation when
    its result can change the run (early stopping)."""
    parts = [k for k, v in (sc.get("method") or {}).items() if isinstance(v, dict) and v.get("enabled")]
    if periodic_eval_matters(sc.get("train") or {}):
        parts.append("periodic_eval")
    return parts


# What an id covers (NON_SEMANTIC, semantic_view, ...) lives in the base layer (semantics.py: io and
# freshness read it); re-exported here, where the study config's keys are.
from .semantics import (  # noqa: F401 (re-exported)
    NON_SEMANTIC,
    PERIODIC_EVAL_KEYS,
    _drop,
    non_semantic_keys,
    periodic_eval_matters,
    semantic_view,
)


def max_steps_in_run_id(tcfg: dict) -> bool:
    """Whether the step target shapes the steps before it: a decaying LR schedule (cosine, linear)
    is planned over max_steps. With a constant one (after any warmup) a run trained to N is the
    first N steps of a run to M > N, so max_steps stays out of the run id and raising it continues
    the run from its checkpoint at N (train/loop.py)."""
    return tcfg.get("lr_schedule", TrainSettings.lr_schedule) != "constant"


def run_id_of(sc: dict, key: str) -> str:
    """A train job's run id: names the run and its checkpoints. Its config id without the data
    root (io.config_id), without the non-semantic keys and, where it cannot shape the steps before
    it, without max_steps."""
    body = sc if max_steps_in_run_id(sc["train"]) else {**sc, "train": _drop(sc["train"], "max_steps")}
    return f"{key}-{config_id_of(body)[:8]}"


# ----------------------------------------------------------------------------- stage configs


def _base(cfg: dict, stage: str) -> dict:
    code, files = _code(stage, ()) if stage != "train" else (None, None)  # train: per run (plug-ins)
    return {
        "stage": stage,
        "root": str(resolve_root(cfg)),
        "allowed_root": str(resolve_allowed_root(cfg)),
        "world": cfg["world"],
        "code": code,
        "code_files": dict(files) if files is not None else None,
    }


def model_cache_dir(cfg: dict) -> Path:
    """The HF hub cache a hub-id model.path is resolved in, in place: model.cache_dir (e.g. the
    user's existing /opt/data/private/openvla_icms/hf_cache), else {root}/hf_cache."""
    return Path(cfg["model"].get("cache_dir") or layout(cfg).hf_cache)


def _model_block(cfg: dict, own: bool = False) -> dict:
    """The teacher model block; `own`: the model stage's own (its built model is its output)."""
    m = cfg["model"]
    return {
        "backend": m["backend"],
        "base": m["base"],
        "path": model_path(cfg, own=own),
        "dtype": m.get("dtype") or DEFAULT_MODEL_DTYPE,
        "attn_implementation": m.get("attn_implementation"),
        "cache_dir": str(model_cache_dir(cfg)),
    }


def init_adapter_files(path: str | Path) -> dict[str, str]:
    """{file: sha256} of the adapter folder train.init_adapter names (in the run id), or a
    ConfigError naming the key and the fix."""
    from .io import adapter_hashes

    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise ConfigError(
            f"train.init_adapter = {p}: no PEFT adapter there (adapter_config.json missing); "
            "point it at the folder holding adapter_config.json and adapter_model.safetensors "
            "(the user's resume_adapter_dir), or set it to null"
        )
    files = adapter_hashes(p)
    if not any(f.startswith("adapter_model.") for f in files):
        raise ConfigError(
            f"train.init_adapter = {p} holds adapter_config.json but no adapter_model.safetensors "
            "/ .bin: copy the whole adapter folder"
        )
    return files


def _dataset_block(cfg: dict, dataset: str) -> dict:
    return {
        "name": dataset,
        "cache_dir": job_output(cfg, "cache", dataset),
        "tasks": dataset_tasks(cfg, dataset),
    }


# Where each stage job's outputs live: `{job_dir}/{config id}/` (a file `{config id}.json` for an
# eval), so two configurations never share a path (docs/DEVELOPMENT.md, "A result's identity is its
# path"). The folder names the job for a reader; only the id folder below it is ever written by a job.
def job_dir(cfg: dict, stage: str, key: str) -> Path:
    lay, base = layout(cfg), cfg["model"]["base"]
    if stage == "eval":
        run, suite = key.rsplit("@", 1)
        return lay.eval(run) / suite
    if stage == "forgetting":
        return lay.eval(key) / "forgetting"
    return {
        "demos": lambda: lay.rlds(key),
        "cache": lambda: lay.cache(key),
        "model": lambda: lay.model(key),
        "probe": lambda: lay.probe(base, key),
        "icsm": lambda: lay.icsm(base, key),
        "craft_anchors": lambda: lay.craft(base, key),
        "train": lambda: lay.run(key),
    }[stage]()


def job_output(cfg: dict, stage: str, key: str) -> str:
    """The output folder (eval / forgetting: file) of one stage job, id included."""
    sc = _stage_config_cached(cfg, stage, key)
    return sc.get("out_dir") or sc["out_file"]


def stage_config(cfg: dict, stage: str, key: str) -> dict:
    """The config file content of one stage job (see module doc). Its own output path is
    `job_dir(...)/{its config id}`; the paths of its inputs carry their ids the same way."""
    from .io import OUT_TAG

    out = _base(cfg, stage)
    d = cfg["data"]
    own = OUT_TAG  # the job's own output path, filled in once its id is known
    if stage == "demos":
        mw = d["metaworld"]
        out.update(
            dataset=key,
            tasks=mw["datasets"][key],
            instructions=mw.get("instructions") or {},
            camera=mw["camera"],
            render_size=mw["render_size"],
            max_steps=mw["max_steps"],
            episodes_per_task=mw["episodes_per_task"],
            seed=mw["seed"],
            workers=mw.get("workers", DemosStageSettings.workers),
            out_dir=own,
        )
    elif stage == "cache":
        out.update(
            dataset=key,
            rlds_dir=rlds_dir(cfg, key),
            image_size=d["image_size"],
            train_split=d.get("train_split", CacheStageSettings.train_split),
            heldout=d.get("heldout", CacheStageSettings.heldout),
            image_key=d.get("image_key", CacheStageSettings.image_key),
            state_key=d.get("state_key", CacheStageSettings.state_key),
            out_dir=own,
            # our Meta-World demos: the identity transform; other datasets: by name
            # (data/transforms.py DATASET_TRANSFORMS, openvla's per-dataset registry)
            transform="metaworld" if dataset_tasks(cfg, key) is not None else None,
        )
    elif stage == "model":
        out.update(model=_model_block(cfg, own=True), out_dir=own)
        if cfg["model"]["backend"] == "tiny":
            mw = d.get("metaworld") or {}
            out.update(
                tiny=cfg["model"]["tiny"],
                pretrain=cfg["model"]["pretrain"],
                upstream=_dataset_block(cfg, tiny_pretrain_dataset(cfg)),
                corpus_datasets=[_dataset_block(cfg, s) for s in tiny_corpus_datasets(cfg)],
                instructions=mw.get("instructions") or {},
            )
    elif stage == "probe":
        out.update(
            model=_model_block(cfg),
            dataset=_dataset_block(cfg, cfg["probe"]["dataset"]),
            n=cfg["probe"]["n"],
            seed=cfg["probe"].get("seed", ProbeStageSettings.seed),
            split=cfg["probe"].get("split", ProbeStageSettings.split),
            trained_suites=trained_suites(cfg),
            batch_size=cfg["probe"].get("batch_size", ProbeStageSettings.batch_size),
            out_dir=own,
        )
    elif stage == "icsm":
        out.update(
            model=_model_block(cfg),
            icsm=cfg["icsm"],
            probe_dir=job_output(cfg, "probe", probe_set_name(cfg)),
            out_dir=own,
        )
    elif stage == "craft_anchors":
        suite, shots, shots_seed = parse_anchor_set(key)
        out.update(
            model=_model_block(cfg),
            craft=cfg["craft"],
            dataset=_dataset_block(cfg, suite),
            shots=shots,
            shots_seed=shots_seed,
            seed=cfg.get("seed", CraftAnchorsStageSettings.seed),
            out_dir=own,
        )
    elif stage == "train":
        r = parse_run_name(key)
        mcfg = method_config(cfg, r["method"])
        needs = method_needs(mcfg)
        out.update(
            run_name=key,
            method_name=r["method"],
            suite=r["suite"],
            shots=parse_shots(r["shots"]),
            seed=r["seed"],
            model=_model_block(cfg),
            dataset=_dataset_block(cfg, r["suite"]),
            train=cfg["train"],
            method=mcfg,
            out_dir=own,
        )
        ps = probe_set_name(cfg)
        out["icsm_dir"] = job_output(cfg, "icsm", ps) if "icsm" in needs else None
        out["probe_dir"] = job_output(cfg, "probe", ps) if "probe" in needs else None
        out["craft_dir"] = (
            job_output(cfg, "craft_anchors", anchor_set(r["suite"], out["shots"], r["seed"]))
            if "craft" in needs
            else None
        )
        if "craft" in needs:
            out["craft_layer"] = cfg["craft"].get(
                "layer", CraftAnchorSettings.layer
            )  # checked against the anchor cache
        parts = train_code_parts(out)  # only the plug-ins (and periodic eval) this run uses
        code, files = _code("train", parts)
        out.update(code=code, code_files=dict(files))
        if cfg["train"].get("eval_every"):
            out["periodic_eval"] = eval_block(cfg, r["suite"])
        prev = chain_previous(cfg, key)
        if prev:  # a chain stage: continue training the previous stage's adapter (only then: run ids)
            out["init_adapter"] = str(Path(job_output(cfg, "train", prev)) / "final")
            if out["train"].get("init_adapter") or out["train"].get("init_step") is not None:
                # train.init_adapter / init_step start the chain's first stage only
                out["train"] = {**out["train"], "init_adapter": None, "init_step": None}
        elif cfg["train"].get("init_adapter"):  # the user's adapter: its files' hashes are in the run id
            out["init_adapter_files"] = init_adapter_files(cfg["train"]["init_adapter"])
    elif stage == "eval":
        run, suite = key.rsplit("@", 1)
        out.update(
            run_name=run,
            suite=suite,
            model=_model_block(cfg),
            adapter_dir=None if run == "teacher" else str(Path(job_output(cfg, "train", run)) / "final"),
            eval=eval_block(cfg, suite),
            out_file=own,
        )
    elif stage == "forgetting":
        f = cfg["eval"].get("forgetting", {})
        ps = probe_set_name(cfg)
        out.update(
            run_name=key,
            model=_model_block(cfg),
            adapter_dir=None if key == "teacher" else str(Path(job_output(cfg, "train", key)) / "final"),
            probe_dir=job_output(cfg, "probe", ps),
            icsm_dir=job_output(cfg, "icsm", ps),
            vqa_jsonl=f.get("vqa_jsonl")
            or (str(libero_vqa_dir(cfg) / "questions.jsonl") if f.get("libero_vqa") else None),
            vqa_categories=list(f.get("vqa_categories") or []),
            drift_samples=f.get("drift_samples", ForgettingSettings.drift_samples),
            craft_layer=(cfg.get("craft") or {}).get(
                "layer", CraftAnchorSettings.layer
            ),  # drift / CKA at CRaFT's layer
            vqa_datasets=[_dataset_block(cfg, s) for s in f.get("upstream_suites", [])]
            if cfg["world"] == "metaworld"
            else [],
            out_file=own,
        )
    else:
        raise ConfigError(f"unknown stage '{stage}'")
    out["inputs"] = stage_inputs(cfg, stage, key)
    return _place(out, job_dir(cfg, stage, key), key)


def _place(out: dict, where: Path, key: str) -> dict:
    """Put a stage config's outputs at `where/{its config id}`: the id is taken with its own output
    path written `{out}` (io.config_id), so filling the path in keeps the id."""
    from .io import OUT_TAG, config_id

    cid = config_id(out)
    path = str(where / (f"{cid}.json" if out.get("out_file") == OUT_TAG else cid))

    def fill(x):
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fill(v) for v in x]
        if isinstance(x, str) and (x == OUT_TAG or x.startswith(OUT_TAG + "/")):
            return path + x[len(OUT_TAG) :]
        return x

    out = fill(out)
    if out["stage"] == "train":
        # the run id names the run's checkpoints; the data root is factored out, so moving the root
        # keeps it (io.config_id). Checkpoints are shared by the configs of one run id (a constant-LR
        # run to N steps is the first N steps of one to M > N): raising max_steps continues the run.
        out["run_id"] = run_id_of(out, key)
        out["ckpt_dir"] = str(where / "checkpoints" / out["run_id"])
    return out


def stage_config_id(cfg: dict, stage: str, key: str) -> str:
    """The config id of one stage job (the last part of its output path)."""
    return config_id_of(_stage_config_cached(cfg, stage, key))


def config_id_of(sc: dict) -> str:
    from .io import config_id

    return config_id(sc)


def _upstream(cfg: dict, stage: str, key: str) -> list[tuple[str, str, str]]:
    """(input name, stage, key) of every stage output a stage job reads (mirrors the rules' inputs)."""
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
        return out + ([("train", "train", run)] if run != "teacher" else [])
    if stage == "forgetting":
        out = [("model", "model", base), ("probe", "probe", ps), ("icsm", "icsm", ps)]
        if key != "teacher":
            out.append(("train", "train", key))
        if meta:
            out += [
                (f"cache:{s}", "cache", s)
                for s in cfg["eval"].get("forgetting", {}).get("upstream_suites", [])
            ]
        return out
    return []


def stage_inputs(cfg: dict, stage: str, key: str) -> dict:
    """{input name: {file, id, rule}}: the completion file of each input and the config id it must
    record for this job (freshness.check_inputs compares them when the job starts)."""
    from .freshness import COMPLETION, completion_file

    out = {}
    for name, up_stage, up_key in _upstream(cfg, stage, key):
        sc = _stage_config_cached(cfg, up_stage, up_key)
        out[name] = {
            "file": str(completion_file(sc)),
            "id": config_id_of(sc),
            "rule": COMPLETION[up_stage][0],
        }
    return out


_SC_CACHE: dict = {}


def _stage_config_cached(cfg: dict, stage: str, key: str) -> dict:
    """stage_config memoised on the config's content (the DAG asks for the model's id per job)."""
    import os

    k = (
        stage,
        key,
        str(PKG_DIR),
        json.dumps(cfg, sort_keys=True, default=str),
        os.environ.get("VLAFORGET_ROOT"),
        os.environ.get("VLAFORGET_ALLOWED_ROOT"),
    )
    if k not in _SC_CACHE:
        if len(_SC_CACHE) > 4096:
            _SC_CACHE.clear()
        _SC_CACHE[k] = stage_config(cfg, stage, key)
    return _SC_CACHE[k]


def eval_block(cfg: dict, suite: str) -> dict:
    e = cfg["eval"]
    blk = {
        "suite": suite,
        "num_envs": e["num_envs"],
        "episodes_per_task": e["episodes_per_task"],
        "videos_per_task": e.get("videos_per_task", EvalSettings.videos_per_task),
        "center_crop": e.get("center_crop", EvalSettings.center_crop),
        "pipeline_groups": e.get("pipeline_groups", EvalSettings.pipeline_groups),
        "image_size": cfg["data"]["image_size"],
        "unnorm_dataset": suite,
        "stats_path": str(Path(job_output(cfg, "cache", suite)) / "dataset_statistics.json"),
    }
    if cfg["world"] == "metaworld":
        mw = cfg["data"]["metaworld"]
        blk.update(
            tasks=mw["datasets"][suite],
            camera=mw["camera"],
            render_size=mw["render_size"],
            instructions=mw.get("instructions") or {},
            **(e.get("metaworld") or {}),
        )
    else:
        blk.update(**(e.get("libero") or {}))
    return blk


def stable_hash_of(obj: Any) -> str:
    from .io import stable_hash

    return stable_hash(obj)


CONFIG_ID_RE = r"[0-9a-f]{12}"
# The current values of the keys an id leaves out (semantics.non_semantic_keys), as JSON: the workflow
# passes them to each job, so changing `train.log_every` neither rewrites a stage-config file nor
# reruns a job, and the next run of that job reads the new value.
NON_SEMANTIC_ENV = "VLAFORGET_NON_SEMANTIC"


def stage_config_text(sc: dict) -> str:
    """The stage-config file of one job: its content with the data root written `{root}`, so a copied
    or moved root is read where it now is (load_stage_config fills it in)."""
    from .io import relocatable

    body = {k: v for k, v in sc.items() if k != "root"}
    return yaml.safe_dump({**relocatable(body, sc["root"]), "root": "{root}"}, sort_keys=True)


def non_semantic_values(sc: dict) -> dict:
    """{dotted key: value} of sc's keys that its id leaves out (what NON_SEMANTIC_ENV carries)."""
    out = {}
    for dotted in non_semantic_keys(sc):
        node, ok = sc, True
        for p in dotted.split("."):
            if not isinstance(node, dict) or p not in node:
                ok = False
                break
            node = node[p]
        if ok:
            out[dotted] = node
    return out


def _root_of_config_file(path: Path) -> Path | None:
    """{root} of a stage-config file at {root}/configs/{stage}/{key}/{id}.yaml (None: elsewhere)."""
    p = path.absolute()
    if re.fullmatch(CONFIG_ID_RE, p.stem) and len(p.parents) > 3 and p.parents[2].name == "configs":
        return p.parents[3]
    return None


def load_stage_config(path: str | Path, stage: str | None = None) -> dict:
    """Read a stage config file, re-check the path policy (a hand-edited file could escape) and, for
    a file the workflow wrote (`{root}/configs/{stage}/{key}/{id}.yaml`), refuse unless its content
    has the id its name says: a job only ever writes the output of the config its driver named."""
    from .io import config_id, fill_root

    path = Path(path)
    sc = load_yaml(path)
    if not isinstance(sc, dict):
        raise ConfigError(f"{path} is not a stage config (not a mapping)")
    if stage and sc.get("stage") != stage:
        raise ConfigError(f"{path} is a '{sc.get('stage')}' stage config, not '{stage}'")
    if sc.get("root") == "{root}":
        root = _root_of_config_file(path) or (
            Path(os.environ["VLAFORGET_ROOT"]) if os.environ.get("VLAFORGET_ROOT") else None
        )
        if root is None:
            raise ConfigError(
                f"{path} writes the data root as {{root}} but lies outside {{root}}/configs/: "
                "set VLAFORGET_ROOT to the data root it belongs to"
            )
        sc = fill_root(sc, str(root))
    for dotted, value in json.loads(os.environ.get(NON_SEMANTIC_ENV) or "{}").items():
        if dotted in non_semantic_values(sc):  # only keys outside the id
            node = sc
            parts = dotted.split(".")
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = value
    if re.fullmatch(CONFIG_ID_RE, path.stem):
        got = config_id(sc)
        if got != path.stem:
            raise ConfigError(
                f"{path} holds a config of id {got}, not the id {path.stem} its name says (edited by hand, or "
                f"written by another version of the code): refusing to run it. Delete the file; the workflow "
                f"writes it anew (rule stage_config)."
            )
    allowed = Path(sc.get("allowed_root", "/opt/data/private"))
    for k in ("root", "out_dir", "out_file"):
        if sc.get(k):
            try:
                check_under(sc[k], allowed, k)
            except PathPolicyError as e:
                raise ConfigError(str(e)) from e
    return sc
