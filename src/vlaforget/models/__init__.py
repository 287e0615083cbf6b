"""Model backends behind one protocol (docs/DEVELOPMENT.md, "Models"): OpenVLA-7B and the tiny VLA.

`load_backend(model_block, device, adapter_dir, stats)` is the only entry point the rest of the
package uses; nothing outside `models/` knows which backend it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

DTYPES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp64": "float64",
}  # fp64: icsm.sensitivity_dtype


def torch_dtype(name: str | None):
    import torch

    return getattr(torch, DTYPES.get(name or "fp32", "float32"))


def _load_stats(stats: Any, key: str | None):
    if stats is None:
        return None
    if isinstance(stats, (str, Path)):
        from .base import read_stats_file

        return read_stats_file(stats, key)
    from .action_tokenizer import action_stats

    return action_stats(stats, key)


def load_backend(
    model_block: Mapping[str, Any],
    device: str = "cpu",
    adapter_dir: str | Path | None = None,
    stats: Any = None,
):
    """A VLABackend for a stage config's `model` block.

    model_block: backend ("tiny" | "openvla"), path (dir or hub id), dtype, cache_dir,
    attn_implementation, optional unnorm_key. adapter_dir: a PEFT LoRA adapter (train stage's
    `final/`) merged into the weights. stats: the action statistics used to normalise (collate) and
    un-normalise (predict_actions): a dataset's entry of dataset_statistics.json, the whole file's
    dict (with unnorm_key), or a path to it. Default: the model's own statistics (the tiny teacher's
    upstream data; OpenVLA's norm_stats[unnorm_key])."""
    backend = model_block.get("backend")
    key = model_block.get("unnorm_key")
    if backend == "tiny":
        from .tiny import TinyBackend

        b = TinyBackend.from_dir(
            model_block["path"], device=device, dtype=torch_dtype(model_block.get("dtype"))
        )
    elif backend == "openvla":
        from .openvla import OpenVLABackend

        b = OpenVLABackend.load(model_block, device=device)
    else:
        raise ValueError(f"unknown model.backend '{backend}': use 'tiny' or 'openvla'")
    if adapter_dir is not None:
        attach_adapter(b, adapter_dir)
    if stats is not None:
        b.set_stats(_load_stats(stats, key))
    return b


def attach_adapter(backend, adapter_dir: str | Path, merge: bool = True) -> None:
    """Load a PEFT adapter saved by the train stage into backend.model (merged by default)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{adapter_dir} holds no PEFT adapter (adapter_config.json missing): "
            "run the train stage for this run first, or check adapter_dir"
        )
    from peft import PeftModel

    model = PeftModel.from_pretrained(backend.model, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
    model.to(backend.device).eval()
    backend.model = model


__all__ = ["attach_adapter", "load_backend", "torch_dtype"]
