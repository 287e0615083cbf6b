"""Recipe `vlaforget craft-anchors`: CRaFT's anchor cache -- the frozen teacher's pooled features of
seeded samples of a suite, for every pooling (methods/craft.py); anchors.pt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..data.probe import open_dataset
from ..errors import MethodConfigError
from ..methods.craft import POOLINGS, anchor_features, log, select_anchor_indices
from ..models.features import load_teacher
from ..settings import CraftAnchorsStageSettings


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="craft_anchors stage config")


def main(args) -> int:
    import hashlib

    from ..io import atomic_torch_save, provenance, seed_everything, sha256_tensor
    from ..stagefile import load_stage_config

    sc = load_stage_config(args.config, "craft_anchors")
    cs = CraftAnchorsStageSettings.of(sc)  # unknown keys / wrong types: a ConfigError before anything loads
    c = cs.craft
    pooling = c.pooling
    if pooling not in POOLINGS:
        raise MethodConfigError(f"craft.pooling '{pooling}' unknown: use one of {POOLINGS}")
    seed = cs.seed
    seed_everything(seed)
    t0 = time.perf_counter()
    ds = open_dataset(sc["dataset"], "train")
    shots, shots_seed = cs.shots, cs.shots_seed
    if shots:  # a few-shot run's anchors come from the few-shot subset it trains on
        from ..data.cache import CachedDataset

        ds = CachedDataset(sc["dataset"]["cache_dir"], split="train", shots=int(shots), seed=int(shots_seed))
    backend = load_teacher(sc["model"], ds)
    L = int(backend.num_layers)
    layer = c.layer
    if not -(L + 1) <= layer <= L:
        raise MethodConfigError(
            f"craft.layer = {layer} is not a hidden_states index of a {L}-layer model "
            f"(valid: {-(L + 1)}..{L})"
        )
    idx = select_anchor_indices(len(ds), c.n_anchors, seed)
    samples = [ds[int(i)] for i in idx]
    feats = anchor_features(backend, samples, layer, c.batch_size, show_progress=True)
    h = hashlib.sha256(sha256_tensor(idx).encode())
    for p in POOLINGS:
        h.update(sha256_tensor(feats[p]).encode())
    anchors = {
        "indices": idx,
        "features": feats[pooling],
        "features_by_pooling": feats,
        "layer": layer,
        "layer_abs": layer % (L + 1),
        "pooling": pooling,
        "dataset": dict(sc["dataset"]),
        "split": "train",
        "shots": int(shots) if shots else None,
        "shots_seed": int(shots_seed) if shots else None,
        "seed": seed,
        "hash": h.hexdigest(),
        "hidden_size": int(backend.hidden_size),
        "num_layers": L,
        "model_dtype": (sc.get("model") or {}).get("dtype"),
        "timings": {"total_s": round(time.perf_counter() - t0, 3)},
        **provenance(),
    }
    atomic_torch_save(anchors, Path(sc["out_dir"]) / "anchors.pt")  # completion file
    log.info(
        "anchors: %d samples, layer %d, pooling %s, %.1fs", len(idx), layer, pooling, time.perf_counter() - t0
    )
    return 0
