"""The study config: load YAML files, merge overlays, validate (schema + semantic checks).

`load_config(*paths, overrides=)` is the entry: the merged, validated study config (a dict). Where
the rest lives: the study's names, methods, grid and job graph in study.py; each job's stage config
in stageconfig.py; the stage-config file (written by the workflow, read by a stage) in stagefile.py;
a stage's code hash in codedeps.py; config-time data checks in validation.py.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from .errors import ConfigError
from .paths import check_under, resolve_allowed_root, resolve_root
from .settings import ModelSettings
from .study import NAME_RE, all_method_names, check_initial_states, method_config, suites_all

__all__ = ["SCHEMA_PATH", "ConfigError", "deep_merge", "load_config", "load_yaml", "validate"]

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


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


# ----------------------------------------------------------------------------- validation


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
    check_initial_states(cfg)  # eval.initial_states: blocks that fit, no eval on a demo's seed
    from .validation import late_checks

    late_checks(cfg)
