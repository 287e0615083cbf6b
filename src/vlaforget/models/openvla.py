"""OpenVLA-7B backend: openvla's own HF modelling code (trust_remote_code) behind the protocol.

Loads `AutoModelForVision2Seq` + `AutoProcessor` from a local directory or a hub id resolved in
`cache_dir` (offline: set HF_HUB_OFFLINE=1 once the weights are there). Layers live at
`language_model.model.layers` (PEFT: `base_model.model.`, DDP: `module.` in front). Prompts, labels,
action tokens and un-normalisation follow openvla's finetune.py / `predict_action` exactly: the
prompt is followed by the empty token "▁" (29871) before the action tokens; action ids are the last
256 ids below vocab_end = text vocab − pad_to_multiple_of (= 32000).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .base import VLABackend, images_to_uint8, unwrap_model

EMPTY_TOKEN = "▁"  # sentencepiece's bare space; openvla's predict_action appends id 29871
DEFAULT_EMPTY_ID = 29871


class OpenVLAUnavailable(UserError, RuntimeError):
    """The OpenVLA model or its stack cannot be loaded offline; the message says what is missing."""


def cache_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot folder of an HF hub cache repo folder (`.../models--org--name`): the one
    refs/main names, else the only one; None if `repo_dir` is not such a folder."""
    snaps = repo_dir / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = snaps / ref.read_text().strip()
        return snap if snap.is_dir() else None
    found = [d for d in snaps.iterdir() if d.is_dir()]
    return found[0] if len(found) == 1 else None


def resolve_model_path(path: str, cache_dir: str | None = None) -> Path:
    """A local directory holding config.json, read in place (nothing is copied or downloaded):
    `path` itself; the snapshot of `path` when it is a hub-cache repo folder
    (`{cache}/models--openvla--openvla-7b`); or the snapshot of hub id `path` in `cache_dir` (an HF
    hub cache, e.g. the user's `/opt/data/private/openvla_icms/hf_cache`; no network). Raises
    OpenVLAUnavailable naming the fix."""
    p = Path(path).expanduser()
    if p.exists():
        snap = cache_snapshot(p) if not (p / "config.json").exists() else None
        if snap is not None:
            p = snap
        if not (p / "config.json").exists():
            raise OpenVLAUnavailable(
                f"model.path {p} has no config.json: point model.path at the folder "
                "holding openvla-7b's config.json, *.safetensors and modelling files"
            )
        return p
    if path.startswith(("/", ".", "~")):
        raise OpenVLAUnavailable(f"model.path {p} does not exist: copy openvla-7b there or set model.path")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=path, cache_dir=cache_dir, local_files_only=True)
    except Exception as e:  # not in the cache
        raise OpenVLAUnavailable(
            f"model '{path}' is not available offline in cache_dir={cache_dir} ({type(e).__name__}). "
            f"Fix: if it is already in another HF cache (a folder holding models--{path.replace('/', '--')}/), "
            f"set model.cache_dir to that folder (read in place); otherwise, on a machine with network, run "
            f"`huggingface-cli download {path} --cache-dir {cache_dir}` "
            f'(or `HF_HOME=... python -c "from huggingface_hub import snapshot_download; '
            f"snapshot_download('{path}', cache_dir='{cache_dir}')\"`), then rerun with HF_HUB_OFFLINE=1; "
            f"or set model.path to a local copy."
        ) from e
    return Path(local)


def check_remote_code(path: Path) -> dict:
    """What the model folder declares (config.json auto_map) and whether those files are present."""
    import json

    cfg = json.loads((path / "config.json").read_text())
    auto = cfg.get("auto_map") or {}
    files = sorted({v.split(".")[0] + ".py" for v in auto.values() if isinstance(v, str) and "--" not in v})
    missing = [f for f in files if not (path / f).exists()]
    weights = sorted(x.name for x in path.glob("*.safetensors")) + sorted(x.name for x in path.glob("*.bin"))
    return {
        "path": str(path),
        "architectures": cfg.get("architectures"),
        "model_type": cfg.get("model_type"),
        "auto_map": auto,
        "code_files": files,
        "missing_code_files": missing,
        "weight_files": weights,
        "norm_stats_keys": sorted((cfg.get("norm_stats") or {}).keys()),
        "text_vocab": (cfg.get("text_config") or {}).get("vocab_size"),
        "pad_to_multiple_of": cfg.get("pad_to_multiple_of"),
    }


