"""Features of a backend's forward: the residual stream at decoder-layer outputs, and its mean over
the instruction tokens. One space shared by the probe set (data/probe.py), ICSM's statistics
(methods/icsm.py), CRaFT's pooled features (methods/craft.py), the Thermostat's drift
(train/plugins.py) and the forgetting stage's drift / CKA (eval/forgetting.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

# ----------------------------------------------------------------------------- pooling


def pool_instruction(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `hidden` [B,S,D] over the positions where `mask` [B,S] is true.

    Returns (pooled [B,D] float32, empty [B] bool). Rows with an empty mask get zeros and are flagged
    (never a division by zero); callers count them.
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"pool_instruction: hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)} "
            "must be [B,S,D] and [B,S]"
        )
    m = mask.to(device=hidden.device, dtype=torch.float32)
    count = m.sum(dim=1)  # [B]
    summed = torch.einsum("bsd,bs->bd", hidden.float(), m)
    empty = count == 0
    pooled = summed / count.clamp(min=1.0).unsqueeze(1)
    pooled = torch.where(empty.unsqueeze(1), torch.zeros_like(pooled), pooled)
    return pooled, empty


# ----------------------------------------------------------------------------- residual stream


@contextmanager
def layer_outputs(layers, indices: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the outputs of decoder layers `indices` (forward hooks on `layers[i]`) during the
    forwards run inside the block: {layer: hidden [B,S,D]} = the residual stream at the layer's output,
    before any final norm. Unlike HF's `hidden_states` (whose last entry is normed for the last layer)
    this is the same space for every layer, and the forward needs no output_hidden_states (which keeps
    every layer's states alive)."""
    store: dict[int, torch.Tensor] = {}
    handles = []

    def make(i: int):
        def hook(module, args, output):
            store[i] = output[0] if isinstance(output, tuple) else output

        return hook

    try:
        for i in indices:
            handles.append(layers[int(i)].register_forward_hook(make(int(i))))
        yield store
    finally:
        for h in handles:
            h.remove()


def pooled_layer_states(backend, batch: dict, layers: Sequence[int], model=None) -> tuple[dict, torch.Tensor]:
    """One forward of `batch`; instruction-pooled residual-stream outputs of `layers`:
    ({layer: [B,D] float32}, empty [B]). The space of the probe set, the ICSM statistics, the
    Thermostat's drift and the forgetting stage's drift / CKA."""
    last = max(int(i) for i in layers)

    class _Stop(Exception):
        pass

    layer_list = backend.decoder_layers(model)
    with layer_outputs(layer_list, layers) as hs:
        # stop the forward after the deepest asked layer: no later layers, no logits
        h = layer_list[last].register_forward_hook(lambda *a: (_ for _ in ()).throw(_Stop()))
        try:
            backend.forward(batch, model=model)
        except _Stop:
            pass
        finally:
            h.remove()
    missing = [i for i in layers if int(i) not in hs]
    if missing:
        raise RuntimeError(f"decoder layers {missing} did not run in the forward pass")
    out, empty = {}, None
    for i in layers:
        out[int(i)], empty = pool_instruction(hs[int(i)], batch["instruction_mask"])
    if empty is None:
        empty = torch.zeros(batch["instruction_mask"].shape[0], dtype=torch.bool)
    return out, empty


# ----------------------------------------------------------------------------- the frozen teacher


def load_teacher(model_block: dict, ds=None, device: str | None = None):
    """The frozen teacher backend (no adapter), with the dataset's action statistics."""
    from ..gpus import pick_device
    from . import load_backend

    stats = getattr(ds, "statistics", None) if ds is not None else None
    backend = load_backend(model_block, device=pick_device(device), adapter_dir=None, stats=stats)
    backend.model.eval()
    for p in backend.model.parameters():
        p.requires_grad_(False)
    return backend


# ----------------------------------------------------------------------------- probe features


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
    (pooled_layer_states), i.e. before the final norm, also for the last layer."""
    from ..io import progress

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
