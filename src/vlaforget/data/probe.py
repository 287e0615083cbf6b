"""Probe set: pooled instruction hidden states of the frozen teacher (stage `probe`).

N transitions drawn (seeded, without replacement) from data NO run trains on: the `probe.split` of the
probe dataset's cache -- `heldout` (default: the episodes data.train_split / data.heldout hold out; per_task: of every task) or `train`/`all` of a
suite outside the study (the stage refuses a split some run trains on). One teacher forward per batch;
the output of EVERY decoder layer l (forward hooks: the residual stream before any final norm) is
mean-pooled over the instruction tokens (batch['instruction_mask']).
Every layer is kept (not only the ICSM layers) so drift can be studied per layer and the layer
groups can change without rerunning this stage; for OpenVLA-7B that is 32 x N x 4096 float32
(262 MB at N = 500).

Outputs (out_dir): probe.pt {indices, dataset, split, source, seed, pooled {layer: [N,D]}, empty [N],
n_empty, instructions, num_layers, hidden_size, hash}, audit.json (instruction span of the first probes next
to the raw instruction, empty-mask count, hash) -- written last: it is the completion file together
with probe.pt, which is written first.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import MethodConfigError, MissingInput

log = logging.getLogger("vlaforget.probe")

N_AUDIT = 10


# ----------------------------------------------------------------------------- shared loaders
# (tests replace these two with fakes; the icsm stage uses them too)


def open_dataset(block: dict, split: str = "train"):
    """CachedDataset of a stage config's dataset block ({name, cache_dir, tasks})."""
    cache_dir = Path(block["cache_dir"])
    if not (cache_dir / "manifest.json").exists():
        raise MissingInput(
            f"dataset cache {cache_dir} is missing (no manifest.json): run the cache "
            f"stage for dataset '{block.get('name')}' first"
        )
    from .cache import CachedDataset

    return CachedDataset(cache_dir, split=split)


# ----------------------------------------------------------------------------- pure helpers


def select_indices(n_total: int, n: int, seed: int) -> torch.Tensor:
    """n distinct indices of range(n_total), seeded (torch.Generator), sorted ascending."""
    if n > n_total:
        raise MethodConfigError(
            f"probe.n = {n} but the train split has only {n_total} transitions: lower probe.n"
        )
    g = torch.Generator().manual_seed(int(seed))
    return torch.sort(torch.randperm(n_total, generator=g)[:n]).values


def probe_hash(indices: torch.Tensor, pooled: dict[int, torch.Tensor]) -> str:
    """sha256 over the indices and every layer's pooled tensor (dtype, shape, bytes)."""
    from ..io import sha256_tensor

    h = hashlib.sha256(sha256_tensor(indices.long()).encode())
    for layer in sorted(pooled):
        h.update(f"{layer}:".encode())
        h.update(sha256_tensor(pooled[layer]).encode())
    return h.hexdigest()


def probe_source(block: dict, split: str, ds, trained_suites: Sequence[str] = ()) -> dict:
    """Where the probe comes from, for meta.json / forgetting.json / the tables: dataset, split,
    episodes, tasks, and whether any run of the study trains on it (must be False)."""
    trained = split in ("train", "all") and block.get("name") in set(trained_suites)
    eps = getattr(ds, "episodes", None)
    return {
        "dataset": block.get("name"),
        "split": split,
        "n_episodes": None if eps is None else len(eps),
        "tasks": None if eps is None else sorted({e["task"] for e in eps}),
        "trained_on": bool(trained),
        "heldout": getattr(ds, "manifest", {}).get("heldout_used") if split == "heldout" else None,
        "what": (
            f"held-out episodes of {block.get('name')} (data.heldout: "
            f"{getattr(ds, 'manifest', {}).get('heldout_used')})"
            if split == "heldout"
            else f"{split} split of {block.get('name')}, a suite no run trains on"
        ),
    }


def cache_rows(ds, indices) -> set[int]:
    """Cache rows of transitions `indices` of a CachedDataset view (views of one cache share rows)."""
    return {int(ds.locate(int(i))[2]) for i in indices}


def check_not_trained_on(probe: dict, train_ds) -> None:
    """Raise if any probe transition is in `train_ds` (a run's training view of its cache)."""
    from .cache import CachedDataset

    pdir = Path(probe["dataset"]["cache_dir"]).resolve()
    if pdir != Path(train_ds.cache_dir).resolve():
        return
    pds = CachedDataset(pdir, split=probe.get("split", "train"))
    prow = cache_rows(pds, probe["indices"])
    trows = {int(r) for k in range(len(train_ds.episodes)) for r in train_ds.episode_rows(k)}
    both = prow & trows
    if both:
        raise MethodConfigError(
            f"{len(both)} of the {len(prow)} probe transitions ({probe['dataset'].get('name')}, split "
            f"'{probe.get('split', 'train')}') are in this run's training data: the probe must be data no "
            "run trains on -- set probe.split: heldout, or probe.dataset to a suite outside the study"
        )


def load_probe(d: str | Path) -> dict:
    d = Path(d)
    if not (d / "audit.json").exists() or not (d / "probe.pt").exists():
        raise MissingInput(
            f"probe set {d} is incomplete (probe.pt / audit.json missing): run the probe stage"
        )
    return torch.load(d / "probe.pt", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- stage
