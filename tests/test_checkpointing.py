"""`train.gradient_checkpointing` reaches every module that holds LoRA (issue 28).

A module runs under activation checkpointing iff its forward runs a second time in the backward
(the recomputation): each test counts the calls of every decoder layer, vision block and projector
that holds LoRA over one forward + backward, through the training loop's own `prepare_model`.
The tiny tests always run (the 7B stand-in's two-tower layout at toy size); the OpenVLA tests run
openvla's real modelling code (VLAFORGET_OPENVLA_CODE + timm 0.9.x, see docs/models.md).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vlaforget.settings import TrainSettings
from vlaforget.train.loop import prepare_model

TWO_TOWERS = {
    "image_size": 28,
    "patch_size": 14,
    "vision_hidden": 32,
    "vision_layers": 2,
    "vision_heads": 2,
    "fused_vision_hidden": 48,
    "fused_vision_layers": 3,
    "fused_vision_heads": 2,
    "feature_layer": -2,
    "hidden": 32,
    "layers": 2,
    "heads": 2,
    "intermediate": 64,
}
TARGETS = ["attn", "mlp", "vision", "projector"]


def _settings(ckpt: bool) -> TrainSettings:
    return TrainSettings.of(
        {
            "max_steps": 1,
            "batch_size": 2,
            "lr": 1e-3,
            "precision": "fp32",
            "gradient_checkpointing": ckpt,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": TARGETS, "layers": "all"},
        }
    )


def _samples(n=2, size=28):
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "instruction": ["open the drawer", "press the button"][i % 2],
            "action": rng.uniform(-1, 1, 7).astype(np.float32),
        }
        for i in range(n)
    ]


def _holds_lora(mod) -> bool:
    return any("lora_A" in n for n, _ in mod.named_modules())


def _blocks(model, tower_blocks):
    """(name, module) of every decoder layer, vision block and the projector that holds LoRA."""
    from vlaforget.models.base import find_decoder_layers, unwrap_model

    m = unwrap_model(model)
    out = [(f"decoder.{i}", layer) for i, layer in enumerate(find_decoder_layers(m))]
    out += tower_blocks(m) + [("projector", m.projector)]
    return [(n, b) for n, b in out if _holds_lora(b)]


def _forward_calls(backend, model, tower_blocks, samples):
    """{block: forward calls in one training forward + backward}, and the LoRA gradients."""
    calls = {}
    hooks = []
    for name, blk in _blocks(model, tower_blocks):
        calls[name] = 0

        def count(_m, _a, name=name):
            calls[name] += 1

        # a LoRA layer inside the block: the recomputation calls the block's forward directly (no
        # hooks of the block itself), its children through their hooks
        lora = next(m for m in blk.modules() if hasattr(m, "lora_A"))
        hooks.append(lora.register_forward_pre_hook(count))
    model.train()
    batch = backend.collate(samples)
    out = backend.forward(batch, model=model)
    backend.lm_loss(batch, out.logits).backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    return calls, grads, missing


def _layers(tower):
    """An HF ViT's blocks: `encoder.layer` (transformers 4.x), `layers` (5.x)."""
    enc = getattr(tower, "encoder", None)
    return enc.layer if enc is not None else tower.layers


def _tiny_towers(m):
    return [(f"vision.{i}", blk) for i, blk in enumerate(_layers(m.vision_backbone))] + [
        (f"fused.{i}", blk) for i, blk in enumerate(_layers(m.fused_vision_backbone))
    ]


def _tiny(seed=0):
    from vlaforget.models.tiny import random_tiny_backend

    return random_tiny_backend(TWO_TOWERS, action_dim=7, seed=seed)


def test_tiny_two_tower_layout():
    """The stand-in's layout: both towers feed the fused projector from their second-to-last block."""
    b = _tiny()
    m = b.model
    assert m.projector.fc1.in_features == 32 + 48 and m.projector.fc1.out_features == 4 * 80
    assert m.projector.fc3.out_features == 32 and b.n_image_tokens == 4
    names = b.lora_targets(TARGETS)
    assert any(n.startswith("fused_vision_backbone.") and ".2." in n for n in names)
    assert any(n.startswith("vision_backbone.") and ".1." in n for n in names)
    # feature_layer -2: the last block of each tower does not change the patch features
    x = b.pixel_values(np.zeros((1, 28, 28, 3), np.uint8))
    with torch.no_grad():
        before = m.image_embeddings(x)
        for tower in (m.vision_backbone, m.fused_vision_backbone):
            for p in _layers(tower)[-1].parameters():
                torch.nn.init.normal_(p)
        assert torch.equal(before, m.image_embeddings(x))


