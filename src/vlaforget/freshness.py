"""Never serve a stale result: every output records the id of the config it was made for.

A stage config's id (`io.config_id`) is a hash of its content with the data root factored out and
with the ids of the inputs it expects (`sc["inputs"]`, filled by stageconfig.stage_config). So:

- each stage, when it finishes, records its id in its completion file (`config_id` in done.json /
  manifest.json / meta.json / audit.json / the eval JSON; a sidecar `.<name>.config_id` for
  anchors.pt), written after the stage's own outputs (cli.py);
- each stage, when it starts, checks that every input it reads records the id it expects
  (`check_inputs`), and refuses with the file, both ids and the rule to rerun otherwise;
- every output lives at a path holding its id (stageconfig.stage_config), so Snakemake's own up-to-date
  logic reruns exactly what does not match, whatever `.snakemake` holds (a fresh clone, a second
  checkout on the same root, a deleted folder); nothing is rewritten or touched to force a rerun.

Moving or copying the data root keeps every id (paths are recorded relative to it), so nothing reruns.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from .errors import UserError
from .io import (
    CorruptInputError,
    atomic_write_text,
    config_id,
    fill_root,
    read_json,
    rebuild_hint,
    sha256_file,
    verify_files,
)

log = logging.getLogger("vlaforget")

# stage -> (rule name, completion file relative to out_dir; None = out_file itself)
COMPLETION = {
    "demos": ("demos", "done.json"),
    "cache": ("cache", "manifest.json"),
    "model": ("model", "done.json"),
    "probe": ("probe", "audit.json"),
    "icsm": ("icsm", "meta.json"),
    "craft_anchors": ("craft_anchors", "anchors.pt"),
    "train": ("train", "final/done.json"),
    "eval": ("eval", None),
    "forgetting": ("forgetting", None),
}


class StaleInputError(UserError, RuntimeError):
    """An input of a stage was made for another config."""


def completion_file(sc: dict) -> Path:
    rel = COMPLETION[sc["stage"]][1]
    return Path(sc["out_file"]) if rel is None else Path(sc["out_dir"]) / rel


def _sidecar(completion: Path) -> Path:
    return completion.parent / f".{completion.name}.config_id"


def _write_sidecar(completion: Path, cid: str, stage: str, **more) -> None:
    # the file's size and sha256, not its inode: a copied or moved root (cp -a, rsync, another disk)
    # keeps the record valid, a rewritten or corrupted file does not
    atomic_write_text(
        _sidecar(completion),
        json.dumps(
            {
                "config_id": cid,
                "stage": stage,
                "size": completion.stat().st_size,
                "sha256": sha256_file(completion),
                **more,
            }
        )
        + "\n",
    )


def recorded_id(completion: str | Path) -> str | None:
    """The config id an output records (None: none recorded, or the output is missing)."""
    completion = Path(completion)
    if not completion.exists():
        return None
    side = _sidecar(completion)
    if side.exists():
        try:
            rec = read_json(side)
            # valid for the very bytes it was written for, wherever the root now lies
            if rec.get("size") == completion.stat().st_size and rec.get("sha256") == sha256_file(completion):
                return str(rec["config_id"])
        except (ValueError, KeyError, OSError):
            pass
    if completion.suffix == ".json":
        try:
            rec = read_json(completion)
        except (ValueError, OSError):
            return None
        if isinstance(rec, dict) and rec.get("config_id"):
            return str(rec["config_id"])
    return None


def stamp(sc: dict) -> Path:
    """Record sc's id in its completion file (JSON) or beside it. Call after the stage succeeded."""
    comp = completion_file(sc)
    cid = config_id(sc)
    if comp.suffix == ".json" and comp.exists():
        rec = read_json(comp)
        if isinstance(rec, dict):
            if rec.get("config_id") != cid:
                rec["config_id"] = cid
                atomic_write_text(comp, json.dumps(rec, indent=2, sort_keys=True, default=str) + "\n")
            if _sidecar(comp).exists():
                os.unlink(_sidecar(comp))
            return comp
    _write_sidecar(comp, cid, sc["stage"])
    return comp


