"""`python -m vlaforget.models.openvla_tiny`: a tiny random checkpoint of OpenVLA's real architecture
that a FRESH process loads with openvla's own remote code (real registered timm ids, no registration
code), as the rehearsal's jobs do (profiles/rehearsal-openvla). Needs VLAFORGET_OPENVLA_CODE and timm
0.9.x (docs/models.md); skips with the reason otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_openvla_backend import REASON

needs_code = pytest.mark.skipif(REASON is not None, reason=str(REASON))

SRC = Path(__file__).resolve().parents[1] / "src"

LOAD = r"""
import json, sys, numpy as np, torch, timm
from vlaforget.models import load_backend
b = load_backend({"backend": "openvla", "path": sys.argv[1], "dtype": "fp32"})
img = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
acts = b.predict_actions(img, ["pick up the black bowl", "Put the cream cheese in the bowl"])
ids = b.tokenizer("turn on the stove and put the moka pot on it").input_ids
vb = b.model.vision_backbone
print(json.dumps({"cls": type(b.model).__name__, "n_image_tokens": b.n_image_tokens,
  "vocab_end": b.vocab_end, "begin": b.action_tokenizer.begin, "layers": b.num_layers,
  "towers": [type(vb.featurizer).__name__, type(vb.fused_featurizer).__name__],
  "prefix": [vb.featurizer.num_prefix_tokens, vb.fused_featurizer.num_prefix_tokens],
  "unk": b.tokenizer.unk_token_id in ids, "stats_q99": b.stats["q99"], "shape": list(acts.shape),
  "finite": bool(np.isfinite(acts).all()), "registered": [timm.is_model(m.split(".")[0]) for m in
  b.model.config.timm_model_ids], "sep": b.action_sep_ids}))
"""


@needs_code
@pytest.mark.slow  # minutes on a shared 2-core box
def test_fresh_process_loads_the_tiny_checkpoint_through_openvla_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "USE_TF": "0", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    out = tmp_path / "openvla-tiny"
    r = subprocess.run(
        [sys.executable, "-m", "vlaforget.models.openvla_tiny", "--out", str(out)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["timm_model_ids"] == [
        "vit_small_patch14_reg4_dinov2.lvd142m",
        "vit_small_patch14_dinov2.lvd142m",
    ]
    assert cfg["auto_map"]["AutoModelForVision2Seq"] == "modeling_prismatic.OpenVLAForActionPrediction"
    assert "bridge_orig" in cfg["norm_stats"]  # openvla's predict_action and preflight need norm_stats
    r = subprocess.run(
        [sys.executable, "-c", LOAD, str(out)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["cls"] == "OpenVLAForActionPrediction" and info["towers"] == ["VisionTransformer"] * 2
    assert info["n_image_tokens"] == 256 and info["prefix"] == [5, 1]  # cls + 4 registers; cls only
    assert info["vocab_end"] == 32000 and info["begin"] == 31744 and info["layers"] == 4
    assert info["registered"] == [True, True] and info["sep"] == [29871]
    assert not info["unk"]  # every printable character is in the toy BPE's alphabet
    assert info["stats_q99"] == [1.0] * 7 and info["shape"] == [2, 7] and info["finite"]


def test_missing_code_is_named(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "VLAFORGET_OPENVLA_CODE": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "vlaforget.models.openvla_tiny", "--out", str(tmp_path / "x")],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "lacks ['configuration_prismatic.py'" in r.stderr


LIBERO = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "open the top drawer and put the bowl inside",
    "pick up the alphabet soup and place it in the basket",
)


def test_toy_tokenizer_splits_punctuation_like_llama_so_instruction_spans_are_exact():
    """The rehearsal's probe audit flagged every instruction span: the toy BPE had merged
    "▁plate?\nOut:" into one token. Llama's sentencepiece keeps "?", "\n", "Out", ":" apart."""
    from vlaforget.models.openvla_tiny import llama_like_tokenizer
    from vlaforget.models.prompts import action_prompt, encode_action_prompt

    tok = llama_like_tokenizer()
    for s in LIBERO:
        assert encode_action_prompt(tok, s).exact, s
        pieces = tok.convert_ids_to_tokens(tok(action_prompt(s)).input_ids)
        assert pieces[-4:] == ["?", "\n", "Out", ":"], pieces[-6:]
        assert tok.unk_token_id not in tok(s).input_ids
        assert tok.decode(tok(action_prompt(s)).input_ids, skip_special_tokens=True) == action_prompt(s)
