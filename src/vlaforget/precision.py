"""The precision a model's config names, on CUDA too: no TF32 for an fp32 model (issue 27).

On CUDA, torch lets cuDNN run fp32 convolutions in TF32 by default (`torch.backends.cudnn.allow_tf32`
is True; cuBLAS matmuls are full fp32 unless asked otherwise). TF32 keeps 10 mantissa bits, so a
model configured `dtype: fp32` gets ~1e-3 relative error in every convolution (the ViT patch
embedding of the tiny VLA and OpenVLA's towers) on a GPU and none on a CPU (on an H100 it changed the
outcome of 2 of 360 teacher episodes; what separates a CPU's evaluations from a GPU's is the renderer,
docs/benchmarks.md "Issue 27: why the CPU and the GPU disagree"). The train, eval and forgetting stages call
`exact_fp32(model.dtype)` before they load a model, so an fp32 model computes in fp32 on every
device. bf16 / fp16 models are left alone (TF32 does not touch their arithmetic).

The model, probe and ICSM stages do not call it (so their ids, and the committed studies' teacher,
stay as they were); they run on the GPU once per study.
"""

from __future__ import annotations

FP32_NAMES = ("fp32", "float32", "torch.float32")


def exact_fp32(dtype: str | None) -> bool:
    """Turn TF32 off for cuDNN and cuBLAS when `dtype` (a config's model.dtype; None = fp32) is fp32.

    Returns whether it did. Process-wide (torch's switches are); a no-op without CUDA."""
    if str(dtype or "fp32").lower() not in FP32_NAMES:
        return False
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return True
