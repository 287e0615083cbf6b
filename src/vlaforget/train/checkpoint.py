"""Resumable training state in an undeclared directory keyed by the run id.

Snakemake deletes a job's declared outputs before rerunning it, so checkpoints live beside them in
`{run_dir}/checkpoints/{run_id}/step_{N}/` (never declared). A checkpoint holds everything needed to
continue exactly: trainable weights, optimizer, scheduler, loss scaler, data position, RNG states and
the plug-ins' state (Thermostat, λ). `latest.json` is written last, so a kill mid-save is harmless.
The loop also saves one at its target step, so a run whose max_steps is raised continues from it.
The last `keep` checkpoints stay; an unreadable latest one (truncated by a full disk, a copy cut short)
is reported and the one before it is used.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_torch_save, read_json, sha256_file, write_json

log = logging.getLogger("vlaforget.train")


def _trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(
    ckpt_dir: Path,
    step: int,
    *,
    skipped,
    model,
    optimizer,
    scheduler,
    scaler,
    sampler,
    plugins,
    aug_gen,
    keep: int = 2,
    extra: dict | None = None,
) -> Path:
    ckpt_dir = Path(ckpt_dir)
    d = ckpt_dir / f"step_{step:08d}"
    d.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "skipped": skipped,
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "sampler": sampler.state_dict(),
        "plugins": {k: p.state_dict() for k, p in plugins.items()},
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "aug": aug_gen.get_state(),
        },
        "extra": dict(extra or {}),  # e.g. rollbacks done, wall time so far
    }
    atomic_torch_save(state, d / "state.pt")
    # its checksum: a checkpoint whose bytes changed (mtime restored or not) is not resumed from
    write_json(d / "state.sha256.json", {"sha256": sha256_file(d / "state.pt")})
    write_json(ckpt_dir / "latest.json", {"step": step, "path": d.name})
    # one linear history up to `step`: the newest `keep` at or before it stay; later ones (a run
    # resumed below them after its max_steps was lowered) are superseded
    below = [p for p in sorted(ckpt_dir.glob("step_*")) if _step_of(p) is not None and _step_of(p) <= step]
    above = [p for p in ckpt_dir.glob("step_*") if _step_of(p) is not None and _step_of(p) > step]
    for old in below[:-keep] + above:
        shutil.rmtree(old, ignore_errors=True)
    return d


def _step_of(d: Path) -> int | None:
    try:
        return int(Path(d).name.split("_", 1)[1])
    except (IndexError, ValueError):
        return None


def candidates(ckpt_dir: Path, max_step: int | None = None) -> list[Path]:
    """state.pt files to resume from, newest first (latest.json's first, then older step dirs);
    max_step: only checkpoints at or before that step (a run whose max_steps was lowered)."""
    ckpt_dir = Path(ckpt_dir)
    out = []
    f = ckpt_dir / "latest.json"
    if f.exists():
        try:
            out.append(ckpt_dir / read_json(f)["path"] / "state.pt")
        except (ValueError, KeyError, OSError):
            log.warning("%s is unreadable: looking for checkpoints in %s directly", f, ckpt_dir)
    for d in sorted(ckpt_dir.glob("step_*"), reverse=True):
        p = d / "state.pt"
        if p not in out:
            out.append(p)
    out = [p for p in out if p.exists()]
    if max_step is not None:
        out = [p for p in out if _step_of(p.parent) is not None and _step_of(p.parent) <= max_step]
    return out


def latest(ckpt_dir: Path) -> Path | None:
    c = candidates(ckpt_dir)
    return c[0] if c else None


def load_latest(ckpt_dir: Path, max_step: int | None = None) -> tuple[Path, dict] | tuple[None, None]:
    """(path, state) of the newest checkpoint (at or before max_step) that loads; unreadable ones
    are named and skipped."""
    bad = []
    for p in candidates(ckpt_dir, max_step):
        try:
            check = p.parent / "state.sha256.json"
            if check.exists() and read_json(check).get("sha256") != sha256_file(p):
                raise ValueError(f"its bytes do not match the checksum written with it ({check})")
            state = torch.load(p, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a vlaforget checkpoint")
        except Exception as e:  # a truncated zip gives OSError/RuntimeError/EOFError/UnpicklingError
            log.warning(
                "checkpoint %s is unreadable (%s: %s): falling back to the previous one",
                p,
                type(e).__name__,
                e,
            )
            bad.append(p)
            continue
        if bad:
            log.warning("resuming from %s instead of the unreadable %s", p, ", ".join(map(str, bad)))
        return p, state
    if bad:
        log.warning(
            "no readable checkpoint in %s (%d unreadable): training this run from step 0", ckpt_dir, len(bad)
        )
    return None, None


def restore(
    path: Path, *, model, optimizer, scheduler, scaler, sampler, plugins, aug_gen, state: dict | None = None
) -> tuple[int, int]:
    if state is None:
        state = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    missing = set(state["trainable"]) - set(params)
    if missing:
        raise RuntimeError(
            f"checkpoint {path} does not match this model (e.g. {sorted(missing)[:3]}); "
            f"delete {Path(path).parent.parent} to start this run over"
        )
    with torch.no_grad():
        for n, t in state["trainable"].items():
            params[n].copy_(t.to(params[n].device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    for k, p in plugins.items():
        if k in state["plugins"]:
            p.load_state_dict(state["plugins"][k])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    aug_gen.set_state(rng["aug"])
    return int(state["step"]), int(state["skipped"])
