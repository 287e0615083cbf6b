"""A tiny random checkpoint of OpenVLA's REAL HF architecture, built from openvla's own modelling code.

    python -m vlaforget.models.openvla_tiny --code $VLAFORGET_OPENVLA_CODE --out DIR

`--code` is a folder holding openvla's public prismatic/extern/hf/{configuration,modeling,processing}
_prismatic.py (never part of this repository). The checkpoint is laid out like openvla/openvla-7b on
the hub (config.json with `auto_map`, safetensors, the three remote-code files, preprocessor and
tokenizer files), so `AutoModelForVision2Seq.from_pretrained(DIR, trust_remote_code=True)` loads it
in any process with openvla's stack (timm 0.9.10-0.9.16, transformers 4.40.1):

- vision: OpenVLA's fused two-tower backbone (`dinosiglip-vit-so-224px`: 224 px, patch 14, 256
  patches, second-to-last-layer patch features of both towers concatenated), with REAL registered
  timm ids so no registration code is needed in the loading process. Default towers: DINOv2-S/14
  with 4 registers (OpenVLA's DINOv2-reg4 family at small width) and DINOv2-S/14 without (~22 M
  parameters each; OpenVLA's own `vit_large_patch14_reg4_dinov2.lvd142m` +
  `vit_so400m_patch14_siglip_224` are ~700 M and can be chosen with --timm-ids).
- projector: `no-align+fused-gelu-mlp`, as openvla-7b.
- LLM: a random Llama with openvla-7b's vocabulary layout (32000 + <PAD>, padded to 32064; the last
  256 ids below 32000 are the action tokens) at toy width.
- tokenizer: a sentencepiece-style BPE with Llama's ids for <unk> <s> </s>, the bare "▁" at 29871
  (openvla's predict_action appends it literally) and <PAD> at 32000.
- norm_stats: like openvla-7b's config.json, one entry per unnorm key (default: `bridge_orig`, one of
  openvla-7b's, with unit statistics: q01 = -1, q99 = 1, gripper unmasked; --norm-stats JSON
  {key: {"action": {...}}} replaces them). The study normalises with the training suite's statistics
  from its cache; these exist because openvla's predict_action and `vlaforget preflight` expect them.

Random weights: numbers from it mean nothing; it exists to run the real code path (docs/models.md).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import string
import sys
import tempfile
from pathlib import Path

FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
VOCAB_END = 32000  # text vocab 32064 - pad_to_multiple_of 64; <PAD> = 32000
EMPTY_ID = 29871
DEFAULT_TIMM_IDS = ("vit_small_patch14_reg4_dinov2.lvd142m", "vit_small_patch14_dinov2.lvd142m")
DEFAULT_TEXT = {
    "vocab_size": 32064,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": 32000,
    "torch_dtype": "float32",
}
CORPUS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "open the top drawer and put the bowl inside",
    "put the cream cheese in the bowl",
    "turn on the stove and put the moka pot on it",
    "push the plate to the front of the stove",
    "what is on the table",
)


def unit_norm_stats(action_dim: int = 7) -> dict:
    """One norm_stats entry with the layout of openvla-7b's (action q01/q99/mask and friends)."""
    lo, hi = [-1.0] * action_dim, [1.0] * action_dim
    stats = {
        "q01": lo,
        "q99": hi,
        "min": lo,
        "max": hi,
        "mean": [0.0] * action_dim,
        "std": [1.0] * action_dim,
        "mask": [True] * (action_dim - 1) + [False],
    }
    return {"action": stats}


DEFAULT_NORM_STATS = {"bridge_orig": unit_norm_stats()}


class OpenVLACodeMissing(RuntimeError):
    user_facing = True


def check_code_dir(code: str | Path | None) -> Path:
    """The folder with openvla's three modelling files, or OpenVLACodeMissing naming the fix."""
    if not code:
        raise OpenVLACodeMissing(
            "no openvla modelling code: set VLAFORGET_OPENVLA_CODE (or --code) to a folder holding "
            "openvla's prismatic/extern/hf/*.py (docs/models.md)"
        )
    missing = [f for f in FILES if not (Path(code) / f).exists()]
    if missing:
        raise OpenVLACodeMissing(
            f"{code} lacks {missing} (openvla's prismatic/extern/hf/*.py; docs/models.md)"
        )
    return Path(code)