def test_tiny_every_lora_block_is_checkpointed():
    b = _tiny()
    model = prepare_model(b, _settings(True), 0)
    calls, _, missing = _forward_calls(b, model, _tiny_towers, _samples())
    # the last block of each tower feeds nothing (features of the second-to-last): no backward, so no
    # recomputation either; every other block holding LoRA is recomputed
    unused = {"vision.1", "fused.2"}
    assert {n for n in calls if n.startswith(("vision", "fused"))} >= {"vision.0", "fused.0", "fused.1"}
    assert "projector" in calls and "decoder.0" in calls
    rerun = {n for n, c in calls.items() if c == 2}
    assert rerun == set(calls) - unused, calls
    # only the unused last blocks' LoRA goes without a gradient
    last = (
        f"vision_backbone.{len(_layers(b.model.vision_backbone)) - 1}.",
        f"fused_vision_backbone.{len(_layers(b.model.fused_vision_backbone)) - 1}.",
    )
    flat = [n.replace("encoder.layer.", "").replace("layers.", "") for n in missing]
    assert missing and all(any(t in n for t in last) for n in flat), missing


def test_tiny_checkpointing_off_runs_each_block_once():
    b = _tiny()
    model = prepare_model(b, _settings(False), 0)
    calls, _, _ = _forward_calls(b, model, _tiny_towers, _samples())
    assert set(calls.values()) == {1}, calls


