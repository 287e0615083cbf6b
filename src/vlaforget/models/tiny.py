"""The tiny VLA: OpenVLA's wiring at toy size, built from transformers components.

`vision_backbone` (ViTModel, patch tokens without CLS) -> `projector` (2-layer MLP) -> `language_model`
(LlamaForCausalLM). The LLM sees [<s>, image patch embeddings, text tokens 1..] exactly like
OpenVLA, so text position t ≥ 1 sits at sequence position t + n_image_tokens. The tokenizer is a
word-level `tokenizers` model trained here on the instruction + VQA corpus, with <pad> <s> </s> <unk>
first and 256 action tokens as the LAST ids (vocab_end = len(tokenizer)). Saved as a standard HF
directory: config.json + model.safetensors + tokenizer files (+ dataset_statistics.json).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel, ViTConfig, ViTModel

from .base import VLABackend, images_to_uint8
from .prompts import ACTION_PREFIX, ACTION_SUFFIX, VQA_PREFIX

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# Small sizes for tests and quick experiments (random init, builds in well under a second).
TEST_TINY = {
    "image_size": 32,
    "patch_size": 8,
    "vision_hidden": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "hidden": 32,
    "layers": 8,
    "heads": 2,
    "intermediate": 64,
    "vocab_words": 200,
}

# Built-in corpus so a random model can be made without data (teammates' tests).
DEFAULT_CORPUS = [
    "press the button from the top",
    "open the drawer",
    "open the door",
    "slide the plate into the goal",
    "close the drawer",
    "press the button",
    "push the block to the goal",
    "pick up the block",
    "is the gripper open",
    "is the object left of the goal",
    "is the hand above the table",
    "which task is this",
    "yes",
    "no",
    "left",
    "right",
    "drawer",
    "door",
    "button",
    "plate",
]


class TinyVLAConfig(PretrainedConfig):
    model_type = "tinyvla"

    def __init__(
        self,
        vision: dict | None = None,
        llm: dict | None = None,
        vision_fused: dict | None = None,
        feature_layer: int = -1,
        image_size: int = 64,
        patch_size: int = 8,
        action_dim: int = 4,
        n_action_bins: int = 256,
        vocab_end: int | None = None,
        **kwargs,
    ):
        self.vision = dict(vision or {})
        self.llm = dict(llm or {})
        # a second tower fused as prismatic does (OpenVLA's DINOv2 + SigLIP): patch features of both,
        # concatenated along channels, into a 3-layer GELU projector; None = one tower, 2-layer MLP
        self.vision_fused = dict(vision_fused) if vision_fused else None
        # which hidden state the patch features come from: -1 = the tower's last_hidden_state (after
        # its final LayerNorm), -2 = the second-to-last block's output (prismatic's choice)
        self.feature_layer = int(feature_layer)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.action_dim = int(action_dim)
        self.n_action_bins = int(n_action_bins)
        self.vocab_end = vocab_end
        super().__init__(**kwargs)

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def tiny_config(
    tiny: Mapping[str, Any],
    vocab_size: int,
    *,
    pad_id: int = 0,
    bos_id: int = 1,
    eos_id: int = 2,
    action_dim: int = 4,
    vocab_end: int | None = None,
    model_vocab: int | None = None,
) -> TinyVLAConfig:
    """TinyVLAConfig from the `model.tiny` block of the study config."""

    def tower(prefix: str) -> dict:
        return {
            "hidden_size": tiny[f"{prefix}_hidden"],
            "num_hidden_layers": tiny[f"{prefix}_layers"],
            "num_attention_heads": tiny[f"{prefix}_heads"],
            "intermediate_size": tiny.get(f"{prefix}_intermediate", 4 * tiny[f"{prefix}_hidden"]),
            "image_size": tiny["image_size"],
            "patch_size": tiny["patch_size"],
            "num_channels": 3,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }

    vision = tower("vision")
    fused = tower("fused_vision") if "fused_vision_hidden" in tiny else None
    llm = {
        "vocab_size": model_vocab or vocab_size,
        "hidden_size": tiny["hidden"],
        "num_hidden_layers": tiny["layers"],
        "num_attention_heads": tiny["heads"],
        "num_key_value_heads": tiny.get("kv_heads", tiny["heads"]),
        "intermediate_size": tiny["intermediate"],
        "max_position_embeddings": tiny.get("max_positions", 1024),
        "pad_token_id": pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
    }
    return TinyVLAConfig(
        vision=vision,
        llm=llm,
        vision_fused=fused,
        feature_layer=int(tiny.get("feature_layer", -1)),
        image_size=tiny["image_size"],
        patch_size=tiny["patch_size"],
        action_dim=action_dim,
        vocab_end=vocab_end if vocab_end is not None else vocab_size,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )


class Projector(nn.Module):
    """openvla's MLP projector (GELU), vision width -> LLM width."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class FusedProjector(nn.Module):
    """prismatic's fused-backbone projector (`fused-gelu-mlp`), with its module names:
    fc1 vision -> 4 x vision, GELU, fc2 -> LLM width, GELU, fc3 LLM -> LLM (2176 -> 8704 -> 4096 -> 4096
    in OpenVLA-7B)."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.act_fn2 = nn.GELU()

    def forward(self, x):
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(x)))))


class TinyVLAForActionPrediction(PreTrainedModel):
    config_class = TinyVLAConfig
    base_model_prefix = "tinyvla"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LlamaDecoderLayer", "ViTLayer"]  # noqa: RUF012 (HF class attribute)

    def __init__(self, config: TinyVLAConfig):
        super().__init__(config)
        self.vision_backbone = ViTModel(ViTConfig(**config.vision), add_pooling_layer=False)
        width = config.vision["hidden_size"]
        if config.vision_fused:
            self.fused_vision_backbone = ViTModel(ViTConfig(**config.vision_fused), add_pooling_layer=False)
            width += config.vision_fused["hidden_size"]
            self.projector = FusedProjector(width, config.llm["hidden_size"])
        else:
            self.projector = Projector(width, config.llm["hidden_size"])
        self.language_model = LlamaForCausalLM(LlamaConfig(**config.llm))
        self.post_init()

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    @property
    def n_image_tokens(self) -> int:
        return self.config.n_image_tokens

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> projected patch embeddings [B, n_image_tokens, D]."""
        feats = self._patches(self.vision_backbone, pixel_values)
        if self.config.vision_fused:
            feats = torch.cat([feats, self._patches(self.fused_vision_backbone, pixel_values)], dim=2)
        return self.projector(feats)

    def _patches(self, tower: ViTModel, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features (no CLS) of `config.feature_layer`."""
        if self.config.feature_layer == -1:
            return tower(pixel_values=pixel_values).last_hidden_state[:, 1:]
        states = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return states[self.config.feature_layer][:, 1:]

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        labels=None,
        output_hidden_states=None,
        use_cache=False,
        return_dict=True,
        past_key_values=None,
        position_ids=None,
        **kwargs,
    ):
        """OpenVLA layout: [<s>, image patches, text[1:]]; attention_mask is over the text tokens.

        Decoding step (past_key_values given): input_ids are the new tokens only, attention_mask
        covers the whole cached sequence (sequence coordinates, patches included) and position_ids
        their sequence positions; no image is needed."""
        if past_key_values is not None:
            return self.language_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=True,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        tok_emb = self.language_model.get_input_embeddings()(input_ids)  # [B, T, D]
        patches = self.image_embeddings(pixel_values).to(tok_emb.dtype)  # [B, P, D]
        b, p = patches.shape[:2]
        embeds = torch.cat([tok_emb[:, :1], patches, tok_emb[:, 1:]], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([attention_mask[:, :1], attention_mask.new_ones(b, p), attention_mask[:, 1:]], 1)
        if labels is not None:
            labels = torch.cat([labels[:, :1], labels.new_full((b, p), -100), labels[:, 1:]], 1)
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            labels=labels,
            output_hidden_states=output_hidden_states,
            use_cache=bool(use_cache),
            return_dict=True,
        )


def _register_auto() -> None:
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register("tinyvla", TinyVLAConfig)
        AutoModel.register(TinyVLAConfig, TinyVLAForActionPrediction)
    except ValueError:
        pass


_register_auto()


# ----------------------------------------------------------------------------- tokenizer


def action_token_names(n_bins: int = 256) -> list[str]:
    return [f"<act_{i:03d}>" for i in range(n_bins)]


def _template_texts() -> list[str]:
    return [ACTION_PREFIX, ACTION_SUFFIX, VQA_PREFIX]


def train_tokenizer(
    texts: Iterable[str], vocab_words: int = 600, n_bins: int = 256, pad_to: int | None = None
):
    """Word-level tokenizer trained on `texts` (+ the prompt templates): ids
    [<pad> <s> </s> <unk>, words..., (fillers up to pad_to - n_bins), 256 action tokens]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def fresh(vocab=None):
        tok = Tokenizer(
            models.WordLevel(vocab=vocab, unk_token="<unk>") if vocab else models.WordLevel(unk_token="<unk>")
        )
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
        )
        return tok

    tok = fresh()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_words + len(SPECIAL_TOKENS), special_tokens=SPECIAL_TOKENS, min_frequency=1
    )
    corpus = _template_texts() * 4 + [str(t) for t in texts]
    tok.train_from_iterator(corpus, trainer)
    words = [w for w, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    assert words[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS, words[:8]
    if pad_to is not None:
        words += [f"<unused_{i}>" for i in range(pad_to - n_bins - len(words))]
    vocab = {w: i for i, w in enumerate(words + action_token_names(n_bins))}
    tok = fresh(vocab)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.padding_side = "right"
    return fast


def load_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


# ----------------------------------------------------------------------------- backend


class TinyBackend(VLABackend):
    name = "tiny"
    vision_prefix = ("vision_backbone.", "fused_vision_backbone.")  # the 7B stand-in's second tower

    def __init__(self, model: TinyVLAForActionPrediction, tokenizer, device="cpu", stats=None):
        cfg = model.config
        super().__init__(
            model,
            tokenizer,
            n_image_tokens=cfg.n_image_tokens,
            action_dim=cfg.action_dim,
            vocab_end=cfg.vocab_end or len(tokenizer),
            device=device,
            stats=stats,
            n_bins=cfg.n_action_bins,
        )
        self.image_size = cfg.image_size

    @torch.no_grad()
    def _greedy(self, prompts, pixel_values, steps, allowed, stop_at_eos, model):
        return self._greedy_cached(prompts, pixel_values, steps, allowed, stop_at_eos, model)

    def pixel_values(self, images) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, S, S] in [-1, 1] (ViT mean/std 0.5), resized to S."""
        arr = images_to_uint8(images)
        # uint8 goes to the model's device first: resize and normalisation run there (on a GPU
        # that is ~4x fewer bytes to copy and no per-image CPU work in the evaluation loop)
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return (x - 0.5) / 0.5

    def save(self, out_dir: str | Path, norm_stats: dict | None = None) -> Path:
        """Standard HF directory: config.json, model.safetensors, tokenizer files, statistics.

        norm_stats {unnorm_key: dataset statistics} (an export): written as dataset_statistics.json
        instead of the backend's own action statistics."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        unwrapped = self.model
        unwrapped.save_pretrained(str(out), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))
        if norm_stats:
            (out / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2, default=_tolist))
        elif self.stats is not None:
            (out / "dataset_statistics.json").write_text(
                json.dumps({"action": self.stats}, indent=2, default=_tolist)
            )
        return out

    @classmethod
    def from_dir(
        cls, path: str | Path, device="cpu", dtype: torch.dtype = torch.float32, stats=None
    ) -> TinyBackend:
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"tiny model dir {path} has no config.json — run the `model` stage "
                "(vlaforget model --config ...) or set model.path"
            )
        model = TinyVLAForActionPrediction.from_pretrained(str(path), torch_dtype=dtype)
        model.to(device).eval()
        tok = load_tokenizer(path)
        if stats is None and (path / "dataset_statistics.json").exists():
            stats = json.loads((path / "dataset_statistics.json").read_text())
        return cls(model, tok, device=device, stats=stats)


