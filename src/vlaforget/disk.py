"""Disk safety (`vlaforget check-disk`): configured paths under the allowed root, no big files in the repo.

Runs at the start of every workflow run (Snakefile `onstart`) and by hand:
    vlaforget check-disk --configfile config/config.yaml [config/demo.yaml] [--scan DIR] [--limit-gb 1]
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .errors import UserError
from .paths import PathPolicyError, check_under, ensure_root, resolve_allowed_root, resolve_root

REPO_DIR = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "venv", ".snakemake", "__pycache__", ".pytest_cache", ".ruff_cache"}
MIN_FREE_GB = 20.0


def configured_paths(cfg: dict) -> dict[str, str]:
    """Every path the config points at that must live under the allowed root."""
    out = {"root": str(resolve_root(cfg))}
    data = cfg.get("data") or {}
    if data.get("rlds_dir"):
        out["data.rlds_dir"] = data["rlds_dir"]
    mpath = (cfg.get("model") or {}).get("path")
    if mpath and (str(mpath).startswith("/") or str(mpath).startswith(".")):
        out["model.path"] = mpath
    f = (cfg.get("eval") or {}).get("forgetting") or {}
    if f.get("vqa_jsonl"):
        out["eval.forgetting.vqa_jsonl"] = f["vqa_jsonl"]
    lib = (cfg.get("eval") or {}).get("libero") or {}
    if lib.get("config_path"):
        out["eval.libero.config_path"] = lib["config_path"]
    return out


def check_paths(cfg: dict) -> list[str]:
    """Problems with the data-root policy, one message (cause + fix) each."""
    allowed = resolve_allowed_root(cfg)
    problems = []
    for key, path in configured_paths(cfg).items():
        try:
            check_under(path, allowed, key)
        except PathPolicyError as e:
            problems.append(str(e))
    return problems


def scan_large_files(directory: str | Path, limit_bytes: int, skip=SKIP_DIRS) -> list[tuple[Path, int]]:
    """Files over limit_bytes under directory (not following links, skipping venvs and VCS dirs)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            if p.is_symlink():
                continue
            if st.st_size > limit_bytes:
                found.append((p, st.st_size))
    return sorted(found, key=lambda t: -t[1])