def check_inputs(sc: dict) -> None:
    """Refuse to run on inputs made for another config (or not finished)."""
    problems = []
    for name, inp in (sc.get("inputs") or {}).items():
        f, want, rule = Path(inp["file"]), inp["id"], inp["rule"]
        if not f.exists():
            problems.append(f"{name}: {f} does not exist: run the '{rule}' rule first")
            continue
        got = recorded_id(f)
        if got != want:
            what = f"was made for config id {got}" if got else "records no config id (older or interrupted)"
            problems.append(
                f"{name}: {f} {what}, but this {sc['stage']} job needs the output of '{rule}' for "
                f"config id {want}. The workflow reruns it on its next run (snakemake ... as before); "
                f"by hand: snakemake --forcerun {rule} ..., or `vlaforget {rule.replace('_', '-')} "
                f"--config <its stage config>`"
            )
    if problems:
        raise StaleInputError(
            f"{sc['stage']}: refusing to use inputs made for another config:\n  " + "\n  ".join(problems)
        )
    verify_inputs(sc)


# stages that read a cache's arrays (eval reads only its dataset_statistics.json)
READS_CACHE_DATA = {"model", "probe", "craft_anchors", "train", "forgetting"}


def verify_inputs(sc: dict) -> None:
    """Integrity of the artifacts a stage opens: cache files, ICSM tensors, the adapter (sizes
    always, sha256 when a file is new or its mtime changed; io.verify_files)."""
    for inp in (sc.get("inputs") or {}).values():
        f = Path(inp["file"])
        if inp["rule"] == "cache" and sc["stage"] in READS_CACHE_DATA:
            verify_cache(f.parent, read_json(f))
        elif inp["rule"] == "icsm":
            verify_icsm(f.parent)
        elif inp["rule"] == "train":
            rec = read_json(f)
            if rec.get("adapter_sha256"):  # small: hashed at every stage start, mtime or not
                verify_files(f.parent, rec["adapter_sha256"], rule="train", trust_mtime=False)


# Snakemake invocations that only look (no job runs): nothing is written, what would rerun is reported.
INSPECT_FLAGS = (
    "-n",
    "--dry-run",
    "--dryrun",
    "--summary",
    "-S",
    "--detailed-summary",
    "-D",
    "--list",
    "-l",
    "--list-target-rules",
    "--lt",
    "--list-changes",
    "--lc",
    "--report",
    "--dag",
    "--rulegraph",
    "--filegraph",
    "--lint",
    "--unlock",
    "--cleanup-metadata",
    "--cm",
    "--containerize",
    "--print-compilation",
    "--list-untracked",
    "--lu",
    "--delete-all-output",
    "--delete-temp-output",
    "--archive",
    "--conda-create-envs-only",
    "--list-conda-envs",
)


def sync_mode(argv: list[str]) -> str:
    """'run' (write + touch), 'touch' (snakemake --touch: make configs and stamps agree with the
    outputs as they are), or 'inspect' (report only)."""
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    short = {f"-{c}" for a in argv if a.startswith("-") and not a.startswith("--") for c in a[1:]}
    if "--touch" in flags or "-t" in short:
        return "touch"
    if any(f in flags or f in short for f in INSPECT_FLAGS):
        return "inspect"
    return "run"