def llama_like_tokenizer(corpus=CORPUS):
    """Sentencepiece-style BPE with 32000 ids (fillers up to 31999) + <PAD> at 32000, like openvla's.
    Every printable character is in the alphabet, so any instruction encodes without <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    from .prompts import action_prompt, vqa_prompt

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    # punctuation and newlines are pieces of their own, as in Llama's sentencepiece ("▁plate", "?",
    # "<0x0A>", "Out", ":"): without the split the toy BPE learns "▁plate?\nOut:" as ONE token and no
    # instruction span is exact (the probe stage's audit flagged every span in the rehearsal)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Split("\n", "isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    text = [action_prompt(s) for s in corpus] * 5 + [vqa_prompt(corpus[-1]) + " a bowl"] * 3
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=list(string.printable.strip()) + ["▁"],
    )
    tok.train_from_iterator(text, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    n = len(vocab)
    for i in range(n, VOCAB_END):
        vocab[f"<unused_{i}>"] = i
    old = vocab["▁"]  # Llama's bare "▁" is id 29871
    vocab["▁"], vocab[f"<unused_{EMPTY_ID}>"] = EMPTY_ID, old
    vocab = {k: v for k, v in vocab.items() if k != f"<unused_{EMPTY_ID}>"}
    vocab[f"<unused_{old}>"] = old
    spec["model"]["vocab"] = vocab
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
    )
    fast.add_special_tokens({"pad_token": "<PAD>"})
    fast.padding_side = "right"
    assert fast.pad_token_id == VOCAB_END and fast.convert_tokens_to_ids("▁") == EMPTY_ID
    return fast


def _import_code(code: Path, tmp: Path):
    """openvla's modules as a package (modeling_prismatic imports `.configuration_prismatic`)."""
    pkg = tmp / "openvla_tiny_code"
    pkg.mkdir()
    for f in FILES:
        shutil.copy(code / f, pkg / f)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp))
    try:
        return (
            importlib.import_module("openvla_tiny_code.configuration_prismatic"),
            importlib.import_module("openvla_tiny_code.modeling_prismatic"),
            importlib.import_module("openvla_tiny_code.processing_prismatic"),
        )
    finally:
        sys.path.remove(str(tmp))


