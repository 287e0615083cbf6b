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
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..methods.icsm import MethodConfigError, MissingInput

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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_teacher(model_block: dict, ds=None, device: str | None = None):
    """The frozen teacher backend (no adapter), with the dataset's action statistics."""
    from ..models import load_backend

    stats = getattr(ds, "statistics", None) if ds is not None else None
    backend = load_backend(model_block, device=device or default_device(), adapter_dir=None, stats=stats)
    backend.model.eval()
    for p in backend.model.parameters():
        p.requires_grad_(False)
    return backend


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


@torch.no_grad()
def pooled_states(
    backend,
    samples: Sequence[dict],
    batch_size: int,
    layers: Sequence[int] | None = None,
    show_progress: bool = False,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Instruction-pooled residual-stream outputs of decoder `layers` (default: all) for `samples`:
    ({layer: [N,D] f32 cpu}, empty [N]). Captured by forward hooks on the decoder layers
    (methods.icsm.pooled_layer_states), i.e. before the final norm, also for the last layer."""
    from ..io import progress
    from ..methods.icsm import pooled_layer_states

    L = int(backend.num_layers)
    layers = list(range(L)) if layers is None else [int(x) for x in layers]
    acc: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    empties = []
    rng = range(0, len(samples), batch_size)
    for s0 in progress(rng, desc="probe forward") if show_progress else rng:
        batch = backend.collate(list(samples[s0 : s0 + batch_size]), train=False)
        pooled, empty = pooled_layer_states(backend, batch, layers)
        for layer in layers:
            acc[layer].append(pooled[layer].cpu())
        empties.append(empty.cpu())
    return {k: torch.cat(v) for k, v in acc.items()}, torch.cat(empties)


def _norm_text(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _tokenizer(backend):
    tok = getattr(backend, "tokenizer", None)
    if tok is None:
        tok = getattr(getattr(backend, "processor", None), "tokenizer", None)
    return tok


@torch.no_grad()
def audit_spans(backend, samples: Sequence[dict]) -> list[dict]:
    """For each sample: raw instruction, the backend's decoded instruction span, and (when the backend
    exposes a tokenizer) the tokens actually under instruction_mask, decoded from the collated batch."""
    rows = []
    if not samples:
        return rows
    batch = backend.collate(list(samples), train=False)
    mask = batch["instruction_mask"].cpu()
    n_img = int(backend.n_image_tokens)
    tok = _tokenizer(backend)
    for i, s in enumerate(samples):
        raw = s["instruction"]
        row: dict[str, Any] = {"instruction": raw, "n_mask_tokens": int(mask[i].sum())}
        try:
            row["span"] = backend.instruction_span(raw)
        except Exception as e:  # noqa: BLE001 -- the audit records a failure instead of hiding it
            row["span"] = None
            row["span_error"] = repr(e)
        if tok is not None:
            text_mask = torch.cat([mask[i, :1], mask[i, 1 + n_img :]])
            ids = batch["input_ids"][i].cpu()[text_mask.bool()]  # text coords: seq pos t >= 1 -> t - n_img
            row["masked_tokens"] = tok.decode(ids.tolist())
        span = row.get("masked_tokens", row.get("span"))
        row["match"] = span is not None and _norm_text(span) == _norm_text(raw)
        rows.append(row)
    return rows


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
        "what": (f"held-out episodes of {block.get('name')} (data.heldout: "
                 f"{getattr(ds, 'manifest', {}).get('heldout_used')})" if split == "heldout"
                 else f"{split} split of {block.get('name')}, a suite no run trains on"),
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
