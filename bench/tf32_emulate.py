"""Run a vlaforget command with the CPU emulating cuDNN's TF32 convolutions (issue 27).

    python bench/tf32_emulate.py eval --config CFG --threads 1

On CUDA, torch lets cuDNN compute fp32 convolutions in TF32 by default: both operands rounded to 10
mantissa bits, products accumulated in fp32. This patches `torch.nn.functional.conv2d` (the ViT patch
embedding is the tiny VLA's only convolution) to round input and weight the same way, then runs
`vlaforget.cli.main` with the given arguments: what a GPU with TF32 would compute, on the CPU,
without any other GPU difference (renderer, kernels). Used to ask whether TF32 alone is enough to
change the closed-loop episodes (docs/benchmarks.md "Issue 27: why the CPU and the GPU disagree").
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (10 explicit mantissa bits), kept as fp32."""
    if x.dtype != torch.float32:
        return x
    i = x.contiguous().view(torch.int32)
    i = (i + 0x1000) & ~0x1FFF  # round half up at bit 13, drop the 13 low mantissa bits
    return i.view(torch.float32)


_conv2d = F.conv2d


def conv2d_tf32(input, weight, bias=None, *args, **kwargs):
    return _conv2d(round_tf32(input), round_tf32(weight), bias, *args, **kwargs)


def main() -> int:
    F.conv2d = conv2d_tf32
    torch.nn.modules.conv.F.conv2d = conv2d_tf32
    from vlaforget.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
