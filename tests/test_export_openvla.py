"""`vlaforget export` of a run on OpenVLA's REAL architecture (tiny random checkpoint of openvla's
HF modelling code, as tests/test_openvla_backend.py builds it), loaded the way openvla's own
evaluation loads a fine-tuned checkpoint: experiments/robot/openvla_utils.py `get_vla` /
`get_processor`, `predict_action(unnorm_key=...)`, and run_libero_eval.py's unnorm-key lookup.

Needs VLAFORGET_OPENVLA_CODE and timm 0.9.x (docs/models.md); skips with the reason otherwise.
With VLAFORGET_OPENVLA_REPO (an openvla checkout or bare git clone) it also runs openvla's own
`get_vla` / `get_processor` and run_libero_eval.py's unnorm-key block from their source.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_openvla_backend import ACTION_BEGIN, FILES, REASON, VOCAB_END, ckpt  # noqa: F401 (fixture)
from train_fixtures import base_stage, make_cache

pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

DATASET = "libero_spatial_no_noops"  # the RLDS name the run trains on = the unnorm key
SUITE = "libero_spatial"  # run_libero_eval.py's --task_suite_name


def openvla_get_vla(checkpoint: str):
    """openvla experiments/robot/openvla_utils.py get_vla + get_processor, line for line, except
    fp32 on CPU without flash-attention-2 (get_vla: bf16, attn_implementation="flash_attention_2",
    low_cpu_mem_usage, .to(cuda)). The AutoConfig/AutoModel.register calls of get_vla register
    the same classes the checkpoint's auto_map names; trust_remote_code loads them from the folder."""
    from transformers import AutoModelForVision2Seq, AutoProcessor

    vla = AutoModelForVision2Seq.from_pretrained(
        checkpoint, torch_dtype=torch.float32, low_cpu_mem_usage=True, trust_remote_code=True
    )
    dataset_statistics_path = os.path.join(checkpoint, "dataset_statistics.json")
    if os.path.isfile(dataset_statistics_path):
        with open(dataset_statistics_path) as f:
            norm_stats = json.load(f)
        vla.norm_stats = norm_stats
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    return vla, processor


def run_libero_eval_unnorm_key(task_suite_name: str, norm_stats: dict) -> str:
    """run_libero_eval.py eval_libero(): cfg.unnorm_key = cfg.task_suite_name, then the
    `_no_noops` fallback and the assert, verbatim."""
    unnorm_key = task_suite_name
    if unnorm_key not in norm_stats and f"{unnorm_key}_no_noops" in norm_stats:
        unnorm_key = f"{unnorm_key}_no_noops"
    assert unnorm_key in norm_stats, f"Action un-norm key {unnorm_key} not found in VLA `norm_stats`!"
    return unnorm_key


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):  # noqa: F811
    """Train two LoRA steps with the real train stage on a LIBERO-named cache, then export."""
    from vlaforget.export import export_run
    from vlaforget.train.loop import run_training

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("data") / "vlaforget"
    cache = make_cache(root, name=DATASET, n_per_task=2, T=4, size=64, action_dim=7)
    sc = base_stage(root, cache, ckpt, max_steps=2, batch_size=2, lr=3e-3)
    sc["model"] = {
        "backend": "openvla",
        "base": "openvla-toy",
        "path": str(ckpt),
        "dtype": "fp32",
        "cache_dir": str(root / "hf_cache"),
    }
    sc["suite"] = DATASET
    sc["dataset"] = dict(sc["dataset"], name=DATASET)
    run_training(sc)
    run_dir = root / "runs" / sc["run_name"]
    export_run(run_dir)
    return root / "exports" / sc["run_name"], run_dir, sc


def _obs(n=2, seed=3):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8)
    return imgs, ["pick up the black bowl and place it on the plate", "open the top drawer"][:n]


