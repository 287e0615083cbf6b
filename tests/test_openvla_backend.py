"""OpenVLA backend against openvla's REAL HF modelling code, on a tiny random checkpoint.

Needs openvla's public `prismatic/extern/hf/*.py` in a folder named by env VLAFORGET_OPENVLA_CODE
and timm 0.9.10–0.9.16 (see docs/models.md: a separate venv with transformers 4.40.1). Skips,
saying why, otherwise. The checkpoint has OpenVLA's structure (fused DINOv2-reg4 + SigLIP-like
timm towers at 224 px / patch 14 = 256 patches, fused GELU projector, Llama LLM with text vocab
32064 = 32000 + pad to 64, norm_stats) at toy width.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

CODE = os.environ.get("VLAFORGET_OPENVLA_CODE")
FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")


def _skip_reason() -> str | None:
    if not CODE:
        return "env VLAFORGET_OPENVLA_CODE is not set (folder with openvla's prismatic/extern/hf/*.py)"
    missing = [f for f in FILES if not (Path(CODE) / f).exists()]
    if missing:
        return f"VLAFORGET_OPENVLA_CODE={CODE} lacks {missing}"
    if importlib.util.find_spec("timm") is None:
        return "timm is not installed (OpenVLA's modelling code needs timm 0.9.10-0.9.16)"
    import timm

    if timm.__version__ not in {"0.9.10", "0.9.11", "0.9.12", "0.9.16"}:
        return f"timm {timm.__version__} installed; OpenVLA's modelling code needs 0.9.10-0.9.16"
    return None


REASON = _skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

NORM = {
    "q01": [-0.9, -0.5, -0.2, 0.0, -0.1, -0.3, 0.0],
    "q99": [0.9, 0.5, 0.8, 0.2, 0.1, 0.3, 1.0],
    "mask": [True] * 6 + [False],
}
ACTION_BEGIN, VOCAB_END = 31744, 32000


def _register_tiny_timm():
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    @register_model
    def vit_vlaforget_test_dino(pretrained=False, **kw):  # DINOv2-reg4-like
        args = {
            "patch_size": 14,
            "embed_dim": 32,
            "depth": 3,
            "num_heads": 2,
            "reg_tokens": 4,
            "no_embed_class": True,
            "init_values": 1e-5,
        }
        return _create_vision_transformer("vit_vlaforget_test_dino", pretrained=False, **dict(args, **kw))

    @register_model
    def vit_vlaforget_test_siglip(pretrained=False, **kw):  # SigLIP-like: no class token, MAP pool
        args = {
            "patch_size": 14,
            "embed_dim": 48,
            "depth": 3,
            "num_heads": 2,
            "class_token": False,
            "global_pool": "map",
        }
        return _create_vision_transformer("vit_vlaforget_test_siglip", pretrained=False, **dict(args, **kw))


def _llama_like_tokenizer():
    """openvla-7b's tokenizer layout (32000 ids + <PAD>): the checkpoint builder's
    (vlaforget.models.openvla_tiny), trained on this test's instructions."""
    from vlaforget.models.openvla_tiny import llama_like_tokenizer

    return llama_like_tokenizer(
        (
            "pick up the black bowl",
            "open the top drawer",
            "Put the cream cheese in the bowl",
            "what is on the table",
        )
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Save a tiny random OpenVLA checkpoint laid out like openvla/openvla-7b on the hub."""
    import torch

    tmp = tmp_path_factory.mktemp("openvla")
    os.environ["HF_MODULES_CACHE"] = str(tmp / "modules")
    code = tmp / "openvla_toy_code"
    code.mkdir()
    for f in FILES:
        shutil.copy(Path(CODE) / f, code / f)
    (code / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp))
    _register_tiny_timm()
    import importlib

    OpenVLAConfig = importlib.import_module("openvla_toy_code.configuration_prismatic").OpenVLAConfig
    OpenVLAForActionPrediction = importlib.import_module(
        "openvla_toy_code.modeling_prismatic"
    ).OpenVLAForActionPrediction
    proc_mod = importlib.import_module("openvla_toy_code.processing_prismatic")
    PrismaticImageProcessor, PrismaticProcessor = (
        proc_mod.PrismaticImageProcessor,
        proc_mod.PrismaticProcessor,
    )

    text = {
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
    cfg = OpenVLAConfig(
        vision_backbone_id="dinosiglip-vit-so-224px",
        llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp",
        image_resize_strategy="resize-naive",
        text_config=text,
        norm_stats={"toy_ds": {"action": NORM}},
        n_action_bins=256,
        timm_model_ids=["vit_vlaforget_test_dino", "vit_vlaforget_test_siglip"],
        pad_to_multiple_of=64,
    )
    cfg.auto_map = {
        "AutoConfig": "configuration_prismatic.OpenVLAConfig",
        "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
    }
    torch.manual_seed(0)
    model = OpenVLAForActionPrediction(cfg)
    out = tmp / "openvla-toy"
    model.save_pretrained(str(out))
    improc = PrismaticImageProcessor(
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
    proc = PrismaticProcessor(image_processor=improc, tokenizer=_llama_like_tokenizer())
    proc.save_pretrained(str(out))
    for f in FILES:
        shutil.copy(code / f, out / f)
    for f in ("preprocessor_config.json",):  # AutoProcessor resolves the class through auto_map
        p = out / f
        d = json.loads(p.read_text())
        d["auto_map"] = improc.auto_map
        p.write_text(json.dumps(d))
    return out


@pytest.fixture(scope="module")
def backend(ckpt, tmp_path_factory):
    import torch

    from vlaforget.models import load_backend

    torch.set_num_threads(1)
    return load_backend(
        {
            "backend": "openvla",
            "path": str(ckpt),
            "dtype": "fp32",
            "cache_dir": str(tmp_path_factory.mktemp("hf_cache")),
        }
    )


def _samples(n=2):
    rng = np.random.default_rng(0)
    instr = ["Pick up the black bowl", "open the top drawer and put the bowl inside"]
    return [
        {
            "image": rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),
            "instruction": instr[i % 2],
            "action": rng.uniform(-1, 1, 7).astype(np.float32),
        }
        for i in range(n)
    ]


def test_structure(backend):
    assert type(backend.model).__name__ == "OpenVLAForActionPrediction"
    assert backend.n_image_tokens == 256 and backend.num_layers == 4 and backend.hidden_size == 32
    assert backend.vocab_end == VOCAB_END and backend.action_tokenizer.begin == ACTION_BEGIN
    assert backend.action_dim == 7 and backend.stats["q99"] == NORM["q99"]  # norm_stats of the only key
    assert backend.action_sep_ids == [backend.tokenizer.convert_tokens_to_ids("▁")]


def test_collate_matches_processor(backend):
    from PIL import Image

    from vlaforget.models.prompts import action_prompt

    samples = _samples()
    b = backend.collate(samples)
    A = 7
    for i, s in enumerate(samples):
        prompt = action_prompt(s["instruction"])
        inputs = backend.processor(prompt, Image.fromarray(s["image"]))
        p_ids = inputs["input_ids"][0].tolist()
        length = int(b["attention_mask"][i].sum())
        ids = b["input_ids"][i, :length].tolist()
        assert ids[: len(p_ids)] == p_ids  # the processor's own prompt tokens
        assert ids[len(p_ids)] == backend.action_sep_ids[0] and ids[-1] == backend.tokenizer.eos_token_id
        assert len(ids) == len(p_ids) + 1 + A + 1
        assert np.allclose(b["pixel_values"][i].numpy(), inputs["pixel_values"][0].numpy(), atol=1e-5)
        lab = b["labels"][i, :length]
        assert (lab != -100).nonzero().flatten().tolist() == list(range(length - A - 1, length))
        assert all(ACTION_BEGIN <= t < VOCAB_END for t in b["action_targets"][i].tolist())
        ipos = b["instruction_mask"][i].nonzero().flatten() - backend.n_image_tokens
        # the toy BPE may merge "bowl?\nOut:" into one token: then it is inside the span, never dropped
        assert s["instruction"].lower() in backend.tokenizer.decode(b["input_ids"][i, ipos]).strip()
    assert b["pixel_values"].shape[1:] == (6, 224, 224)


def test_forward_hidden_state_alignment(backend):
    import torch

    b = backend.collate(_samples())
    with torch.no_grad():
        out = backend.forward(b, output_hidden_states=True)
    n = backend.n_image_tokens
    assert out.logits.shape[:2] == (2, b["input_ids"].shape[1] + n)
    assert len(out.hidden_states) == 5
    emb = backend.model.get_input_embeddings()(b["input_ids"])
    assert torch.allclose(out.hidden_states[0][:, 1 + n :], emb[:, 1:])
    m = backend.action_metrics(b, out.logits)
    assert np.isfinite(float(m["loss"])) and 0 <= float(m["accuracy"]) <= 1


def test_predict_actions_matches_openvla_predict_action(backend):
    """Same prompt, "▁", greedy action tokens and un-normalisation as openvla's predict_action
    (restricted to the action vocabulary on both sides)."""
    import torch
    from PIL import Image

    from vlaforget.models.prompts import action_prompt

    samples = _samples()
    imgs = np.stack([s["image"] for s in samples])
    ours = backend.predict_actions(imgs, [s["instruction"] for s in samples])
    suppress = list(range(ACTION_BEGIN)) + list(range(VOCAB_END, 32064))
    for i, s in enumerate(samples):
        inputs = backend.processor(action_prompt(s["instruction"]), Image.fromarray(s["image"]))
        with torch.no_grad():
            ref = backend.model.predict_action(
                **inputs, unnorm_key="toy_ds", do_sample=False, suppress_tokens=suppress
            )
        assert np.allclose(ours[i], ref, atol=1e-5), (ours[i], ref)


def test_kv_cached_batched_decoding_equals_uncached(backend):
    """The batched KV-cached decoding (prefill through openvla's forward, steps straight into its
    Llama with per-row positions and padding masked) gives the tokens of the uncached loop, for
    prompts of different lengths in one right-padded batch."""
    from vlaforget.models.base import VLABackend
    from vlaforget.models.prompts import encode_action_prompt

    samples = _samples()
    instr = [s["instruction"] for s in samples]
    instr[0] = instr[0] + " and then put it back where it was, carefully"  # longer row: padding
    prompts = [encode_action_prompt(backend.tokenizer, t).ids + backend.action_sep_ids for t in instr]
    assert len({len(p) for p in prompts}) > 1
    pv = backend._images(np.stack([s["image"] for s in samples]))
    allowed = slice(ACTION_BEGIN, VOCAB_END)
    calls = []
    step = backend._decode_step
    backend._decode_step = lambda *a: calls.append(1) or step(*a)
    try:
        cached = backend._greedy(prompts, pv, 7, allowed, False, None)
    finally:
        del backend._decode_step
    assert len(calls) == 6  # one prefill, then six cached single-token steps
    plain = VLABackend._greedy(backend, prompts, pv, 7, allowed, False, None)
    assert cached == plain


def test_layers_through_peft_and_lora_targets(backend):
    from peft import LoraConfig, get_peft_model
    from torch import nn

    layers = backend.decoder_layers()
    t = backend.lora_targets(["attn", "mlp", "vision", "projector"], [2, 3])
    assert any(x.startswith("vision_backbone.featurizer.") for x in t)
    assert any(x.startswith("vision_backbone.fused_featurizer.") for x in t)
    assert "projector.fc1" in t and not any(".layers.0." in x for x in t)
    pm = get_peft_model(
        backend.model, LoraConfig(r=2, lora_alpha=2, target_modules=backend.lora_targets(["attn"]))
    )
    assert backend.decoder_layers(pm) is layers
    assert backend.decoder_layers(nn.DataParallel(pm)) is layers
    pm.unload()  # leave the shared backend unwrapped


def test_offline_check_reports(ckpt, tmp_path):
    from vlaforget.models.openvla import OpenVLAUnavailable, check_remote_code, resolve_model_path

    info = check_remote_code(resolve_model_path(str(ckpt)))
    assert info["missing_code_files"] == [] and info["norm_stats_keys"] == ["toy_ds"]
    with pytest.raises(OpenVLAUnavailable, match="huggingface-cli download"):
        resolve_model_path("openvla/openvla-7b", str(tmp_path))


def test_the_users_all_linear_lora_is_the_recipes_targets_and_loads_as_init_adapter(backend, ckpt, tmp_path):
    """The user's finetune.py adapts target_modules="all-linear". peft 0.11.1 resolves that to base
    names and fails to drop OpenVLA's nested LM head, and "proj" also matches timm's patch-embedding
    convolutions: on OpenVLA's architecture it is train.lora.targets [attn, mlp, vision, projector,
    lm_head, patch_embed] (config/user_recipe.yaml), so the user's adapter loads as train.init_adapter;
    the study's [attn, mlp, vision, projector] and rank 4 are refused, naming what differs."""
    import peft
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from vlaforget.errors import TrainingError
    from vlaforget.train.init_adapter import check_and_load, lora_modules
    from vlaforget.train.loop import apply_lora

    user = get_peft_model(
        backend.model,
        LoraConfig(
            r=2,
            lora_alpha=min(2, 16),
            lora_dropout=0.0,
            target_modules="all-linear",
            init_lora_weights="gaussian",
        ),
    )
    user.save_pretrained(str(tmp_path / "user_adapter"))
    user.unload()
    theirs = lora_modules(load_file(str(tmp_path / "user_adapter" / "adapter_model.safetensors")))
    targets = ["attn", "mlp", "vision", "projector", "lm_head", "patch_embed"]
    if peft.__version__ == "0.11.1":  # the user's stack
        assert set(theirs) == set(backend.lora_targets(targets, "all"))
        assert {"language_model.lm_head", "vision_backbone.featurizer.patch_embed.proj"} <= set(theirs)
    lora = {"r": 2, "alpha": 2, "dropout": 0.0, "targets": targets, "layers": "all"}
    mb = {"path": str(ckpt), "base": "openvla-7b"}

    def load(**over):
        model = apply_lora(backend, {**lora, **over}, seed=0)
        try:
            return check_and_load(model, tmp_path / "user_adapter", mb)
        finally:
            model.unload()

    assert load()["modules"] == len(theirs)
    with pytest.raises(TrainingError, match="r=2.*train.lora.r is 4"):
        load(r=4)
    if peft.__version__ == "0.11.1":
        with pytest.raises(TrainingError, match="only in the adapter: language_model.lm_head"):
            load(targets=targets[:4])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "non_reentrant_checkpointing"])
