"""`vlaforget <stage> ...`: every workflow stage, runnable by hand with the arguments its rule passes.

Most stages take `--config STAGE_CONFIG.yaml` (written by the workflow under {root}/configs/, see
vlaforget.stageconfig.stage_config); `vlaforget stage-config` writes one by hand from the study config.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# subcommand -> (module, one-line help). Each module defines add_args(parser) and main(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "stage-config": ("vlaforget.stages.stage_config", "write a stage's config file from the study config"),
    "check-disk": ("vlaforget.disk", "data-root policy and disk-safety check"),
    "gpu-run": ("vlaforget.gpus", "run a command on free GPU slots (lock-based allocator)"),
    "preflight": (
        "vlaforget.preflight",
        "every missing piece of a real-study run (model, stack, RLDS, LIBERO)",
    ),
    "demos": ("vlaforget.stages.demos", "generate scripted Meta-World demonstrations as RLDS"),
    "libero-fixture": ("vlaforget.stages.libero_fixture", "tiny LIBERO-format RLDS fixture (openvla layout)"),
    "cache": (
        "vlaforget.stages.cache",
        "RLDS/TFDS -> random-access training cache + dataset_statistics.json",
    ),
    "model": ("vlaforget.stages.model", "build+pretrain the tiny teacher, or check an OpenVLA base offline"),
    "probe": ("vlaforget.stages.probe", "probe set: pooled instruction hidden states of the teacher"),
    "icsm": ("vlaforget.stages.icsm", "teacher-only ICSM: SVD + sensitivity -> U_f, U_p, mu, C_T"),
    "craft-anchors": ("vlaforget.stages.craft_anchors", "CRaFT anchor cache: teacher features per sample"),
    "train": ("vlaforget.stages.train", "the one training loop (baseline / method / CRaFT / ablations)"),
    "eval": ("vlaforget.stages.eval", "closed-loop evaluation of a run (or the teacher) on a suite"),
    "forgetting": ("vlaforget.stages.forgetting", "forgetting metrics: general skill, drift, CKA"),
    "libero-vqa": (
        "vlaforget.stages.libero_vqa",
        "visual questions generated from the LIBERO simulator (JSONL + images)",
    ),
    "vqa-convert": (
        "vlaforget.stages.vqa_convert",
        "VQAv2 questions + annotations JSON -> the multiple-choice VQA JSONL",
    ),
    "export": (
        "vlaforget.stages.export",
        "a finished run as one merged HF checkpoint openvla's own code loads",
    ),
    "table": ("vlaforget.stages.table", "aggregate eval JSONs into a paper table (csv + md)"),
    "figures": ("vlaforget.stages.figures", "paper figures (PNG + PDF)"),
    "bench": ("vlaforget.bench", "speed / memory benchmarks (docs/benchmarks.md)"),
    "migrate-root": (
        "vlaforget.migrate",
        "move a root laid out by run name to outputs named by config id (once)",
    ),
    "plan": ("vlaforget.plan", "GPU-hours per rule and wall-clock days of the configured study on a profile"),
    "config-doc": ("vlaforget.settings", "every typed config key: type, default, meaning (config/README.md)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlaforget", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", metavar="<stage>")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_help(sys.stderr)
            print(f"\nvlaforget: unknown stage '{argv[0]}'", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    from .io import setup_logging

    setup_logging()
    mod = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"vlaforget {name}", description=COMMANDS[name][1])
    mod.add_args(parser)
    args = parser.parse_args(rest)
    from .errors import UserError

    try:
        return run_stage(name, mod, args)
    except UserError as e:
        # User-facing errors (vlaforget.errors) carry the cause and the fix: no traceback wall.
        print(f"vlaforget {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from .disk import full_disk_message

        print(
            f"vlaforget {name}: error: {full_disk_message(e, getattr(args, 'config', None))}", file=sys.stderr
        )
        return 2


def run_stage(name: str, mod, args) -> int:
    """A stage with a stage config: check its inputs were made for this config (and are intact),
    own its output (a lock that dies with this process), run it, record its config id last."""
    cfg_path = getattr(args, "config", None)
    if not cfg_path or name in ("check-disk", "stage-config"):
        return int(mod.main(args) or 0)
    from . import freshness
    from .io import DirLock
    from .stagefile import check_code, load_stage_config

    sc = load_stage_config(cfg_path)
    check_code(sc, cfg_path)
    if sc.get("stage") not in freshness.COMPLETION:
        return int(mod.main(args) or 0)
    freshness.check_inputs(sc)
    lock = None
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if sc["stage"] != "train" and main_rank:  # train locks its run directory itself (train/loop.py)
        # beside the output (a stage may replace its whole out_dir by a rename)
        out = Path(sc["out_dir"]) if sc.get("out_dir") else Path(sc["out_file"])
        lock = DirLock(out.parent / f".{out.name}.lock", f"output {out}").acquire()
    try:
        rc = int(mod.main(args) or 0)
        if os.environ.get("VLAFORGET_FAULT_KILL_BEFORE_STAMP") == sc["stage"]:  # tests/test_faults.py
            os.kill(os.getpid(), 9)
        if rc == 0 and main_rank and freshness.completion_file(sc).exists():
            freshness.stamp(sc)
        return rc
    finally:
        if lock:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
