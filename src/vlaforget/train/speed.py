"""Speed settings of the training loop that leave the math alone (docs/benchmarks.md, issue 16):
`train.fused_optimizer` (AdamW's fused kernel: one launch for all LoRA tensors), `train.compile`
(torch.compile of each decoder layer: fused element-wise work, the layers share one compiled graph)
and `train.lora_input_cast` (false: peft's LoRA layers skip the upcast of their bf16/fp16 input to the
fp32 LoRA weights' dtype, which autocast casts straight back: bit-identical, two full-size copies
fewer per LoRA layer). Each is measured by `vlaforget bench train --methods baseline+<modifier>`."""

from __future__ import annotations

import logging

import torch

from ..errors import TrainingError
from ..settings import MethodSettings, TrainSettings

log = logging.getLogger("vlaforget.train")


def make_optimizer(params: list, tcfg: dict) -> torch.optim.Optimizer:
    """AdamW over the LoRA parameters; train.fused_optimizer: the fused implementation (same update
    up to float rounding)."""
    kw = {"fused": True} if tcfg.get("fused_optimizer") else {}
    wd = float(tcfg.get("weight_decay", TrainSettings.weight_decay))
    return torch.optim.AdamW(params, lr=float(tcfg["lr"]), weight_decay=wd, **kw)


def compile_backend(value) -> str | None:
    """train.compile: false/null = off, true = inductor, or a torch.compile backend name."""
    if value in (None, False):
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"train.compile = {value!r}: use false, true (inductor) or a torch.compile backend name")


def check_compile(ts: TrainSettings, ms: MethodSettings, model_backend: str | None) -> None:
    """train.compile refused where it is measured to break training, before anything is loaded: HSW's
    flow-down hooks inside compiled OpenVLA decoder layers under gradient checkpointing (issue 28, run 4:
    at step 6 a checkpoint's recomputation saved other tensors than the compiled forward had)."""
    if compile_backend(ts.compile) is None:
        return
    if (
        model_backend == "openvla"
        and ts.gradient_checkpointing
        and ms.hsw.enabled
        and ms.hsw.mode == "flow_down"
    ):
        raise TrainingError(
            "train.compile with HSW (method.hsw.enabled, mode flow_down) under train.gradient_checkpointing "
            "on OpenVLA stops during training with torch.utils.checkpoint's CheckpointError (a "
            "recomputed layer saved other tensors than its compiled forward; measured on an H100 with "
            'transformers 4.40.1 and torch 2.11, docs/benchmarks.md "Issue 28" run 4). Set '
            "train.compile: false for this method (the default; the baseline was measured to run with it)"
        )


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


def skip_lora_input_cast(model, tcfg: dict) -> int:
    """train.lora_input_cast false (bf16/fp16 autocast only): switch off peft's input upcast in every
    LoRA layer. Exact: a bf16/fp16 value upcast to fp32 and cast back by autocast is itself, so the
    matmuls see the same inputs. Returns the number of layers switched (0 when the key is on, the
    precision is fp32, or the installed peft has no such switch, e.g. peft 0.11: then it warns)."""
    if tcfg.get("lora_input_cast", TrainSettings.lora_input_cast) or tcfg.get(
        "precision", TrainSettings.precision
    ) not in ("bf16", "fp16"):
        return 0
    n = 0
    for m in model.modules():
        if hasattr(m, "lora_A") and hasattr(m, "_cast_input_dtype"):
            m.cast_input_dtype_enabled = False
            n += 1
    if n == 0:
        import peft

        log.warning(
            "train.lora_input_cast: false has no effect with peft %s (no input-cast switch; peft >= 0.14 "
            "has one)",
            peft.__version__,
        )
    return n