def build(
    code: str | Path,
    out: str | Path,
    timm_ids=DEFAULT_TIMM_IDS,
    text_config: dict | None = None,
    norm_stats: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write the checkpoint to `out` (replaced if present). Returns `out`."""
    import torch

    code = check_code_dir(code)
    out = Path(out)
    with tempfile.TemporaryDirectory() as t:
        conf_mod, model_mod, proc_mod = _import_code(code, Path(t))
        cfg = conf_mod.OpenVLAConfig(
            vision_backbone_id="dinosiglip-vit-so-224px",
            llm_backbone_id="llama2-7b-pure",
            arch_specifier="no-align+fused-gelu-mlp",
            image_resize_strategy="resize-naive",
            text_config=dict(text_config or DEFAULT_TEXT),
            norm_stats=norm_stats or DEFAULT_NORM_STATS,
            n_action_bins=256,
            timm_model_ids=list(timm_ids),
            pad_to_multiple_of=64,
        )
        cfg.auto_map = {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        }
        torch.manual_seed(seed)
        model = model_mod.OpenVLAForActionPrediction(cfg)
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(str(out))
        improc = proc_mod.PrismaticImageProcessor(
            use_fused_vision_backbone=True,
            image_resize_strategy="resize-naive",
            input_sizes=[(3, 224, 224)] * 2,
            interpolations=["bicubic", "bicubic"],
            means=[(0.485, 0.456, 0.406), (0.5, 0.5, 0.5)],
            stds=[(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)],
        )
        improc.auto_map = {
            "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
            "AutoProcessor": "processing_prismatic.PrismaticProcessor",
        }
        proc = proc_mod.PrismaticProcessor(image_processor=improc, tokenizer=llama_like_tokenizer())
        proc.save_pretrained(str(out))
    for f in FILES:
        shutil.copy(code / f, out / f)
    p = out / "preprocessor_config.json"  # AutoProcessor resolves the class through auto_map
    d = json.loads(p.read_text())
    d["auto_map"] = improc.auto_map
    p.write_text(json.dumps(d, indent=2))
    n = sum(x.numel() for x in model.parameters())
    (out / "vlaforget_tiny.json").write_text(
        json.dumps(
            {
                "built_by": "vlaforget.models.openvla_tiny",
                "timm_model_ids": list(timm_ids),
                "text_config": dict(text_config or DEFAULT_TEXT),
                "seed": seed,
                "parameters": n,
            },
            indent=2,
        )
    )
    return out


# openvla-7b's config.json: `dinosiglip-vit-so-224px` (these timm ids) + Llama-2-7B
FULL_TIMM_IDS = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224")
FULL_TEXT = {
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "pad_token_id": 32000,
    "rms_norm_eps": 1e-6,
}


def full_size_backend(code: str | Path, device="meta", dtype=None, layers: int | None = None):
    """OpenVLA-7B's REAL architecture (openvla's modelling code from `code`) at full size with random
    weights, built directly on `device` (no checkpoint; "meta" allocates nothing, "cuda" initialises
    on the GPU): both timm towers with `pretrained=False` (prismatic's own call), the fused projector
    2176 -> 8704 -> 4096 -> 4096, Llama-2-7B. For `vlaforget bench train --backend openvla`."""
    import torch

    from .openvla import OpenVLABackend

    code = check_code_dir(code)
    dtype = dtype or torch.bfloat16
    text = dict(FULL_TEXT)
    if layers is not None:
        text["num_hidden_layers"] = int(layers)
    tmp = Path(tempfile.mkdtemp(prefix="vlaforget-openvla-code-"))
    conf_mod, model_mod, proc_mod = _import_code(code, tmp)
    cfg = conf_mod.OpenVLAConfig(
        vision_backbone_id="dinosiglip-vit-so-224px",
        llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp",
        image_resize_strategy="resize-naive",
        text_config=text,
        norm_stats=DEFAULT_NORM_STATS,
        n_action_bins=256,
        timm_model_ids=list(FULL_TIMM_IDS),
        pad_to_multiple_of=64,
    )
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    if str(device) == "meta":  # timm's constructor calls .item() (drop-path rule): no meta tensors
        from accelerate import init_empty_weights

        where = init_empty_weights()
    else:
        where = torch.device(device)
    try:
        with where:
            model = model_mod.OpenVLAForActionPrediction(cfg)
    finally:
        torch.set_default_dtype(prev)
    improc = proc_mod.PrismaticImageProcessor(
        use_fused_vision_backbone=True,
        image_resize_strategy="resize-naive",
        input_sizes=[(3, 224, 224)] * 2,
        interpolations=["bicubic", "bicubic"],
        means=[(0.485, 0.456, 0.406), (0.5, 0.5, 0.5)],
        stds=[(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)],
    )
    proc = proc_mod.PrismaticProcessor(image_processor=improc, tokenizer=llama_like_tokenizer())
    return OpenVLABackend(model, proc, device=device)


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(
        prog="python -m vlaforget.models.openvla_tiny", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--code",
        default=os.environ.get("VLAFORGET_OPENVLA_CODE"),
        help="openvla's prismatic/extern/hf folder (default: env VLAFORGET_OPENVLA_CODE)",
    )
    p.add_argument("--out", required=True, help="checkpoint folder to write (replaced)")
    p.add_argument(
        "--timm-ids",
        nargs=2,
        default=list(DEFAULT_TIMM_IDS),
        metavar=("DINO", "FUSED"),
        help="registered timm ids of the two towers (224 px, patch 14)",
    )
    p.add_argument("--norm-stats", default=None, help="JSON file {unnorm_key: {'action': {...}}}")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        ns = json.loads(Path(a.norm_stats).read_text()) if a.norm_stats else None
        out = build(a.code, a.out, timm_ids=a.timm_ids, norm_stats=ns, seed=a.seed)
    except OpenVLACodeMissing as e:
        print(f"vlaforget: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / "vlaforget_tiny.json").read_text())
    print(
        f"tiny OpenVLA checkpoint: {out} ({info['parameters'] / 1e6:.1f} M parameters, towers {a.timm_ids})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