def _leaf_changes(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _leaf_changes(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if all(isinstance(v, str) and v.startswith("{root}/") for v in (old, new)):
        return []  # a path under the root: it holds its job's id, said as "input ... is remade"
    return [] if old == new else [prefix]


def _short(v) -> str:
    t = json.dumps(v, default=str) if v is not None else "unset"
    return t if len(t) <= 40 else t[:37] + "..."


def config_changes(old: dict, new: dict, limit: int = 6) -> str:
    """What differs between two stage configs, as a dry-run says it: the config keys (old -> new),
    the library files whose code changed (`code`), the inputs that were remade for another config."""
    from . import codedeps
    from .io import LOCATION_KEYS, relocatable
    from .semantics import semantic_view

    def view(sc):
        body = semantic_view({k: v for k, v in sc.items() if k not in LOCATION_KEYS})
        return relocatable(body, sc.get("root"), sc.get("allowed_root"))

    a, b = view(old), view(new)
    parts = []
    if a.get("code") != b.get("code"):
        fa, fb = old.get("code_files") or {}, new.get("code_files") or {}
        files = codedeps.changed_files(fa, fb) if fa else []
        parts.append(
            "code of " + ", ".join(files[:limit] + (["..."] if len(files) > limit else []))
            if files
            else "code (the old stage config records no files)"
        )
    ia, ib = a.get("inputs") or {}, b.get("inputs") or {}
    for name in sorted(set(ia) | set(ib)):
        if (ia.get(name) or {}).get("id") != (ib.get(name) or {}).get("id"):
            rule = (ib.get(name) or ia.get(name) or {}).get("rule", name)
            parts.append(f"input {name} (rule {rule}) is remade")
    keys = [
        k
        for k in _leaf_changes(
            {k: v for k, v in a.items() if k not in ("code", "inputs")},
            {k: v for k, v in b.items() if k not in ("code", "inputs")},
        )
        if k
    ]
    for k in keys[:limit]:
        va, vb = a, b
        for p in k.split("."):
            va = va.get(p) if isinstance(va, dict) else None
            vb = vb.get(p) if isinstance(vb, dict) else None
        parts.append(f"{k} {_short(va)} -> {_short(vb)}")
    if len(keys) > limit:
        parts.append(f"{len(keys) - limit} more keys")
    return "; ".join(parts) or "its id changed"


def explain(jobs, out=None) -> dict[tuple[str, str], str]:
    """Why each stage job that has no output at its config id's path will run, as a dry-run says it:
    what differs from the newest other config of the same job on this root (it stays where it is:
    switching back to it reruns nothing). Reads only. jobs: (stage, key, stage config)."""
    said = {}
    for stage, key, sc in jobs:
        if completion_file(sc).exists():
            continue
        cfg_dir = Path(sc["root"]) / "configs" / stage / key
        cid = config_id(sc)
        others = (
            sorted((p for p in cfg_dir.glob("*.yaml") if p.stem != cid), key=lambda p: p.stat().st_mtime)
            if cfg_dir.is_dir()
            else []
        )
        if not others:
            continue
        try:
            old = fill_root(yaml.safe_load(others[-1].read_text()) or {}, sc["root"])
            if not isinstance(old, dict) or old.get("stage") != stage:
                continue  # empty (snakemake --touch) or not a stage config
            why = config_changes(old, sc)
        except (yaml.YAMLError, OSError, AttributeError):
            continue
        said[(stage, key)] = why
        if out is not None:
            print(f"vlaforget: {stage} {key} builds {cid} beside {others[-1].stem}: {why}", file=out)
    return said


# ----------------------------------------------------------------------------- artifact integrity


def cache_sizes(manifest: dict) -> dict[str, int]:
    """Byte sizes of a cache's arrays implied by its manifest shapes (images are raw uint8)."""
    s = manifest.get("shapes") or {}
    out = {}
    if s.get("images"):
        n = 1
        for d in s["images"]:
            n *= int(d)
        out["images.u8"] = n
    return out


def verify_cache(cache_dir: str | Path, manifest: dict) -> None:
    """A dataset cache's files against its manifest (rebuilt by rule 'cache'), at stage start: sizes
    always; the small JSON files hashed every time; the .npy arrays hashed when new or when their size or
    mtime changed. images.u8, when the manifest has its per-block hashes, only by size here: its blocks
    are hashed as they are read (data/cache.py CachedDataset.verify_rows), whatever the mtime."""
    files = dict(manifest.get("files") or {})
    if not files:
        return
    blocked = set((manifest.get("blocks") or {}).get("sha256") or {})
    sizes = cache_sizes(manifest)
    for name, n in sizes.items():
        if name in blocked:
            files.pop(name, None)
            p = Path(cache_dir) / name
            got = p.stat().st_size if p.exists() else None
            if got != n:
                what = (
                    "is missing"
                    if got is None
                    else f"has {got} bytes but was written with {n} (truncated or overwritten)"
                )
                raise CorruptInputError(f"{p} {what}; {rebuild_hint(cache_dir, 'cache')}")
    small = {k: v for k, v in files.items() if k.endswith(".json")}
    big = {k: v for k, v in files.items() if k not in small}
    verify_files(cache_dir, small, rule="cache", trust_mtime=False)
    verify_files(cache_dir, big, rule="cache", sizes=sizes)


def verify_icsm(icsm_dir: str | Path) -> None:
    """sha256 of the ICSM tensors / bases against meta.json (rebuilt by rule 'icsm')."""
    from .io import sha256_tensor

    meta = read_json(Path(icsm_dir) / "meta.json")
    hashes = meta.get("tensor_hashes") or {}
    if not hashes:
        return
    file_hashes = {k: v for k, v in hashes.items() if k.startswith("basis")}
    tensor_hashes = {k: v for k, v in hashes.items() if not k.startswith("basis")}
    if file_hashes:
        verify_files(icsm_dir, file_hashes, rule="icsm", trust_mtime=False)
    if tensor_hashes:
        import torch

        def h(p):
            return sha256_tensor(torch.load(p, map_location="cpu", weights_only=True))

        verify_files(icsm_dir, tensor_hashes, rule="icsm", hash_fn=h, trust_mtime=False)


# ----------------------------------------------------------------------------- stale Snakemake lock


def _is_live_snakemake(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"snakemake" in cmd


def clear_stale_snakemake_lock(workdir: str | Path, out=None) -> bool:
    """Remove `.snakemake/locks` when every driver that ran here is provably dead.

    Each workflow run leaves a marker `.snakemake/vlaforget-drivers/<host>-<pid>`. A lock is removed
    only when markers exist and all of them name this host and a pid that is no Snakemake process
    any more (a driver killed with -9 / a power loss); a marker of another host (a shared working
    directory) or of a live driver leaves the lock to Snakemake, which then asks for --unlock.
    Returns True when it removed a lock. Then records this driver's marker."""
    import socket

    sm = Path(workdir) / ".snakemake"
    locks, drivers = sm / "locks", sm / "vlaforget-drivers"
    host, me = socket.gethostname(), os.getpid()
    markers = []
    if drivers.is_dir():
        for m in drivers.iterdir():
            h, _, pid = m.name.rpartition("-")
            if pid.isdigit():
                markers.append((m, h, int(pid)))
    removed = False
    lock_files = list(locks.glob("*.lock")) if locks.is_dir() else []
    if lock_files and markers:
        holders = [(h, p) for _, h, p in markers if h != host or (p != me and _is_live_snakemake(p))]
        if not holders:
            for f in lock_files:
                f.unlink(missing_ok=True)
            removed = True
            if out is not None:
                dead = ", ".join(f"pid {p}" for _, _, p in markers)
                print(
                    f"vlaforget: removed the Snakemake lock left by a killed driver ({dead} on {host}, "
                    f"no longer running); no --unlock needed",
                    file=out,
                )
        elif out is not None:
            print(
                "vlaforget: .snakemake/locks is held by "
                + ", ".join(f"pid {p} on {h}" for h, p in holders)
                + ": if none of them runs any more, `snakemake ... --unlock` once",
                file=out,
            )
    for m, h, p in markers:  # forget drivers of this host that are gone
        if h == host and p != me and not _is_live_snakemake(p):
            m.unlink(missing_ok=True)
    drivers.mkdir(parents=True, exist_ok=True)
    (drivers / f"{host}-{me}").touch()
    return removed