def test_tiny_lora_gradients_equal_with_and_without_checkpointing():
    grads = []
    for ckpt in (False, True):
        b = _tiny(seed=3)
        model = prepare_model(b, _settings(ckpt), 0)
        grads.append(_forward_calls(b, model, _tiny_towers, _samples()))
    (_, off, miss_off), (_, on, miss_on) = grads
    assert off.keys() == on.keys() and miss_off == miss_on
    vision = [n for n in off if "vision_backbone" in n]
    assert vision and any(off[n].abs().sum() > 0 for n in vision if "lora_B" in n)
    for n in off:
        torch.testing.assert_close(on[n], off[n], rtol=1e-5, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------- OpenVLA's real code

CODE = os.environ.get("VLAFORGET_OPENVLA_CODE")


def _openvla_skip() -> str | None:
    if not CODE:
        return "env VLAFORGET_OPENVLA_CODE is not set (folder with openvla's prismatic/extern/hf/*.py)"
    if importlib.util.find_spec("timm") is None:
        return "timm is not installed (OpenVLA's modelling code needs timm 0.9.10-0.9.16)"
    import timm

    if timm.__version__ not in {"0.9.10", "0.9.11", "0.9.12", "0.9.16"}:
        return f"timm {timm.__version__} installed; OpenVLA's modelling code needs 0.9.10-0.9.16"
    return None


openvla = pytest.mark.skipif(_openvla_skip() is not None, reason=str(_openvla_skip()))


@pytest.fixture(scope="module")
def openvla_dir(tmp_path_factory):
    """A toy checkpoint of OpenVLA's real architecture: two DINOv2-S/14 timm towers (one with
    registers), fused projector, 2-layer Llama."""
    from vlaforget.models.openvla_tiny import DEFAULT_TEXT, build

    tmp = tmp_path_factory.mktemp("openvla_ckpt")
    os.environ["HF_MODULES_CACHE"] = str(tmp / "modules")
    text = dict(DEFAULT_TEXT, num_hidden_layers=2)
    return build(CODE, tmp / "ckpt", text_config=text)


def _openvla(path: Path):
    from vlaforget.models import load_backend

    torch.manual_seed(0)
    return load_backend({"backend": "openvla", "path": str(path), "dtype": "fp32"})


def _timm_towers(m):
    vb = m.vision_backbone
    return [(f"featurizer.{i}", blk) for i, blk in enumerate(vb.featurizer.blocks)] + [
        (f"fused.{i}", blk) for i, blk in enumerate(vb.fused_featurizer.blocks)
    ]


@openvla
def test_openvla_every_lora_block_is_checkpointed(openvla_dir):
    torch.set_num_threads(1)
    b = _openvla(openvla_dir)
    model = prepare_model(b, _settings(True), 0)
    calls, _, _ = _forward_calls(b, model, _timm_towers, _samples(2, 224))
    n = len(b.model.vision_backbone.featurizer.blocks)
    # openvla's featurizers run every block but return the second-to-last one's patches
    unused = {f"featurizer.{n - 1}", f"fused.{n - 1}"}
    assert {f"featurizer.{n - 2}", f"fused.{n - 2}", "projector", "decoder.1"} <= set(calls)
    rerun = {k for k, c in calls.items() if c == 2}
    assert rerun == set(calls) - unused, calls


@openvla
def test_openvla_lora_gradients_equal_with_and_without_checkpointing(openvla_dir):
    torch.set_num_threads(1)
    grads = []
    for ckpt in (False, True):
        b = _openvla(openvla_dir)
        model = prepare_model(b, _settings(ckpt), 0)
        grads.append(_forward_calls(b, model, _timm_towers, _samples(2, 224)))
    (_, off, miss_off), (_, on, miss_on) = grads
    assert off.keys() == on.keys() and miss_off == miss_on
    vision = [k for k in off if "featurizer.blocks" in k and "lora_B" in k]
    assert vision and any(off[k].abs().sum() > 0 for k in vision)
    for k in off:
        torch.testing.assert_close(on[k], off[k], rtol=1e-4, atol=1e-6, msg=k)


@openvla
def test_openvla_full_size_architecture_on_meta():
    """`bench train --backend openvla`'s model: openvla's code at OpenVLA-7B's size (shapes only)."""
    from vlaforget.models.openvla_tiny import full_size_backend

    b = full_size_backend(CODE, device="meta")
    m = b.model
    n = sum(p.numel() for p in m.parameters())
    assert 7.50e9 < n < 7.58e9  # openvla-7b: 7.54 B
    vb = m.vision_backbone
    assert (len(vb.featurizer.blocks), vb.featurizer.embed_dim, vb.featurizer.num_prefix_tokens) == (
        24,
        1024,
        5,
    )
    assert (len(vb.fused_featurizer.blocks), vb.fused_featurizer.embed_dim) == (27, 1152)
    assert (m.projector.fc1.in_features, m.projector.fc1.out_features, m.projector.fc3.out_features) == (
        2176,
        8704,
        4096,
    )
    assert b.n_image_tokens == 256 and len(b.checkpoint_targets(m)) == 24 + 27 + 1


def test_fp16_weights_get_fp32_lora_that_grad_scaler_unscales():
    """The V100 profile (model.dtype fp16, precision fp16 + GradScaler): on peft 0.11.1 the LoRA was
    created in fp16 and the scaler raised "Attempting to unscale FP16 gradients" (issue 28, seen on the
    GPU with openvla's stack); run this in the openvla venv to see it fail on the code before."""
    b = _tiny()
    b.model.half()
    ts = TrainSettings.of({**_settings(False).__dict__, "lora": _settings(False).lora, "precision": "fp16"})
    model = prepare_model(b, ts, 0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # what the loop's scaler does
    scaler.scale(sum(p.sum() for p in trainable)).backward()
    scaler.unscale_(opt)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in trainable)


def test_seven_b_stand_in_has_both_towers_and_the_fused_projector():
    """`bench train --shape 7b`'s stand-in at OpenVLA-7B's shapes (meta device: nothing allocated)."""
    from vlaforget.models.tiny import seven_b_shape_backend

    b = seven_b_shape_backend(device="meta")
    m = b.model
    n = sum(p.numel() for p in m.parameters())
    assert 7.50e9 < n < 7.58e9  # openvla-7b: 7.54 B (DINOv2's registers and LayerScale not modelled)
    dino, siglip = m.vision_backbone.config, m.fused_vision_backbone.config
    assert (dino.num_hidden_layers, dino.hidden_size, dino.num_attention_heads) == (24, 1024, 16)
    assert (siglip.num_hidden_layers, siglip.hidden_size, siglip.intermediate_size) == (27, 1152, 4304)
    assert (m.projector.fc1.in_features, m.projector.fc1.out_features) == (2176, 8704)
    assert (m.projector.fc2.out_features, m.projector.fc3.out_features) == (4096, 4096)
    assert m.config.feature_layer == -2 and b.n_image_tokens == 256
    names = b.lora_targets(TARGETS)
    assert any(x.startswith("fused_vision_backbone.") for x in names)
    assert any(x.startswith("vision_backbone.") for x in names)
