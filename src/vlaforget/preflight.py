"""`vlaforget preflight`: every missing piece of a real-study run, in one message, before any GPU job.

    vlaforget preflight --configfile config/config.yaml [config/profile_4090.yaml ...]

Run by the workflow's onstart (world: libero) in the jobs' Python (`job_python`), so it checks the
environment the rules will run in. It takes a few seconds and checks, for the configured study:

* the model (backend openvla): the folder (local path, or the hub id in the HF cache `model.cache_dir`,
  default `{root}/hf_cache`, read in place, offline), its
  config.json, weights, tokenizer files, the remote-code files named in `auto_map` and that they
  import (transformers 4.40.x, tokenizers 0.19.x, timm 0.9.10-0.9.16, torchvision), `norm_stats`,
  and which suites have an unnorm key in it;
* each suite's RLDS builder dir `{data.rlds_dir}/{suite}/{version}/` (dataset_info.json, features.json,
  tfrecord shards);
* LIBERO: importable, its scene assets verified file by file against the hash manifest, its config;
  MuJoCo within the validated 3.3.0-3.3.2 (newer ones render and settle LIBERO differently);
* the VQA set (`eval.forgetting.vqa_jsonl`) if configured;
* the data root is writable.

Exit 0 = ready; 1 = the message lists each problem with its fix. Notes (not problems) are printed too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TRANSFORMERS_PIN = "4.40.1"
TOKENIZERS_PIN = "0.19.1"
TIMM_RANGE = ("0.9.10", "0.9.16")
# MuJoCo versions LIBERO renders and settles as when its data and openvla's published numbers were made:
# 3.3.0 is the project's pin (make real-env), 3.3.2 LIBERO's own fix (LIBERO #88, PR #140). From 3.3.3
# the floors render darker (openvla-7b-finetuned-libero-object 88.4 % -> ~69 %, openvla #282, #335);
# from 3.4.0 libero_spatial task 5's initial states have not settled after the 10 wait steps (the bowl
# slides off the ramekin's rim instead of resting on it: tests/test_libero_env.py measures both).
MUJOCO_RANGE = ("3.3.0", "3.3.2")
MUJOCO_FIX = "pip install mujoco==3.3.0 in the jobs' env (make real-env pins it)"
STACK_FIX = (
    "make real-env (README 'The real study'), or in your own env: pip install transformers==4.40.1 "
    "tokenizers==0.19.1 timm==0.9.16 peft==0.11.1 and the torchvision matching your torch"
)
TOKENIZER_FILES = ("tokenizer_config.json",)
TOKENIZER_MODEL = ("tokenizer.model", "tokenizer.json")


@dataclass
class Report:
    problems: list[tuple[str, str]] = field(default_factory=list)  # (what is missing, the fix)
    notes: list[str] = field(default_factory=list)

    def problem(self, what: str, fix: str) -> None:
        self.problems.append((what, fix))

    def message(self) -> str:
        lines = []
        if self.problems:
            lines.append(f"preflight: {len(self.problems)} problem(s); nothing was run:")
            for i, (what, fix) in enumerate(self.problems, 1):
                lines.append(f"  {i}. {what}\n     fix: {fix}")
        else:
            lines.append("preflight: ready")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- the OpenVLA stack


def check_stack(rep: Report) -> bool:
    """transformers / tokenizers / timm / torchvision as openvla's remote code needs them. True = usable."""
    ok = True
    tv = _version("transformers")
    if tv is None:
        rep.problem("transformers is not installed in this Python", STACK_FIX)
        return False
    try:
        from transformers import AutoModelForVision2Seq  # noqa: F401
    except ImportError:
        rep.problem(
            f"transformers {tv} has no AutoModelForVision2Seq (removed in transformers 5), which openvla's "
            f"remote code is loaded with (the probe stage would fail with ImportError)",
            STACK_FIX,
        )
        ok = False
    else:
        if not tv.startswith("4.40."):
            rep.notes.append(f"transformers {tv}: openvla's code is tested with {TRANSFORMERS_PIN}")
    tok = _version("tokenizers")
    if tok and not tok.startswith("0.19."):
        rep.notes.append(f"tokenizers {tok}: openvla pins {TOKENIZERS_PIN}")
    timm_v = _version("timm")
    if timm_v is None:
        rep.problem("timm is not installed (openvla's vision backbone is built with timm)", STACK_FIX)
        return False
    if not (_vtuple(TIMM_RANGE[0]) <= _vtuple(timm_v) <= _vtuple(TIMM_RANGE[1])):
        rep.problem(
            f"timm {timm_v} is outside {TIMM_RANGE[0]}-{TIMM_RANGE[1]} (openvla's remote code)", STACK_FIX
        )
        ok = False
    try:
        import timm  # noqa: F401  (imports torchvision)
    except Exception as e:  # noqa: BLE001 - torchvision's op registration raises RuntimeError, not ImportError
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        fix = STACK_FIX
        if "torchvision" in msg or "nms" in msg:
            fix = (
                "torchvision is missing or does not match torch (e.g. PyPI's CUDA torchvision next to a "
                "CPU torch, which make real-env removes): "
                "install the pair from one index, e.g. make real-env TORCH_SPEC='torch==2.2.0' "
                "TORCH_INDEX=https://download.pytorch.org/whl/cu121"
            )
        rep.problem(f"import timm fails: {type(e).__name__}: {msg}", fix)
        ok = False
    return ok


