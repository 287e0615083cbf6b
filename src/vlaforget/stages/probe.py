"""Recipe `vlaforget probe`: the probe set -- pooled instruction hidden states of the frozen teacher
at every decoder layer on data no run trains on (data/probe.py loads and checks the split,
models/features.py pools); probe.pt, then audit.json last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..data.probe import N_AUDIT, log, open_dataset, probe_hash, probe_source, select_indices
from ..errors import MethodConfigError
from ..models.features import audit_spans, load_teacher, pooled_states
from ..settings import ProbeStageSettings


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", required=True, help="probe stage config (vlaforget stage-config --stage probe)"
    )


def main(args) -> int:
    from ..io import atomic_torch_save, provenance, seed_everything, write_json
    from ..stagefile import load_stage_config

    sc = load_stage_config(args.config, "probe")
    ps = ProbeStageSettings.of(sc)  # unknown keys / wrong types: a ConfigError before anything loads
    out = Path(ps.out_dir)
    seed = ps.seed
    seed_everything(seed)
    t0 = time.perf_counter()
    split = ps.split
    name = sc["dataset"].get("name")
    trained = list(ps.trained_suites)
    if split in ("train", "all") and name in trained:
        raise MethodConfigError(
            f"probe.split '{split}' of {name}: study runs train on {name}, so the probe would be "
            "trained on; use probe.split: heldout or a probe.dataset outside the study"
        )
    ds = open_dataset(sc["dataset"], split)
    if len(ds) < ps.n:
        raise MethodConfigError(
            f"probe.n = {sc['n']} but the {split} split of {name} has only {len(ds)} transitions "
            f"({len(getattr(ds, 'episodes', []))} episodes): lower probe.n, or use a probe.dataset no run trains on "
            "with probe.split: train"
        )
    source = probe_source(sc["dataset"], split, ds, trained)
    log.info(
        "probe source: %s (%d episodes, tasks %s)", source["what"], source["n_episodes"], source["tasks"]
    )
    backend = load_teacher(sc["model"], ds)
    idx = select_indices(len(ds), ps.n, seed)
    samples = [ds[int(i)] for i in idx]
    # the tasks the drawn probe transitions cover (source.tasks: those of the split it is drawn from)
    per_task: dict = {}
    for smp in samples:
        per_task[smp.get("task")] = per_task.get(smp.get("task"), 0) + 1
    source["probe_tasks"] = sorted(per_task, key=str)
    source["probe_per_task"] = {str(t): per_task[t] for t in source["probe_tasks"]}
    missing = sorted(set(source["tasks"] or []) - set(per_task), key=str)
    if missing:
        log.warning("probe: no sample of tasks %s of the %s split (raise probe.n)", missing, split)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    pooled, empty = pooled_states(backend, samples, ps.batch_size, show_progress=True)
    t_fwd = time.perf_counter() - t1
    n_empty = int(empty.sum())
    if n_empty == len(samples):
        raise MethodConfigError(
            "every probe sample has an empty instruction mask: the backend's instruction_mask "
            "is broken (see audit in the model stage)"
        )
    h = probe_hash(idx, pooled)
    probe = {
        "indices": idx,
        "dataset": dict(sc["dataset"]),
        "split": split,
        "source": source,
        "seed": seed,
        "pooled": pooled,
        "empty": empty,
        "n_empty": n_empty,
        "instructions": [s["instruction"] for s in samples],
        "num_layers": int(backend.num_layers),
        "hidden_size": int(backend.hidden_size),
        "hash": h,
    }
    atomic_torch_save(probe, out / "probe.pt")
    rows = audit_spans(backend, samples[:N_AUDIT])
    audit = {
        "hash": h,
        "n": len(samples),
        "n_empty": n_empty,
        "dataset": sc["dataset"].get("name"),
        "split": split,
        "source": source,
        "layers_pooled": sorted(pooled),
        "spans": rows,
        "span_matches": sum(r["match"] for r in rows),
        "spans_checked": len(rows),
        "timings": {"load_s": round(t_load, 3), "forward_s": round(t_fwd, 3)},
        **provenance(),
    }
    bad = [r for r in rows if not r["match"]]
    if bad:
        log.warning(
            "instruction span audit: %d of %d decoded spans differ from the raw instruction, e.g. "
            "%r vs %r (unknown words / wrong mask?): see audit.json",
            len(bad),
            len(rows),
            bad[0].get("masked_tokens", bad[0].get("span")),
            bad[0]["instruction"],
        )
    if n_empty:
        log.warning(
            "%d of %d probe samples have an empty instruction mask (pooled as zeros, excluded by ICSM)",
            n_empty,
            len(samples),
        )
    write_json(out / "audit.json", audit)  # completion file: last
    log.info(
        "probe set: %d samples, %d layers, hash %s (%.1fs)",
        len(samples),
        len(pooled),
        h[:12],
        time.perf_counter() - t0,
    )
    return 0
