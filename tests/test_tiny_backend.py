"""Tiny backend: the backend protocol on a random-init tiny VLA (fast; no data needed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vlaforget.models import load_backend
from vlaforget.models.action_tokenizer import normalize_actions, unnormalize_actions
from vlaforget.models.tiny import TinyBackend, random_tiny_backend

STATS = {"q01": [-0.5, -0.2, 0.0, -1.0], "q99": [0.5, 0.6, 2.0, 1.0], "mask": [True, True, True, False]}


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    return random_tiny_backend(stats=STATS, seed=0)


def _samples(n=3, seed=0):
    rng = np.random.default_rng(seed)
    instr = ["open the drawer", "Press the BUTTON from the top", "slide the plate into the goal, now"]
    return [
        {
            "image": rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
            "instruction": instr[i % 3],
            "action": rng.uniform(-1, 1, 4).astype(np.float32),
        }
        for i in range(n)
    ]


def test_sizes(backend):
    assert backend.num_layers == 8 and backend.n_image_tokens == 16 and backend.action_dim == 4
    assert backend.vocab_end == len(backend.tokenizer)
    names = backend.tokenizer.convert_ids_to_tokens(list(range(backend.vocab_end - 256, backend.vocab_end)))
    assert all(n.startswith("<act_") for n in names)  # the action tokens are the last 256 ids


def test_collate_labels_and_masks(backend):
    samples = _samples()
    b = backend.collate(samples)
    n, a = backend.n_image_tokens, backend.action_dim
    B, T = b["input_ids"].shape
    assert b["instruction_mask"].shape == (B, T + n) == b["action_mask"].shape
    for i, s in enumerate(samples):
        length = int(b["attention_mask"][i].sum())
        lab = b["labels"][i]
        keep = (lab != -100).nonzero().flatten().tolist()
        assert keep == list(range(length - a - 1, length))  # action tokens + </s>, nothing else
        assert int(lab[length - 1]) == backend.eos_id
        assert lab[length - a - 1 : length - 1].tolist() == b["action_targets"][i].tolist()
        expect = backend.action_tokenizer.encode(normalize_actions(s["action"], backend.stats))
        assert b["action_targets"][i].tolist() == expect.tolist()
        # action_mask: sequence positions whose logits predict the action tokens
        pos = b["action_mask"][i].nonzero().flatten()
        assert len(pos) == a
        assert b["input_ids"][i, pos - n + 1].tolist() == b["action_targets"][i].tolist()
        # instruction_mask: sequence positions of the instruction's tokens
        ipos = b["instruction_mask"][i].nonzero().flatten() - n
        words = s["instruction"].lower()
        assert backend.tokenizer.decode(b["input_ids"][i, ipos]) == backend.tokenizer.decode(
            backend.tokenizer.encode(words, add_special_tokens=False)
        )
    assert backend.instruction_span("Slide the plate into the GOAL") == "slide the plate into the goal"


def test_collate_needs_stats():
    b = random_tiny_backend()
    b.stats = None
    with pytest.raises(ValueError, match="statistics"):
        b.collate(_samples(1))


def test_hidden_state_alignment(backend):
    b = backend.collate(_samples())
    out = backend.forward(b, output_hidden_states=True)
    n = backend.n_image_tokens
    B, T = b["input_ids"].shape
    assert out.logits.shape == (B, T + n, backend.vocab_end)
    assert len(out.hidden_states) == backend.num_layers + 1
    emb = backend.model.language_model.get_input_embeddings()(b["input_ids"])  # [B, T, D]
    h0 = out.hidden_states[0]
    assert torch.allclose(h0[:, 0], emb[:, 0])  # <s> at 0
    assert torch.allclose(h0[:, 1 + n :], emb[:, 1:])  # text position t at t + n_image_tokens
    patches = backend.model.image_embeddings(b["pixel_values"])
    assert torch.allclose(h0[:, 1 : 1 + n], patches)


def test_action_metrics_and_logprobs(backend):
    b = backend.collate(_samples())
    logits = backend.forward(b).logits
    m = backend.action_metrics(b, logits)
    assert set(m) == {"loss", "accuracy", "l1"} and m["loss"].requires_grad
    # perfect logits -> accuracy 1, l1 0
    perfect = torch.full_like(logits, -10.0)
    n = backend.n_image_tokens
    gt = b["labels"][:, 1:]
    for i in range(gt.shape[0]):
        for t in range(gt.shape[1]):
            if gt[i, t] != -100:
                perfect[i, n + t, gt[i, t]] = 10.0
    m = backend.action_metrics(b, perfect)
    assert float(m["accuracy"]) == 1.0 and float(m["l1"]) == 0.0 and float(m["loss"]) < 1e-3
    lp = backend.action_logprobs(b, perfect)
    assert lp.shape == (3, 4, 256)
    assert torch.equal(lp.argmax(-1) + backend.action_tokenizer.begin, b["action_targets"])


def test_smoothed_action_loss_is_ordinal(backend):
    """Pretraining's soft-label loss (model.pretrain.bin_sigma): with a tiny sigma it is the one-hot
    CE of the action tokens (+ the end token); with sigma = 2 a prediction one bin off costs less
    than one far off, while one-hot CE charges both the same."""
    import torch.nn.functional as F

    from vlaforget.train.pretrain import smoothed_action_loss

    b = backend.collate(_samples())
    n = backend.n_image_tokens
    logits = torch.randn(*b["input_ids"].shape[:1], b["input_ids"].shape[1] + n, backend.vocab_end)
    text_logits, gt = logits[:, n:-1], b["labels"][:, 1:]
    is_act = (gt >= backend.action_tokenizer.begin) & (gt < backend.vocab_end)
    is_eos = gt == backend.eos_id
    hard = F.cross_entropy(text_logits[is_act], gt[is_act]) + F.cross_entropy(text_logits[is_eos], gt[is_eos])
    assert torch.allclose(smoothed_action_loss(backend, b, logits, 1e-3), hard, atol=1e-5)

    def peaked(offset: int) -> torch.Tensor:
        out = torch.full_like(logits, -20.0)
        for i in range(gt.shape[0]):
            for t in range(gt.shape[1]):
                if gt[i, t] != -100:
                    tok = int(gt[i, t])
                    if is_act[i, t]:  # move towards the middle of the bins so the shift stays inside
                        mid = backend.action_tokenizer.begin + 128
                        tok = tok + offset if tok < mid else tok - offset
                    out[i, n + t, tok] = 20.0
        return out

    near, far = peaked(1), peaked(40)
    assert smoothed_action_loss(backend, b, near, 2.0) < smoothed_action_loss(backend, b, far, 2.0) - 1.0
    assert torch.allclose(backend.lm_loss(b, near), backend.lm_loss(b, far))


def test_decoder_layers_through_wrappers(backend):
    from peft import LoraConfig, get_peft_model

    model = random_tiny_backend().model
    b = TinyBackend(model, backend.tokenizer)
    layers = b.decoder_layers()
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=b.lora_targets(["attn"], [6, 7])))
    assert b.decoder_layers(pm) is layers
    assert b.decoder_layers(nn.DataParallel(pm)) is layers
    names = [n for n, _ in pm.named_modules() if n.endswith("lora_A")]
    assert names and all(".layers.6." in n or ".layers.7." in n for n in names)
    assert all("self_attn" in n for n in names)


def test_lora_targets(backend):
    t = backend.lora_targets(["attn", "mlp"], "all")
    assert len(t) == 8 * 7
    assert len(backend.lora_targets(["mlp"], [0, 1])) == 6
    v = backend.lora_targets(["vision"])
    assert v and all(x.startswith("vision_backbone.") for x in v)
    assert backend.lora_targets(["projector"]) == ["projector.fc1", "projector.fc2"]
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        backend.lora_targets(["everything"])
    with pytest.raises(ValueError, match="out of range"):
        backend.lora_targets(["attn"], [3, 9])


class _ScriptedModel(nn.Module):
    """Emits, for sample i at decode step k, the token table[i][k] (checks right-padded decoding)."""

    def __init__(self, table, prompt_lens, n_img, vocab):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.table, self.prompt_lens, self.n, self.v = table, prompt_lens, n_img, vocab

    def forward(self, input_ids, attention_mask, pixel_values, **kw):
        B, T = input_ids.shape
        logits = torch.zeros(B, T + self.n, self.v)
        for i in range(B):
            length = int(attention_mask[i].sum())
            k = length - self.prompt_lens[i]
            if k < len(self.table[i]):
                logits[i, length - 1 + self.n, self.table[i][k]] = 5.0
            logits[i, length + self.n :, 0] = 100.0  # garbage at padded positions
        return SimpleNamespace(logits=logits)


def test_predict_actions_unnormalises(backend):
    from vlaforget.models.prompts import encode_action_prompt

    instr = ["open the drawer", "press the button from the top"]
    lens = [len(encode_action_prompt(backend.tokenizer, s).ids) for s in instr]
    assert lens[0] != lens[1]
    want = np.array([[-1.0, 0.0, 0.5, 1.0], [0.99, -0.3, -0.7, -1.0]])
    table = backend.action_tokenizer.encode(want).tolist()
    fake = _ScriptedModel(table, lens, backend.n_image_tokens, backend.vocab_end)
    imgs = np.zeros((2, 32, 32, 3), np.uint8)
    normed = backend.predict_actions(imgs, instr, model=fake, normalized=True)
    assert np.abs(normed - want).max() <= 1 / 255 + 1e-6
    raw = backend.predict_actions(imgs, instr, model=fake)
    assert np.allclose(raw, unnormalize_actions(normed, STATS), atol=1e-6)
    assert raw[0, 2] == pytest.approx(0.0 + 0.5 * (normed[0, 2] + 1) * 2.0, abs=1e-5)
    assert raw[1, 3] == pytest.approx(normed[1, 3])  # gripper not normalised


def test_predict_and_answer_shapes(backend):
    imgs = np.zeros((2, 40, 40, 3), np.uint8)
    acts = backend.predict_actions(imgs, ["open the drawer", "open the door"])
    assert acts.shape == (2, 4) and acts.dtype == np.float32
    ans = backend.answer(imgs, ["is the gripper open?", "which task is this"])
    assert len(ans) == 2 and all(isinstance(a, str) for a in ans)


def test_collate_vqa(backend):
    samples = [
        {"image": np.zeros((32, 32, 3), np.uint8), "question": "is the gripper open?", "answer": "yes"},
        {"image": np.zeros((32, 32, 3), np.uint8), "question": "which task is this", "answer": "drawer"},
    ]
    b = backend.collate_vqa(samples)
    tok = backend.tokenizer
    for i, s in enumerate(samples):
        lab = b["labels"][i]
        kept = lab[lab != -100].tolist()
        assert kept == tok.encode(s["answer"], add_special_tokens=False) + [backend.eos_id]
    logits = backend.forward(b).logits
    assert torch.isfinite(backend.lm_loss(b, logits))
    assert b["answer_mask"].sum() == 4


def test_save_load_round_trip(backend, tmp_path):
    from peft import LoraConfig, get_peft_model

    b = backend.collate(_samples())
    ref = backend.forward(b, output_hidden_states=True)
    backend.save(tmp_path / "m")
    loaded = load_backend({"backend": "tiny", "path": str(tmp_path / "m"), "dtype": "fp32"})
    assert loaded.stats["q99"] == STATS["q99"]  # statistics travel with the model
    out = loaded.forward(loaded.collate(_samples()), output_hidden_states=True)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.hidden_states[5], ref.hidden_states[5])
    # adapters: a saved LoRA adapter reloads (merged) to the same outputs
    fresh = load_backend({"backend": "tiny", "path": str(tmp_path / "m")})
    pm = get_peft_model(
        fresh.model,
        LoraConfig(r=2, target_modules=fresh.lora_targets(["attn", "mlp"]), init_lora_weights=False),
    )
    with torch.no_grad():
        want = fresh.forward(b, model=pm).logits
    pm.save_pretrained(str(tmp_path / "adapter"))
    adapted = load_backend({"backend": "tiny", "path": str(tmp_path / "m")}, adapter_dir=tmp_path / "adapter")
    with torch.no_grad():
        got = adapted.forward(b).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, ref.logits, atol=1e-3)


def test_model_stage_pretrains_on_the_device_it_is_given(monkeypatch, tmp_path):
    """`vlaforget model --device` reaches build_tiny; without it the stage takes cuda when torch
    sees a GPU (before, the teacher always pretrained on the CPU, also under profiles/demo-gpu)."""
    import argparse
    from pathlib import Path

    from vlaforget.stages import model as model_stage

    seen = []

    def fake_build(sc, build_dir=None, device="cpu"):
        seen.append(device)
        Path(build_dir).mkdir(parents=True)
        return {"backend": "tiny"}

    monkeypatch.setattr(model_stage, "build_tiny", fake_build)
    sc = {
        "stage": "model",
        "root": str(tmp_path),
        "out_dir": str(tmp_path / "models" / "m"),
        "model": {"backend": "tiny"},
    }
    monkeypatch.setattr(model_stage, "load_stage_config", lambda path, stage: sc)
    monkeypatch.setattr("vlaforget.paths.apply_job_env", lambda root: None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert model_stage.main(argparse.Namespace(config="m.yaml", device=None)) == 0
    assert model_stage.main(argparse.Namespace(config="m.yaml", device="cpu")) == 0
    assert seen == ["cuda", "cpu"]
    p = argparse.ArgumentParser()
    model_stage.add_args(p)
    assert p.parse_args(["--config", "c.yaml", "--device", "cuda:1"]).device == "cuda:1"


def test_missing_model_dir_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the `model` stage"):
        load_backend({"backend": "tiny", "path": str(tmp_path / "nope")})


def test_model_stage_builds_pretrains_and_loads(demo_config, tmp_path):
    """Stage `model` (tiny): tokenizer + model + a few pretraining steps on a synthetic upstream
    cache, HF dir + done.json with held-out metrics; load_backend reads it back."""
    import argparse

    import yaml

    from vlaforget.data.cache import CachedDataset, write_cache
    from vlaforget.io import read_json
    from vlaforget.models.tiny import TEST_TINY
    from vlaforget.stageconfig import stage_config
    from vlaforget.stages.model import main

    cfg = demo_config
    cfg["model"]["tiny"] = dict(TEST_TINY)
    cfg["model"]["pretrain"] = {
        "steps": 3,
        "batch_size": 4,
        "lr": 1e-3,
        "vqa_fraction": 0.5,
        "seed": 0,
        "threads": 1,
    }
    sc = stage_config(cfg, "model", cfg["model"]["base"])
    rng = np.random.default_rng(0)
    tasks = sc["upstream"]["tasks"]
    eps = [
        {
            "images": rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8),
            "states": np.zeros((5, 4), np.float32),
            "actions": rng.uniform(-1, 1, (5, 4)).astype(np.float32),
            "env_states": rng.uniform(-0.3, 0.9, (5, 39)).astype(np.float32),
            "instruction": f"do task {k % len(tasks)}",
            "task": tasks[k % len(tasks)],
            "seed": k,
        }
        for k in range(20)
    ]
    write_cache(eps, sc["upstream"]["cache_dir"], sc["upstream"]["name"], 64, transform="metaworld")
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(sc))
    assert main(argparse.Namespace(config=str(path))) == 0
    done = read_json(f"{sc['out_dir']}/done.json")
    assert done["backend"] == "tiny" and done["num_layers"] == 8 and done["action_dim"] == 4
    assert 0 <= done["metrics"]["bc_token_accuracy"] <= 1 and "vqa_accuracy" in done["metrics"]
    mc = done["metrics"]["vqa_mc"]
    assert mc["n"] > 0 and 0 <= mc["accuracy"] <= 1 and 0 < mc["chance"] < 1
    assert done["provenance"]["versions"]["torch"]
    assert done["device"] == "cpu"  # no --device: cuda where torch sees one (the GPU profile), else cpu
    b = load_backend(sc["model"])
    ds = CachedDataset(sc["upstream"]["cache_dir"], split="train")
    assert b.stats["q99"] == pytest.approx(ds.statistics["action"]["q99"])  # upstream statistics travel
    assert b.instruction_span("do task 1") == "do task 1"  # episode instructions are in the vocabulary
    assert b.predict_actions(np.zeros((1, 64, 64, 3), np.uint8), ["do task 0"]).shape == (1, 4)


def test_predict_restores_each_modules_training_flag(backend):
    """predict_actions runs in eval mode and then puts back exactly the flags each module had
    (a frozen submodule left in eval mode by the trainer stays in eval mode)."""
    m = backend.model
    m.train()
    frozen = list(m.modules())[3]
    frozen.eval()
    before = {name: mod.training for name, mod in m.named_modules()}
    seen = {}
    orig = backend._greedy

    def spy(*a, **k):
        seen["any_training"] = any(mod.training for mod in m.modules())
        return orig(*a, **k)

    backend._greedy = spy
    try:
        s = _samples(2)
        backend.predict_actions([x["image"] for x in s], [x["instruction"] for x in s])
    finally:
        del backend._greedy
    assert seen["any_training"] is False
    assert {name: mod.training for name, mod in m.named_modules()} == before
    assert before[next(n for n, mod in m.named_modules() if mod is frozen)] is False
    m.eval()