def test_hsw_flow_down_reaches_vision_and_lower_layers(backend, checkpointing):
    """Issue 26.1 on openvla's real architecture (transformers 4.40: the decoder layer's __call__, hooks
    included, runs inside the checkpoint): with HSW hooks on decoder layers 2 and 3, the LoRA of layer 0,
    of both vision towers and of the projector receive the hand-computed surgered gradient."""
    import torch
    from peft import LoraConfig, get_peft_model
    from test_hsw_flow_down import View, _expected, _grads, _named, _plain_backward

    from vlaforget.train.plugins import HSWPlugin, TrainContext

    beta, gamma = 0.5, 0.2
    grad_flags = {n: p.requires_grad for n, p in backend.model.named_parameters()}
    torch.manual_seed(0)
    pm = get_peft_model(
        backend.model,
        LoraConfig(
            r=2,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=backend.lora_targets(["attn", "mlp", "vision", "projector"]),
        ),
    )
    try:
        for n, p in pm.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_B" in n:
                with torch.no_grad():
                    p.normal_(0, 0.05)
        q, _ = torch.linalg.qr(
            torch.randn(backend.hidden_size, 8, generator=torch.Generator().manual_seed(1))
        )
        basis = (q[:, :2], q[:, 2:6])
        bases = {2: basis, 3: basis}
        batch = backend.collate(_samples())
        expect, hooks, _, _ = _expected(backend, pm, batch, bases, beta, gamma)
        plain = _plain_backward(backend, pm, batch)
        if checkpointing:
            backend.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            pm.train()
        ctx = TrainContext(
            backend=backend,
            model=pm,
            device=torch.device("cpu"),
            stage_cfg={},
            trainable=_named(pm),
            autocast=lambda: torch.autocast("cpu", enabled=False),
        )
        plug = HSWPlugin(ctx, {"beta": beta, "gamma": gamma}, View(bases))
        try:
            pm.zero_grad(set_to_none=True)
            backend.action_metrics(batch, backend.forward(batch, model=pm).logits)["loss"].backward()
            logs = plug.logs()
        finally:
            plug.close()
        got = _grads(pm)
        below = [n for n in got if ".layers.0." in n or "featurizer" in n or "projector" in n]
        assert any("fused_featurizer" in n for n in below) and any(".layers.0." in n for n in below)
        for n in got:  # float32 sums in another order: relative to the tensor's norm
            assert float((got[n] - expect[n]).norm()) <= 1e-4 * float(expect[n].norm()) + 1e-12, n
        assert all(
            float((plain[n] - expect[n]).norm()) > 1e-2 * float(expect[n].norm())
            for n in below
            if float(expect[n].norm()) > 0
        )  # not the baseline's gradient
        for l, h in hooks.items():
            assert logs[f"hsw_L{l}_gprime_norm"] == pytest.approx(float(h["gprime"].norm()), rel=1e-4)
            assert logs[f"hsw_L{l}_gprime_norm"] <= logs[f"hsw_L{l}_g_norm"]
        assert "hsw_eff_gain_f_g3" in logs
    finally:
        if checkpointing:
            backend.model.gradient_checkpointing_disable()
        pm.unload()
        for n, p in backend.model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