def test_layout_like_finetune_merged_checkpoint(exported, ckpt):  # noqa: F811
    out, run_dir, _ = exported
    names = {p.name for p in out.iterdir()}
    assert set(FILES) <= names and "dataset_statistics.json" in names
    assert any(n.endswith(".safetensors") for n in names) and not any("adapter" in n for n in names)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForVision2Seq"] == "modeling_prismatic.OpenVLAForActionPrediction"
    assert "AutoProcessor" in json.loads((out / "preprocessor_config.json").read_text())["auto_map"]
    run_stats = json.loads((run_dir / "final" / "dataset_statistics.json").read_text())
    assert json.loads((out / "dataset_statistics.json").read_text()) == run_stats  # as finetune.py
    assert set(cfg["norm_stats"]) == {"toy_ds", DATASET}  # the base's keys stay, the suite's added
    assert cfg["norm_stats"][DATASET] == run_stats[DATASET]


def test_openvla_predict_action_equals_project_predict_actions(exported):
    """openvla's loaders + predict_action on the export == the project's predict_actions on the
    base with the run's adapter merged (both restricted to the action tokens: the random toy LLM
    would otherwise emit non-action ids that openvla clips to the extreme bins)."""
    from PIL import Image

    from vlaforget.models import load_backend

    out, run_dir, sc = exported
    vla, processor = openvla_get_vla(str(out))
    key = run_libero_eval_unnorm_key(SUITE, vla.norm_stats)
    assert key == DATASET

    run_stats = json.loads((run_dir / "final" / "dataset_statistics.json").read_text())[DATASET]
    merged = load_backend(sc["model"], adapter_dir=run_dir / "final", stats=run_stats)
    base = load_backend(sc["model"], stats=run_stats)
    imgs, text = _obs()
    ours = merged.predict_actions(imgs, text)
    suppress = list(range(ACTION_BEGIN)) + list(range(VOCAB_END, 32064))
    theirs = []
    for img, t in zip(imgs, text):
        prompt = f"In: What action should the robot take to {t.lower()}?\nOut:"  # get_vla_action
        inputs = processor(prompt, Image.fromarray(img).convert("RGB"))
        with torch.no_grad():
            theirs.append(
                vla.predict_action(**inputs, unnorm_key=key, do_sample=False, suppress_tokens=suppress)
            )
    assert np.allclose(np.stack(theirs), ours, atol=1e-5), (theirs, ours)

    # the merge is real: the trained adapter changes the actions, and the export's weights
    assert not np.allclose(base.predict_actions(imgs, text), ours, atol=1e-3)
    sd_e, sd_b = vla.state_dict(), base.model.state_dict()
    assert any(not torch.equal(sd_e[k], sd_b[k]) for k in sd_b)

    # and the project loads its own export: norm_stats hold two keys, the unnorm key picks the suite
    own = load_backend({"backend": "openvla", "path": str(out), "dtype": "fp32", "unnorm_key": DATASET})
    assert own.stats == merged.stats
    assert np.allclose(own.predict_actions(imgs, text), ours, atol=1e-5)


OPENVLA_REPO = os.environ.get("VLAFORGET_OPENVLA_REPO")


def openvla_source(rel: str) -> str:
    """A file of the openvla repository: from a checkout, or `git show HEAD:rel` of a bare clone."""
    repo = Path(OPENVLA_REPO)
    if (repo / rel).exists():
        return (repo / rel).read_text()
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"HEAD:{rel}"], check=True, capture_output=True, text=True
    ).stdout


def _function(src: str, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == name)