class OpenVLABackend(VLABackend):
    name = "openvla"

    def __init__(
        self,
        model,
        processor,
        device="cpu",
        stats=None,
        unnorm_key: str | None = None,
        source_dir: str | Path | None = None,
    ):
        self.processor = processor
        self.source_dir = Path(source_dir) if source_dir is not None else None  # save() copies its code
        tok = processor.tokenizer
        cfg = model.config
        vocab_end = int(cfg.text_config.vocab_size) - int(getattr(cfg, "pad_to_multiple_of", 0) or 0)
        n_img = int(model.vision_backbone.featurizer.patch_embed.num_patches)
        norm_stats = getattr(cfg, "norm_stats", None) or {}
        self.norm_stats = norm_stats
        if stats is None and norm_stats:
            key = unnorm_key
            if key is None and len(norm_stats) == 1:
                key = next(iter(norm_stats))
            if key is not None:
                if key not in norm_stats:
                    raise ValueError(
                        f"unnorm_key '{key}' not in the model's norm_stats; available: "
                        f"{', '.join(sorted(norm_stats))}"
                    )
                stats = norm_stats[key]
        empty = tok.convert_tokens_to_ids(EMPTY_TOKEN)
        if empty is None or empty == tok.unk_token_id:
            empty = DEFAULT_EMPTY_ID
        super().__init__(
            model,
            tok,
            n_image_tokens=n_img,
            action_dim=7,
            vocab_end=vocab_end,
            device=device,
            stats=stats,
            action_sep_ids=[int(empty)],
            n_bins=int(getattr(cfg, "n_action_bins", 256)),
        )

    def pixel_values(self, images) -> torch.Tensor:
        from PIL import Image

        arr = images_to_uint8(images)
        pil = [Image.fromarray(a).convert("RGB") for a in arr]
        return self.processor.image_processor(pil, return_tensors="pt")["pixel_values"]

    def host_pixel_values(self, images) -> torch.Tensor:
        """openvla's image processor is CPU work: all of it runs on the host (in DataLoader workers)."""
        return self.pixel_values(images)

    @torch.no_grad()
    def _greedy(self, prompts, pixel_values, steps, allowed, stop_at_eos, model):
        """KV-cached batched greedy decoding (base `_greedy_cached`): one multimodal prefill through
        openvla's forward, then single-token steps straight into its `language_model`.

        openvla's own cached path (`input_ids.shape[1] == 1`) asserts batch size 1 and passes no
        attention mask or position ids, which is wrong for right-padded batches; the Llama under it
        takes both, so each row appends at its own position with its padding masked."""
        return self._greedy_cached(prompts, pixel_values, steps, allowed, stop_at_eos, model)

    def checkpoint_targets(self, model):
        """Every block of both timm towers (DINOv2 `featurizer`, SigLIP `fused_featurizer`) and the
        projector. timm's own `set_grad_checkpointing` does not reach them: openvla's featurizers run
        `get_intermediate_layers`, whose block loop (timm 0.9.x `_intermediate_layers`) ignores
        `grad_checkpointing`; it is honoured only by `forward_features`."""
        out = []
        vb = getattr(model, "vision_backbone", None)
        for tower in ("featurizer", "fused_featurizer"):
            blocks = getattr(getattr(vb, tower, None), "blocks", None)
            if blocks is not None:
                out += [(f"vision_backbone.{tower}.blocks.{i}", b) for i, b in enumerate(blocks)]
        return out + super().checkpoint_targets(model)

    def _decode_module(self, m):
        return unwrap_model(m).language_model

    def save(self, out_dir: str | Path, norm_stats: Mapping[str, Any] | None = None) -> Path:
        """A folder openvla's own code loads unchanged (`get_vla`, `predict_action`,
        run_libero_eval.py), laid out like finetune.py's merged checkpoints: weights + config.json,
        the processor, the remote-code files of the base, and `dataset_statistics.json`.

        norm_stats {unnorm_key: dataset statistics}: added to `config.norm_stats` (the base's keys
        stay) and written alone to dataset_statistics.json, which `get_vla` loads over
        `vla.norm_stats` as finetune.py's checkpoints expect."""
        import json
        import shutil

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = unwrap_model(self.model)
        if norm_stats:
            merged = {**(getattr(model.config, "norm_stats", None) or {}), **_plain(dict(norm_stats))}
            model.config.norm_stats = merged
            model.norm_stats = merged
        model.save_pretrained(str(out), safe_serialization=True)
        self.processor.save_pretrained(str(out))
        src = self.source_dir
        if src is not None:
            # remote code: every .py an auto_map names, and the auto_map entries themselves where
            # save_pretrained dropped them (AutoProcessor resolves its class through them)
            for name in (
                "config.json",
                "preprocessor_config.json",
                "processor_config.json",
                "tokenizer_config.json",
            ):
                base_file, out_file = Path(src) / name, out / name
                if not (base_file.exists() and out_file.exists()):
                    continue
                auto = json.loads(base_file.read_text()).get("auto_map")
                if not auto:
                    continue
                for ref in auto.values():
                    for r in ref if isinstance(ref, list) else [ref]:
                        if isinstance(r, str) and "--" not in r:
                            f = Path(src) / (r.split(".")[0] + ".py")
                            if f.exists() and not (out / f.name).exists():
                                shutil.copy2(f, out / f.name)
                d = json.loads(out_file.read_text())
                if "auto_map" not in d:
                    d["auto_map"] = auto
                    out_file.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        if norm_stats:
            (out / "dataset_statistics.json").write_text(json.dumps(_plain(dict(norm_stats)), indent=2))
        return out

    @classmethod
    def load(cls, model_block: Mapping[str, Any], device="cpu") -> OpenVLABackend:
        try:
            from transformers import AutoModelForVision2Seq, AutoProcessor
        except ImportError as e:  # transformers 5 removed AutoModelForVision2Seq
            import transformers

            raise OpenVLAUnavailable(
                f"transformers {transformers.__version__} cannot load OpenVLA ({e}): its remote code needs "
                "transformers 4.40.1, tokenizers 0.19.1, timm 0.9.10-0.9.16. Fix: run the jobs in the env "
                "of `make real-env` (profiles/4090 etc. do: job_python), or pip install transformers==4.40.1 "
                "tokenizers==0.19.1 timm==0.9.16 peft==0.11.1; check with `vlaforget preflight`"
            ) from e

        from ..settings import model_dtype
        from . import torch_dtype

        cache_dir = model_block.get("cache_dir")
        path = resolve_model_path(str(model_block["path"]), cache_dir)
        dtype = torch_dtype(model_dtype(model_block))
        kw: dict[str, Any] = {"trust_remote_code": True, "torch_dtype": dtype}
        if cache_dir:
            kw["cache_dir"] = cache_dir
        if model_block.get("attn_implementation"):
            kw["attn_implementation"] = model_block["attn_implementation"]
        try:
            model = AutoModelForVision2Seq.from_pretrained(str(path), low_cpu_mem_usage=True, **kw)
        except (ImportError, RuntimeError) as e:  # torchvision/torch mismatch: RuntimeError
            if isinstance(e, RuntimeError) and "torchvision" not in str(e):
                raise
            raise OpenVLAUnavailable(
                f"loading OpenVLA's remote code failed ({e}). It needs timm 0.9.10–0.9.16 "
                "(pip install 'timm==0.9.10') and a torchvision matching torch, and is tested with "
                "transformers 4.40.1, tokenizers 0.19.1 (make real-env; `vlaforget preflight` checks it)"
            ) from e
        processor = AutoProcessor.from_pretrained(
            str(path), trust_remote_code=True, **({"cache_dir": cache_dir} if cache_dir else {})
        )
        model.to(device).eval()
        return cls(model, processor, device=device, unnorm_key=model_block.get("unnorm_key"), source_dir=path)


def _plain(obj):
    """JSON-ready copy (numpy arrays and scalars to lists and numbers), as finetune.py writes."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def offline_env(cache_dir: str | None) -> None:
    """Make HF libraries resolve from cache only (the machines have no network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if cache_dir:
        os.environ.setdefault("HF_HUB_CACHE", str(cache_dir))
