"""precision.exact_fp32: an fp32 model computes in fp32 on CUDA too (no TF32), issue 27."""

from __future__ import annotations

import inspect

import pytest
import torch

from vlaforget import codedeps
from vlaforget.precision import exact_fp32


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype", ["fp32", "float32", None, "FP32"])
def test_fp32_turns_tf32_off(tf32_flags, dtype):
    torch.backends.cudnn.allow_tf32 = True  # torch's default for cuDNN
    torch.backends.cuda.matmul.allow_tf32 = True
    assert exact_fp32(dtype) is True
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is False


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "bfloat16"])
def test_half_precision_left_alone(tf32_flags, dtype):
    torch.backends.cudnn.allow_tf32 = True
    assert exact_fp32(dtype) is False
    assert torch.backends.cudnn.allow_tf32 is True


@pytest.mark.parametrize(
    ("stage", "loads"),
    [("eval", "load_backend("), ("forgetting", "load_backend("), ("train", "run_training(")],
)
def test_stages_set_precision_before_loading(stage, loads):
    """The stages that run trained models call exact_fp32 before a model is loaded or trained."""
    import importlib

    src = inspect.getsource(importlib.import_module(f"vlaforget.stages.{stage}").main)
    assert "exact_fp32(" in src, f"stages/{stage}.py main() does not call exact_fp32"
    assert src.index("exact_fp32(") < src.index(loads)
    assert "precision.py" in codedeps.code_files(stage)


@pytest.mark.parametrize("stage", ["model", "probe", "icsm"])
def test_teacher_stages_untouched(stage):
    """The teacher, probe and ICSM keep their code (and ids): precision.py is not in their recipe."""
    assert "precision.py" not in codedeps.code_files(stage)