def _tolist(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o))


def default_stats(action_dim: int) -> dict:
    """q01/q99 = -1/1, gripper unmasked: normalisation is the identity on [-1, 1] actions."""
    return {
        "q01": [-1.0] * action_dim,
        "q99": [1.0] * action_dim,
        "mask": [True] * (action_dim - 1) + [False],
        "mean": [0.0] * action_dim,
        "std": [1.0] * action_dim,
        "min": [-1.0] * action_dim,
        "max": [1.0] * action_dim,
    }


def build_tiny_backend(
    tiny: Mapping[str, Any],
    corpus: Iterable[str],
    *,
    action_dim: int = 4,
    seed: int = 0,
    device="cpu",
    stats=None,
) -> TinyBackend:
    """Random-init tiny backend: tokenizer trained on `corpus`, model sized by the `model.tiny` block."""
    tok = train_tokenizer(corpus, int(tiny.get("vocab_words", 600)))
    cfg = tiny_config(
        tiny,
        len(tok),
        pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        action_dim=action_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyVLAForActionPrediction(cfg)
    model.to(device)
    return TinyBackend(
        model, tok, device=device, stats=stats if stats is not None else default_stats(action_dim)
    )


def random_tiny_backend(
    tiny: Mapping[str, Any] | None = None,
    *,
    action_dim: int = 4,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    device="cpu",
    stats=None,
) -> TinyBackend:
    """A random-init tiny backend in well under a second, no data needed (for tests).

    Sizes default to TEST_TINY; corpus to a built-in Meta-World-like word list; stats to
    identity normalisation (q01=-1, q99=1). `backend.save(dir)` writes a loadable model dir."""
    t = dict(TEST_TINY)
    t.update(tiny or {})
    return build_tiny_backend(
        t,
        list(corpus) if corpus is not None else DEFAULT_CORPUS,
        action_dim=action_dim,
        seed=seed,
        device=device,
        stats=stats,
    )


# ----------------------------------------------------------------------------- 7B shape

SEVEN_B_SHAPE = {
    "image_size": 224,
    "patch_size": 14,
    # OpenVLA-7B's fused vision backbone (`dinosiglip-vit-so-224px`): DINOv2 ViT-L/14 ...
    "vision_hidden": 1024,
    "vision_layers": 24,
    "vision_heads": 16,
    "vision_intermediate": 4096,
    # ... and SigLIP so400m/14, both at 224 px (256 patches each)
    "fused_vision_hidden": 1152,
    "fused_vision_layers": 27,
    "fused_vision_heads": 16,
    "fused_vision_intermediate": 4304,
    "feature_layer": -2,  # prismatic: patch features of each tower's second-to-last block
    # Llama-2-7B
    "hidden": 4096,
    "layers": 32,
    "heads": 32,
    "intermediate": 11008,
    "max_positions": 2048,
}


def seven_b_shape_backend(
    device="meta", dtype: torch.dtype = torch.bfloat16, action_dim: int = 7, layers: int | None = None
) -> TinyBackend:
    """Random-init stand-in with OpenVLA-7B's shapes: the LLM (Llama-2-7B: 32 layers, hidden 4096,
    32 heads, intermediate 11008, vocab 32064, action ids 31744..31999), both vision towers
    (DINOv2-L/14-shaped: 24 layers, width 1024, 16 heads; SigLIP-so400m-shaped: 27 layers, width
    1152, 16 heads, MLP 4304; 224 px, patch 14, 256 patches each) fused as prismatic does (second-
    to-last block's patches, 1024 + 1152 = 2176 channels) and the fused projector (2176 -> 8704 ->
    4096 -> 4096). Both towers are HF ViTs (one CLS token each, no DINOv2 registers or LayerScale:
    4 of DINOv2's 261 tokens are missing). device="meta" allocates nothing (shapes only); on a GPU,
    device="cuda" initialises it there directly. For benchmarks (docs/models.md)."""
    shape = dict(SEVEN_B_SHAPE)
    if layers is not None:
        shape["layers"] = layers
    tok = train_tokenizer(DEFAULT_CORPUS, 600, pad_to=32000)  # action ids 31744..31999
    cfg = tiny_config(
        shape,
        32000,
        pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        action_dim=action_dim,
        vocab_end=32000,
        model_vocab=32064,
    )
    cfg.torch_dtype = dtype
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = TinyVLAForActionPrediction(cfg)
    finally:
        torch.set_default_dtype(prev)
    return TinyBackend(model, tok, device=device, stats=default_stats(action_dim))
