"""Speed settings of the training loop that leave the math alone (docs/benchmarks.md, issue 16):
`train.fused_optimizer` (AdamW's fused kernel: one launch for all LoRA tensors) and `train.compile`
(torch.compile of each decoder layer: fused element-wise work, the layers share one compiled graph).
Each is measured by `vlaforget bench train --methods baseline+fused_optimizer,baseline+compile`."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("vlaforget.train")


def make_optimizer(params: list, tcfg: dict) -> torch.optim.Optimizer:
    """AdamW over the LoRA parameters; train.fused_optimizer: the fused implementation (same update
    up to float rounding)."""
    kw = {"fused": True} if tcfg.get("fused_optimizer") else {}
    return torch.optim.AdamW(params, lr=float(tcfg["lr"]), weight_decay=float(tcfg.get("weight_decay", 0.0)), **kw)


def compile_backend(value) -> str | None:
    """train.compile: false/null = off, true = inductor, or a torch.compile backend name."""
    if value in (None, False):
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"train.compile = {value!r}: use false, true (inductor) or a torch.compile backend name")


def compile_layers(backend, model, value) -> int:
    """torch.compile each decoder layer in place (regional compilation: the layers are the same code,
    so one graph is compiled and reused; gradient checkpointing wraps the compiled call). Returns the
    number of layers compiled (0 when train.compile is off)."""
    name = compile_backend(value)
    if name is None:
        return 0
    layers = backend.decoder_layers(model)
    for layer in layers:
        layer.compile(backend=name)
    log.info("train.compile: %d decoder layers compiled with torch.compile(backend=%s)", len(layers), name)
    return len(layers)