def import_remote_code(model_dir: Path, files: list[str]) -> None:
    """Import the model folder's modelling files as a package (their relative imports work)."""
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "vlaforget_preflight_remote"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        for f in files:
            (pkg / f).write_bytes((model_dir / f).read_bytes())
        sys.path.insert(0, tmp)
        try:
            for f in files:
                importlib.import_module(f"vlaforget_preflight_remote.{Path(f).stem}")
        finally:
            sys.path.remove(tmp)
            for k in [k for k in sys.modules if k.startswith("vlaforget_preflight_remote")]:
                del sys.modules[k]


def check_openvla_model(cfg: dict, rep: Report, stack_ok: bool) -> None:
    from .models.openvla import OpenVLAUnavailable, check_remote_code, resolve_model_path
    from .stageconfig import model_cache_dir

    m = cfg["model"]
    cache_dir = str(model_cache_dir(cfg))  # model.cache_dir (read in place), else {root}/hf_cache
    try:
        path = resolve_model_path(str(m["path"]), cache_dir)
    except OpenVLAUnavailable as e:
        msg = str(e)
        if " Fix: " in msg:
            rep.problem(f"model folder: {msg.split(' Fix: ')[0]}", msg.split(" Fix: ")[-1])
        else:
            rep.problem(
                f"model folder: {msg}",
                f"huggingface-cli download openvla/openvla-7b --local-dir {m['path']} (all files, incl. "
                "the *_prismatic.py modelling code), or set model.path",
            )
        return
    rep.notes.append(f"model: {m['path']} read in place from {path}")
    try:
        info = check_remote_code(path)
    except (OSError, ValueError) as e:
        rep.problem(f"model folder {path}: config.json unreadable ({e})", "download the model again")
        return
    if not info["weight_files"]:
        rep.problem(
            f"model folder {path} holds no *.safetensors / *.bin weights",
            f"the download is incomplete: huggingface-cli download {m['path']} --cache-dir {cache_dir}",
        )
    if not all((path / f).exists() for f in TOKENIZER_FILES) or not any(
        (path / f).exists() for f in TOKENIZER_MODEL
    ):
        rep.problem(
            f"model folder {path} lacks tokenizer files ({', '.join(TOKENIZER_FILES + TOKENIZER_MODEL)})",
            "download the full repository (not only the weights)",
        )
    if not info["code_files"]:
        rep.problem(
            f"{path}/config.json has no auto_map (openvla's remote code)",
            "use openvla's HF repository layout (config.json with auto_map and *_prismatic.py)",
        )
    elif info["missing_code_files"]:
        rep.problem(
            f"model folder {path} lacks the remote-code files {info['missing_code_files']} named in auto_map",
            "download the full repository (not only the weights)",
        )
    elif stack_ok:
        try:
            import_remote_code(path, info["code_files"])
        except Exception as e:  # noqa: BLE001 - any failure is reported, with its fix
            rep.problem(
                f"openvla's remote code in {path} fails to import: {type(e).__name__}: {e}", STACK_FIX
            )
    keys = info["norm_stats_keys"]
    if not keys:
        rep.problem(
            f"{path}/config.json has no norm_stats (openvla's predict_action un-normalises with them)",
            "use an openvla checkpoint with norm_stats in config.json",
        )
    else:
        from .study import suites_all

        have = [s for s in suites_all(cfg) if s in keys]
        rep.notes.append(
            f"norm_stats keys: {', '.join(keys)}; suites with an unnorm key there: {', '.join(have) or 'none'} "
            "(the others are un-normalised with their own statistics from the cache stage)"
        )


# ----------------------------------------------------------------------------- data, LIBERO, VQA

VERSION_RE = re.compile(r"\d+\.\d+\.\d+")


