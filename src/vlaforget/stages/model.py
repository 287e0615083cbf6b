"""Stage `model`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config import load_stage_config
from ..io import log, provenance, write_json
from ..models.build import build_tiny, check_openvla


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="stage config (vlaforget stage-config model ...)")


def main(args) -> int:
    sc = load_stage_config(args.config, "model")
    from ..paths import apply_job_env

    apply_job_env(Path(sc["root"]))
    out_dir = Path(sc["out_dir"])
    done = out_dir / "done.json"
    if done.exists():
        done.unlink()  # a rebuilt model must not look finished before it is
    backend = sc["model"]["backend"]
    build = None
    if backend == "tiny":
        # written to a temp dir and renamed into place (a kill never leaves a half-saved teacher)
        import shutil

        for stale in out_dir.parent.glob(f".{out_dir.name}.*-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        result = build_tiny(sc, build_dir=build)
    elif backend == "openvla":
        result = check_openvla(sc)
    else:
        raise ValueError(f"unknown model.backend '{backend}': use 'tiny' or 'openvla'")
    result.update(provenance=provenance(), code=sc.get("code"), stage_config=str(args.config))
    if build is not None:
        from ..train.loop import replace_dir

        write_json(build / "done.json", result)
        replace_dir(build, out_dir)
    else:
        write_json(done, result)
    log.info("model stage done: %s", done)
    return 0

