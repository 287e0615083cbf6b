"""Two gradients from one backward pass: rows [0, k) of a batch see the LoRA weights, rows [k, B) a
"shadow" of them (the same storage, a separate autograd leaf).

CRaFT needs g_act = dL_act/dθ (task rows) and g_ret = dL_ret/dθ (anchor rows) separately, for the
conflict projection. The rows of a batch never interact in the model (per-sample attention, per-token
norms and MLPs), so in one forward of [task; anchor] and ONE backward of L_act + L_ret, the gradient
that reaches the LoRA weights through the task rows is exactly g_act and the one through the anchor
rows exactly g_ret. `LoraRowSplit` routes the anchor rows through the shadows, so autograd puts g_act
in `param.grad` and g_ret in `shadow.grad`: one forward and one backward over 16 + 8 rows instead of a
16-row and an 8-row pass each (half the kernel launches; docs/benchmarks.md). With gradient
checkpointing the split stays installed until the backward's recomputation is over (`close`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoraRowSplit:
    """Install on `model` for a batch of `rows` rows whose first `k` are the task rows.

    params: the trainable LoRA parameters [(name, param)] (their owners must be nn.Linear without a
    trainable bias: peft's lora_A / lora_B). `shadows[i]` belongs to params[i]."""

    def __init__(self, model: nn.Module, params: list, k: int, rows: int):
        self.k, self.rows = int(k), int(rows)
        self.shadows: list[torch.Tensor] = []
        self._patched: list[nn.Module] = []
        owners = dict(model.named_modules())
        for name, p in params:
            mod_name, _, leaf = name.rpartition(".")
            mod = owners.get(mod_name)
            if (
                not isinstance(mod, nn.Linear)
                or leaf != "weight"
                or (mod.bias is not None and mod.bias.requires_grad)
            ):
                self.close()
                raise ValueError(
                    f"LoraRowSplit: trainable parameter {name} is not the weight of a bias-free "
                    "Linear (a LoRA A/B matrix): set method.craft.fused_forward: false"
                )
            shadow = p.detach().requires_grad_(True)  # same storage, own .grad
            self.shadows.append(shadow)
            mod.forward = self._forward(mod, shadow)  # instance attribute: nn.Module.__call__ uses it
            self._patched.append(mod)

    def _forward(self, mod: nn.Linear, shadow: torch.Tensor):
        k, rows = self.k, self.rows

        def forward(x):
            if x.shape[0] != rows:
                raise RuntimeError(
                    f"LoraRowSplit: a LoRA layer got a tensor of {x.shape[0]} rows, the batch has {rows}: this "
                    "model does not keep the batch dimension first; set method.craft.fused_forward: false"
                )
            out = _RowSplitLinear.apply(x, mod.weight, shadow, k)
            return out if mod.bias is None else out + mod.bias

        return forward

    def shadow_grads(self) -> list[torch.Tensor | None]:
        return [s.grad for s in self.shadows]

    def close(self) -> None:
        for mod in self._patched:
            mod.__dict__.pop("forward", None)
        self._patched, self.shadows = [], []


class _RowSplitLinear(torch.autograd.Function):
    """y = x W^T in one matmul; backward: dx = g W (one matmul), dW from rows [0, k) into W and from
    rows [k, B) into the shadow (two matmuls on row slices: the same FLOPs as one). The autocast state
    of the forward is the backward's too, so the matmuls run in the dtypes `F.linear` would use (the
    engine casts each weight gradient to its parameter's dtype)."""

    @staticmethod
    def forward(ctx, x, weight, shadow, k):
        dev = x.device.type
        ctx.autocast = (
            torch.is_autocast_enabled(dev),
            torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None,
            dev,
        )
        ctx.k = int(k)
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        on, dtype, dev = ctx.autocast
        k = ctx.k
        with torch.autocast(dev, dtype=dtype, enabled=on) if on else _nullcontext():
            gx = g @ (weight.to(dtype) if on else weight) if ctx.needs_input_grad[0] else None
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            per = g.numel() // (g.shape[0] * g.shape[-1])  # tokens per row
            n = k * per
            gw = g2[:n].t() @ x2[:n] if ctx.needs_input_grad[1] else None
            gs = g2[n:].t() @ x2[n:] if ctx.needs_input_grad[2] else None
        return gx, gw, gs, None


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()