@pytest.mark.skipif(not OPENVLA_REPO, reason="env VLAFORGET_OPENVLA_REPO is not set (an openvla checkout)")
def test_openvla_own_get_vla_and_libero_eval_key_block_run_on_the_export(exported):
    """openvla's get_vla / get_processor and the unnorm-key lines of run_libero_eval.py's
    eval_libero, executed from openvla's source. The only substitution: AutoModelForVision2Seq's
    from_pretrained loads fp32 with sdpa attention (CPU: no flash-attention-2; openvla's
    cached generate breaks the eager mask in transformers 4.40);
    the `prismatic.extern.hf` classes get_vla registers are the checkpoint's own files."""
    import importlib
    import sys

    import transformers
    from PIL import Image

    from vlaforget.models import load_backend

    out, run_dir, sc = exported
    real = transformers.AutoModelForVision2Seq

    class AutoModelForVision2Seq:  # get_vla's call, but fp32 / sdpa on this CPU
        register = real.register

        @staticmethod
        def from_pretrained(path, **kw):
            kw.update(attn_implementation="sdpa", torch_dtype=torch.float32)
            return real.from_pretrained(path, **kw)

    sys.path.insert(0, str(out.parent))
    code = {
        m: importlib.import_module(f"{out.name}.{m}")
        for m in ("configuration_prismatic", "modeling_prismatic", "processing_prismatic")
    }
    utils_src = openvla_source("experiments/robot/openvla_utils.py")
    ns = {
        "os": os,
        "json": json,
        "torch": torch,
        "DEVICE": torch.device("cpu"),
        "AutoConfig": transformers.AutoConfig,
        "AutoImageProcessor": transformers.AutoImageProcessor,
        "AutoProcessor": transformers.AutoProcessor,
        "AutoModelForVision2Seq": AutoModelForVision2Seq,
        "OpenVLAConfig": code["configuration_prismatic"].OpenVLAConfig,
        "OpenVLAForActionPrediction": code["modeling_prismatic"].OpenVLAForActionPrediction,
        "PrismaticImageProcessor": code["processing_prismatic"].PrismaticImageProcessor,
        "PrismaticProcessor": code["processing_prismatic"].PrismaticProcessor,
    }
    for name in ("get_vla", "get_processor"):
        fn = compile(ast.Module([_function(utils_src, name)], []), "openvla_utils.py", "exec")
        exec(fn, ns)  # noqa: S102 (openvla's own source)
    cfg = types.SimpleNamespace(
        pretrained_checkpoint=str(out),
        load_in_8bit=False,
        load_in_4bit=False,
        task_suite_name=SUITE,
        model_family="openvla",
    )
    model = ns["get_vla"](cfg)
    processor = ns["get_processor"](cfg)

    # eval_libero: `cfg.unnorm_key = cfg.task_suite_name`, then the `if cfg.model_family == "openvla":`
    # block that checks (and, for _no_noops datasets, fixes) the key against model.norm_stats
    body = _function(openvla_source("experiments/robot/libero/run_libero_eval.py"), "eval_libero").body
    i = next(k for k, n in enumerate(body) if "cfg.unnorm_key = cfg.task_suite_name" in ast.unparse(n))
    block = next(n for n in body[i + 1 :] if isinstance(n, ast.If) and "norm_stats" in ast.unparse(n))
    lines = compile(ast.Module([body[i], block], []), "run_libero_eval.py", "exec")
    exec(lines, {"cfg": cfg, "model": model})  # noqa: S102 (openvla's own source)
    assert cfg.unnorm_key == DATASET

    run_stats = json.loads((run_dir / "final" / "dataset_statistics.json").read_text())[DATASET]
    merged = load_backend(sc["model"], adapter_dir=run_dir / "final", stats=run_stats)
    imgs, text = _obs()
    ours = merged.predict_actions(imgs, text)
    suppress = list(range(ACTION_BEGIN)) + list(range(VOCAB_END, 32064))
    for img, t, a in zip(imgs, text, ours):
        inputs = processor(
            f"In: What action should the robot take to {t.lower()}?\nOut:",
            Image.fromarray(img).convert("RGB"),
        )
        with torch.no_grad():
            ref = model.predict_action(
                **inputs, unnorm_key=cfg.unnorm_key, do_sample=False, suppress_tokens=suppress
            )
        assert np.allclose(ref, a, atol=1e-5), (ref, a)
