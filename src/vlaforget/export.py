"""`vlaforget export`: a finished run as one merged HF checkpoint that needs nothing of this project.

The base model with the run's LoRA adapter merged in, its processor (tokenizer), and the suite's
action statistics under its unnorm key (the dataset name, e.g. `libero_spatial_no_noops`), laid out
like the merged checkpoints of openvla's finetune.py, so that openvla's own `get_vla`,
`predict_action(unnorm_key=...)` and experiments/robot/libero/run_libero_eval.py load it unchanged
(docs/models.md, "Export"). Written into a temp folder beside the output and renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from .errors import ConfigError, UserError
from .io import provenance, read_json, replace_dir, write_json
from .models import DTYPES, load_backend
from .paths import check_under
from .settings import model_dtype
from .stagefile import load_stage_config

log = logging.getLogger(__name__)

RECORD = "export.json"  # written last inside the export: what was merged, from where


class ExportError(UserError, RuntimeError):
    """A run cannot be exported (unfinished, or its record disagrees); the message says why."""


def default_out_dir(sc: dict) -> Path:
    """{root}/exports/{run_name}: beside runs/ and evals/ under the data root."""
    return Path(sc["root"]) / "exports" / sc["run_name"]


def read_run(run_dir: str | Path) -> dict:
    """The train stage config a finished run was trained with (its config.yaml), checked."""
    run_dir = Path(run_dir)
    cfg = run_dir / "config.yaml"
    if not cfg.exists():
        raise ExportError(
            f"{run_dir} is not a run folder (no config.yaml): pass --run-dir {{root}}/runs/<run> of a "
            "trained run (the train stage writes config.yaml there when it starts)"
        )
    sc = load_stage_config(cfg, "train")
    final = run_dir / "final"
    if not (final / "done.json").exists():
        raise ExportError(
            f"run {sc.get('run_name', run_dir.name)} has not finished: {final}/done.json is missing. "
            f"Finish its training first (snakemake {final}/done.json, or vlaforget train --config "
            f"{{root}}/configs/train/{run_dir.name}.yaml; a killed run resumes from its checkpoint)"
        )
    if not (final / "adapter_config.json").exists():
        raise ExportError(f"{final} holds no PEFT adapter (adapter_config.json missing): retrain the run")
    return sc


def export_run(
    run_dir: str | Path, out_dir: str | Path | None = None, dtype: str | None = None, device: str = "cpu"
) -> dict:
    """Merge run_dir/final (PEFT adapter) into the run's base model and write the checkpoint.

    out_dir: default {root}/exports/{run_name}; must lie under the run's allowed root. dtype: of
    the merged weights (fp32 / bf16 / fp16), default the run's model dtype. Returns the record
    written to out_dir/export.json."""
    t0 = time.time()
    run_dir = Path(run_dir)
    sc = read_run(run_dir)
    final = run_dir / "final"
    unnorm_key = sc["dataset"]["name"]
    all_stats = read_json(final / "dataset_statistics.json")
    if unnorm_key not in all_stats:
        raise ExportError(
            f"{final}/dataset_statistics.json has no entry for the run's dataset '{unnorm_key}' "
            f"(has: {', '.join(all_stats)}): the run folder is damaged; retrain the run"
        )
    stats = all_stats[unnorm_key]
    out = Path(out_dir) if out_dir is not None else default_out_dir(sc)
    out = check_under(out, Path(sc["allowed_root"]), "export output")
    block = dict(sc["model"])
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"export dtype '{dtype}' unknown: use one of {', '.join(DTYPES)}")
        block["dtype"] = dtype

    log.info(
        "export %s: base %s (%s) + adapter %s -> %s",
        sc["run_name"],
        block["path"],
        model_dtype(block),
        final,
        out,
    )
    backend = load_backend(block, device=device, adapter_dir=final, stats=stats)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        backend.save(tmp, norm_stats={unnorm_key: stats})
        record = {
            "run_name": sc["run_name"],
            "run_id": sc.get("run_id"),
            "backend": block["backend"],
            "base_model": str(block["path"]),
            "adapter_dir": str(final),
            "dtype": model_dtype(block),
            "unnorm_key": unnorm_key,
            "files": sorted(p.name for p in tmp.iterdir()) + [RECORD],
            "wall_time_s": round(time.time() - t0, 1),
            **provenance(),
        }
        write_json(tmp / RECORD, record)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s in %.1f s: %s", sc["run_name"], time.time() - t0, out)
    return record