def free_gb(path: str | Path) -> float:
    """Free space of the file system holding path (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 1e9


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def full_disk_message(e: OSError, stage_config: str | None = None) -> str:
    """One message for a write that found the disk full: the path, the free space, what it needs.
    What it needs: the size of the largest file already in the job's output folder (a checkpoint,
    a cache shard: the next one is as large), else MIN_FREE_GB."""
    where = Path(e.filename) if e.filename else None
    out_dir = None
    if stage_config:
        try:
            from .stagefile import load_stage_config

            sc = load_stage_config(stage_config)
            out_dir = Path(sc.get("out_dir") or Path(sc["out_file"]).parent)
        except (OSError, ValueError, KeyError, TypeError, UserError):  # the message itself never fails
            out_dir = None
    where = where or out_dir or Path.cwd()
    probe = where if where.exists() else next((p for p in where.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    sizes = [
        f.stat().st_size for f in (out_dir.rglob("*") if out_dir and out_dir.is_dir() else []) if f.is_file()
    ]
    need = (
        f"about {_gb(max(sizes))} more (the largest file it has written so far)"
        if sizes
        else f"at least {MIN_FREE_GB:g} GB free (a 7B run: ~100 GB)"
    )
    return (
        f"the disk holding {where} is full ({e.strerror or 'no space left on device'}): {_gb(free)} free, "
        f"this job needs {need}. Free space on that disk or point VLAFORGET_ROOT at a larger one, then "
        f"rerun: a training run resumes from its last checkpoint."
    )


def escaping_links(root: Path, allowed: Path, limit: int = 5) -> list[str]:
    """Symlinks below the data root that point outside the allowed root: every job would write
    through them off the data disk, so the workflow refuses them before any job (not in the job
    that first follows one). Walks without following links."""
    from .paths import is_within

    out = []
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d) / name
            if p.is_symlink() and not is_within(p, allowed):
                out.append(
                    f"{p} is a symlink to {os.path.realpath(p)}, outside the allowed root {allowed}: "
                    f"move that data under {allowed} and link it from there, or remove the link"
                )
                if len(out) >= limit:
                    return out
    return out


def report(
    cfg: dict,
    scan_dir: str | Path | None = None,
    limit_gb: float = 1.0,
    create_root: bool = True,
    out=sys.stderr,
) -> dict:
    """Run every check, print findings, return {ok, problems, large_files, free_gb, root}."""
    root = resolve_root(cfg)
    problems = check_paths(cfg)
    if not problems and create_root:
        try:
            ensure_root(root)
        except PathPolicyError as e:
            problems.append(str(e))
        except OSError as e:
            problems.append(
                f"cannot create the data root {root} ({e.strerror or e}). Point the pipeline at "
                f"a writable folder under the allowed root: VLAFORGET_ROOT="
                f"{resolve_allowed_root(cfg)}/<you>/vlaforget or `root:` in your config."
            )
    if not problems and root.is_dir():
        problems += escaping_links(root, resolve_allowed_root(cfg))
    scan_dir = Path(scan_dir) if scan_dir else REPO_DIR
    large = scan_large_files(scan_dir, int(limit_gb * 1e9)) if scan_dir.exists() else []
    free = free_gb(root)

    print(
        f"[check-disk] root = {root} (allowed root {resolve_allowed_root(cfg)}), free {free:.1f} GB", file=out
    )
    for msg in problems:
        print(f"[check-disk] ERROR: {msg}", file=out)
    if large:
        print(
            f"[check-disk] WARNING: {len(large)} file(s) over {limit_gb:g} GB in {scan_dir} "
            f"(only code, configs, docs and small results belong there):",
            file=out,
        )
        for p, size in large:
            print(
                f"    {_gb(size):>10}  {p}\n"
                f"                move it under the data root, e.g.: mv '{p}' '{root / 'tmp'}/' "
                f"(models -> {root / 'models'}, datasets -> {root / 'datasets'}, "
                f"checkpoints -> {root / 'runs'})",
                file=out,
            )
    if free < MIN_FREE_GB:
        print(
            f"[check-disk] WARNING: only {free:.1f} GB free under {root}; a 7B run needs ~100 GB "
            f"(checkpoints, caches). Free space or point VLAFORGET_ROOT at a larger disk.",
            file=out,
        )
    if not problems and not large:
        print("[check-disk] OK", file=out)
    return {
        "ok": not problems,
        "problems": problems,
        "large_files": [(str(p), s) for p, s in large],
        "free_gb": free,
        "root": str(root),
    }


def workflow_check(cfg: dict, repo_dir: str | Path | None = None) -> bool:
    """The onstart check: policy violations and an uncreatable root fail; big repo files warn."""
    return report(cfg, scan_dir=repo_dir, create_root=True)["ok"]


def add_args(p) -> None:
    p.add_argument(
        "--configfile",
        nargs="+",
        default=["config/config.yaml"],
        help="study config files, later ones overlay earlier ones",
    )
    p.add_argument("--scan", default=None, help="directory to scan for large files (default: the repo)")
    p.add_argument("--limit-gb", type=float, default=1.0, help="size above which a file is reported")
    p.add_argument("--no-create", action="store_true", help="do not create the data root")


def main(args) -> int:
    from .config import ConfigError, deep_merge, load_yaml, validate

    cfg: dict = {}
    for path in args.configfile:
        cfg = deep_merge(cfg, load_yaml(path))
    valid = True
    try:
        validate(cfg)
    except (ConfigError, PathPolicyError) as e:
        valid = False
        if not isinstance(e, PathPolicyError):
            print(f"[check-disk] ERROR: {e}", file=sys.stderr)
    # report every path problem, not only the first one the validator hit
    r = report(cfg, scan_dir=args.scan, limit_gb=args.limit_gb, create_root=not args.no_create)
    return 0 if valid and r["ok"] and not r["large_files"] else 1