def check_rlds(cfg: dict, rep: Report) -> None:
    from .study import suites_all

    if cfg["data"].get("fixture"):
        from .stageconfig import rlds_root

        rep.notes.append(f"data.fixture: the workflow writes LIBERO-format RLDS under {rlds_root(cfg)}")
        return
    root = Path(cfg["data"]["rlds_dir"])
    fix_all = (
        f"put openvla's modified_libero_rlds under data.rlds_dir = {root} "
        "(huggingface-cli download openvla/modified_libero_rlds --repo-type dataset --local-dir <that dir>), "
        "or set data.rlds_dir"
    )
    if not root.is_dir():
        rep.problem(f"data.rlds_dir {root} does not exist", fix_all)
        return
    datasets = list(suites_all(cfg))
    if cfg["model"]["backend"] == "tiny":  # the tiny teacher pretrains on model.pretrain.dataset
        from .study import tiny_pretrain_dataset

        datasets += [d for d in [tiny_pretrain_dataset(cfg)] if d not in datasets]
    for suite in datasets:
        d = root / suite
        versions = (
            sorted(
                (p for p in d.iterdir() if p.is_dir() and VERSION_RE.fullmatch(p.name)),
                key=lambda p: _vtuple(p.name),
            )
            if d.is_dir()
            else []
        )
        if not versions:
            rep.problem(
                f"no TFDS builder dir for suite '{suite}': expected {d}/<version>/ (e.g. 1.0.0)", fix_all
            )
            continue
        v = versions[-1]
        missing = [f for f in ("dataset_info.json", "features.json") if not (v / f).is_file()]
        shards = list(v.glob("*.tfrecord*"))
        if missing or not shards:
            what = ", ".join(missing + ([] if shards else ["*.tfrecord-* shards"]))
            rep.problem(
                f"RLDS builder dir {v} is incomplete: no {what}",
                f"copy the whole {suite}/{v.name}/ folder again",
            )


def check_libero(cfg: dict, rep: Report) -> None:
    from .envs import libero as L
    from .envs import libero_setup as S

    fix = "make real-env (installs LIBERO with verified assets into the jobs' env), or make libero"
    try:
        pkg = L.libero_package_dir()
    except L.LiberoUnavailable:
        rep.problem(f"LIBERO is not importable in the jobs' Python ({sys.executable})", fix)
        return
    assets = pkg / "assets"
    problems = S.verify_tree(assets, S.read_manifest(S.DEFAULT_MANIFEST)) if assets.is_dir() else ["missing"]
    if problems:
        rep.problem(
            f"LIBERO scene assets at {assets} do not match the hash manifest "
            f"({len(problems)} file(s), e.g. {problems[0]})",
            fix,
        )
        return
    try:
        L.import_libero((cfg["eval"].get("libero") or {}).get("config_path"))
    except Exception as e:  # noqa: BLE001 - any failure is reported, with its fix
        rep.problem(f"LIBERO fails to import: {type(e).__name__}: {e}", fix)


def check_mujoco(rep: Report) -> None:
    """MuJoCo inside MUJOCO_RANGE (the jobs' env; read from its metadata, nothing is imported)."""
    v = _version("mujoco")
    if v is None:
        rep.problem(f"mujoco is not installed in the jobs' Python ({sys.executable})", MUJOCO_FIX)
        return
    lo, hi = MUJOCO_RANGE
    if not (_vtuple(lo) <= _vtuple(v) <= _vtuple(hi)):
        why = (
            "renders LIBERO's floors darker than its training data (>= 3.3.3) and breaks libero_spatial "
            "task 5's initial states (>= 3.4.0)"
            if _vtuple(v) > _vtuple(hi)
            else "is older than validated"
        )
        rep.problem(
            f"mujoco {v} is outside the validated {lo}-{hi}: it {why}; success rates would not be "
            "comparable with the published ones",
            MUJOCO_FIX,
        )


def check_vqa(cfg: dict, rep: Report) -> None:
    path = (cfg["eval"].get("forgetting") or {}).get("vqa_jsonl")
    if not path:
        return
    p = Path(path)
    if not p.is_file():
        rep.problem(
            f"eval.forgetting.vqa_jsonl {p} does not exist",
            "point it at a JSONL of {image, question, answer} lines, or set it to null to skip",
        )
        return
    bad = []
    with p.open() as f:
        for i, line in enumerate(f):
            if i >= 20:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append(f"line {i + 1} is not JSON")
                continue
            img = row.get("image")
            if img and not (p.parent / img).exists() and not Path(img).exists():
                bad.append(f"line {i + 1}: image {img} missing")
    if bad:
        rep.problem(f"eval.forgetting.vqa_jsonl {p}: {'; '.join(bad[:3])}", "fix the file or its image paths")


def check_root(cfg: dict, rep: Report) -> None:
    from .paths import PathPolicyError, ensure_root, resolve_root

    try:
        ensure_root(resolve_root(cfg))
    except PathPolicyError as e:
        rep.problem(str(e).split(". ")[0], str(e))


def preflight(cfg: dict) -> Report:
    rep = Report()
    check_root(cfg, rep)
    if cfg["model"]["backend"] == "openvla":
        ok = check_stack(rep)
        check_openvla_model(cfg, rep, ok)
    if cfg["world"] == "libero":
        check_rlds(cfg, rep)
        check_mujoco(rep)
        check_libero(cfg, rep)
    check_vqa(cfg, rep)
    return rep


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", nargs="+", required=True, help="study config + overlays, in order")


def main(args) -> int:
    from .config import load_config

    t0 = time.time()
    cfg = load_config(*args.configfile)
    rep = preflight(cfg)
    print(rep.message() + f"\n  ({time.time() - t0:.1f} s, {sys.executable})", flush=True)
    return 1 if rep.problems else 0
