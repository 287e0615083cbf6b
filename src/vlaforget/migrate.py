"""`vlaforget migrate-root`: move the outputs of a data root laid out by name (runs/{run}/,
evals/{run}/{suite}.json, configs/{stage}/{key}.yaml: before issue 29) to the layout where each
output's path holds its config id (runs/{run}/{id}/, ...), once, without recomputing anything.

A job's old output is moved only when (1) it records the id of the old stage-config file beside it
(it was made for that file), (2) that file asks for what the current study config asks for (the
same keys, code hash and inputs; only where things lie may differ) and (3) every input it read was
moved the same way. Everything else stays where it is and is rebuilt beside it by the workflow.
This is the single entry point for re-addressing a root: a change of how ids are computed (issue 30,
the code hash) adds its rule here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from .io import relocatable, stable_hash

log = logging.getLogger("vlaforget")

# the keys of a stage config that said where it ran, before ids named paths
LEGACY_LOCATION_KEYS = ("root", "allowed_root", "run_id", "config_id")
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def legacy_config_id(sc: dict) -> str:
    """The id an old stage-config file had (io.config_id before outputs were named by it)."""
    from .semantics import semantic_view

    body = semantic_view({k: v for k, v in sc.items() if k not in LEGACY_LOCATION_KEYS})
    return stable_hash(relocatable(body, sc.get("root"), sc.get("allowed_root")), n=12)


def legacy_paths(root: Path, sc: dict, stage: str, key: str) -> tuple[Path, Path, Path]:
    """(old stage-config file, old output (folder or file), old completion file) of one job."""
    from .freshness import COMPLETION

    new_out = Path(sc.get("out_dir") or sc["out_file"])
    if stage == "eval":
        old_out = new_out.parent.parent / f"{new_out.parent.name}.json"  # evals/{run}/{suite}.json
    elif stage == "forgetting":
        old_out = new_out.parent.parent / "forgetting.json"
    else:
        old_out = new_out.parent  # runs/{run}, datasets/cache/{d}, ...: the folder the id folder is in
    rel = COMPLETION[stage][1]
    return root / "configs" / stage / f"{key}.yaml", old_out, old_out if rel is None else old_out / rel


def _legacy_recorded_id(completion: Path) -> str | None:
    side = completion.parent / f".{completion.name}.config_id"
    try:
        if side.exists():
            rec = json.loads(side.read_text())
            if rec.get("size") in (None, completion.stat().st_size):
                return str(rec["config_id"])
        if completion.suffix == ".json":
            rec = json.loads(completion.read_text())
            return str(rec.get("config_id")) if isinstance(rec, dict) and rec.get("config_id") else None
    except (ValueError, KeyError, OSError):
        return None
    return None


def _shape(sc: dict) -> dict:
    """What a stage config asks for, without where things lie (paths under the root, ids of inputs)."""
    from .io import LOCATION_KEYS
    from .semantics import semantic_view

    body = semantic_view({k: v for k, v in sc.items() if k not in set(LOCATION_KEYS) | {"inputs", "code"}})
    root = str(sc.get("root", "")).rstrip("/")

    def sub(x):
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [sub(v) for v in x]
        if isinstance(x, str) and root and (x == root or x.startswith(root + "/")):
            return "<under the root>"
        return x

    return {**sub(body), "inputs": sorted((sc.get("inputs") or {}).keys())}


# Library files whose change with issue 29 moved where outputs live, not what they contain: a
# difference in these alone does not keep an old output from moving. (The root must have been made
# by the code just before this layout; a later change of these files that changes results would not
# be seen.) Issue 30's change of how code is hashed is recognised file by file (_code_changes).
ADDRESSING_FILES = (
    "config.py",
    "paths.py",
    "io.py",
    "study.py",
    "stageconfig.py",  # split from config.py (issue 30): stage-config assembly, moved as it was
    "stagefile.py",  # split from config.py (issue 30): load_stage_config, moved as it was
    "semantics.py",
    "cli.py",
    "migrate.py",
    "report/tables.py",
    "report/figures.py",
    "stages/eval.py",
    "stages/table.py",
    "stages/figures.py",
    "train/loop.py",
)


_VERSIONS = None


def _code_changes(old: dict, new: dict) -> list[str]:
    """Library files whose code differs between an old stage config and the current one (beyond
    ADDRESSING_FILES, and beyond the change of code hashes of issue 30: a file recorded with its old
    text hash counts as unchanged when a version of it with that hash has today's syntax tree,
    restamp.formatting_only); ['code'] when the old one records no per-file hashes. A file only the
    old one records (today's stage no longer imports it) does not count by itself: it left the import
    closure through an edit of a file that imported it, which counts unless that file is one of
    ADDRESSING_FILES (config.py, whose split by issue 30 took validation.py and what it imports out
    of every stage's code)."""
    global _VERSIONS
    if old.get("code") == new.get("code"):
        return []
    fa, fb = old.get("code_files") or {}, new.get("code_files") or {}
    if not fa:
        return ["code (the old stage config records no files)"]
    from .codedeps import PKG_DIR
    from .restamp import Versions, formatting_only

    if _VERSIONS is None or _VERSIONS.pkg_dir != Path(PKG_DIR):
        _VERSIONS = Versions(Path(PKG_DIR))
    return sorted(
        f
        for f in set(fa) | set(fb)
        if fa.get(f) != fb.get(f)
        and f in fb
        and f not in ADDRESSING_FILES
        and not (f in fa and f in fb and formatting_only(f, fa[f], fb[f], _VERSIONS))
    )


def _move(src: Path, dst: Path) -> None:
    """Rename src to dst; dst may lie inside src (runs/{run} -> runs/{run}/{id})."""
    if str(dst).startswith(str(src) + "/"):
        tmp = src.with_name(f".{src.name}.migrating")
        os.rename(src, tmp)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)


def migrate(cfg: dict, dry_run: bool = False) -> dict[str, list[str]]:
    """Move every job of the study config whose old output matches it; returns {moved, kept, absent}."""
    from . import freshness
    from .paths import resolve_root
    from .stageconfig import stage_configs
    from .stagefile import stage_config_text

    root = resolve_root(cfg)
    done: dict[tuple[str, str], bool] = {}
    report: dict[str, list[str]] = {"moved": [], "kept": [], "absent": [], "already": []}
    scs = stage_configs(cfg)
    for (stage, key), sc in scs.items():
        name = f"{stage} {key}"
        new_comp = freshness.completion_file(sc)
        if new_comp.exists():
            done[(stage, key)] = True
            report["already"].append(name)
            continue
        old_cfg, old_out, old_comp = legacy_paths(root, sc, stage, key)
        if not (old_cfg.exists() and old_comp.exists()):
            report["absent"].append(name)
            continue
        old = yaml.safe_load(old_cfg.read_text()) or {}
        why = None
        if _legacy_recorded_id(old_comp) != legacy_config_id(old):
            why = f"{old_comp} was not made for {old_cfg}"
        elif _shape(relocatable(old, old.get("root")) | {"root": "{root}"}) != _shape(
            relocatable(sc, sc.get("root")) | {"root": "{root}"}
        ):
            why = "made for another config: " + freshness.config_changes(old, sc)
        elif _code_changes(old, sc):
            why = "its code changed: " + ", ".join(_code_changes(old, sc)[:6])
        else:
            ups = [(i["rule"], i["file"]) for i in (sc.get("inputs") or {}).values()]
            missing = [f for _, f in ups if not Path(f).exists() and not dry_run]
            if missing:
                why = f"its input {missing[0]} was not migrated"
        if why:
            report["kept"].append(f"{name}: {why}")
            continue
        report["moved"].append(f"{name}: {old_out} -> {sc.get('out_dir') or sc['out_file']}")
        if dry_run:
            continue
        cfg_mtime = old_cfg.stat().st_mtime_ns
        new_out = Path(sc.get("out_dir") or sc["out_file"])
        _move(old_out, new_out)
        if stage == "train" and old.get("run_id"):  # checkpoints: shared by the configs of one run id
            ck = new_out / "checkpoints" / str(old["run_id"])
            if ck.is_dir() and not Path(sc["ckpt_dir"]).exists():
                _move(ck, Path(sc["ckpt_dir"]))
        st = new_comp.stat()
        freshness.stamp(sc)  # the new id, in the completion file or its sidecar
        os.utime(new_comp, ns=(st.st_atime_ns, st.st_mtime_ns))  # downstream outputs stay newer
        new_cfg = root / "configs" / stage / key / f"{freshness.config_id(sc)}.yaml"
        new_cfg.parent.mkdir(parents=True, exist_ok=True)
        new_cfg.write_text(stage_config_text(sc))
        os.utime(new_cfg, ns=(cfg_mtime, min(cfg_mtime, st.st_mtime_ns)))
        os.replace(old_cfg, old_cfg.with_suffix(".yaml.migrated"))
        cid = freshness.config_id(sc)
        for kind in ("benchmarks", "logs"):
            ext = "tsv" if kind == "benchmarks" else "log"
            old_f, new_f = root / kind / stage / f"{key}.{ext}", root / kind / stage / key / f"{cid}.{ext}"
            new_f.parent.mkdir(parents=True, exist_ok=True)
            if old_f.exists():
                os.replace(old_f, new_f)
            elif kind == "benchmarks" and stage in BENCH_STAGES:  # not measured: NA, so nothing reruns for it
                new_f.write_text(BENCH_HEADER + "\t".join(["NA"] * BENCH_HEADER.count("\t")) + "\tNA\n")
        done[(stage, key)] = True
    return report


BENCH_STAGES = ("model", "probe", "icsm", "craft_anchors", "train", "eval", "forgetting")


def add_args(p):
    p.add_argument(
        "--configfile",
        nargs="+",
        required=True,
        help="the study config files the root was made with (as given to snakemake)",
    )
    p.add_argument("--dry-run", "-n", action="store_true", help="say what would move; move nothing")


def main(args) -> int:
    from .config import load_config

    cfg = load_config(*args.configfile)
    rep = migrate(cfg, dry_run=args.dry_run)
    verb = "would move" if args.dry_run else "moved"
    for line in rep["moved"]:
        print(f"{verb}: {line}")
    for line in rep["kept"]:
        print(f"left in place (rebuilt beside it): {line}")
    print(
        f"vlaforget migrate-root: {len(rep['moved'])} job(s) {verb}, {len(rep['kept'])} left in place, "
        f"{len(rep['already'])} already in the new layout, {len(rep['absent'])} not on this root"
    )
    return 0
