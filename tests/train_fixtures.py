"""Tiny real inputs for training tests: a random tiny VLA saved as an HF dir, a real dataset cache, probe + ICSM + CRaFT anchors from the real stages."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import yaml

TASKS = ["drawer-open-v3", "button-press-v3"]
INSTR = {"drawer-open-v3": "open the drawer", "button-press-v3": "press the button"}


def synthetic_episodes(n_per_task=4, T=10, size=32, action_dim=4, seed=0):
    rng = np.random.default_rng(seed)
    eps = []
    for k in range(n_per_task):
        for task in TASKS:
            eps.append(
                {
                    "images": rng.integers(0, 255, (T, size, size, 3), dtype=np.uint8),
                    "states": rng.normal(size=(T, 4)).astype(np.float32),
                    "env_states": rng.normal(size=(T, 39)).astype(np.float32),
                    "actions": np.clip(rng.normal(scale=0.5, size=(T, action_dim)), -1, 1).astype(np.float32),
                    "instruction": INSTR[task],
                    "task": task,
                    "seed": k,
                    "success": True,
                }
            )
    return eps


def make_cache(root: Path, name="toy", train_split=0.75, n_per_task=6, transform="metaworld", **kw) -> Path:
    """A real cache (the same writer the cache stage uses after reading RLDS; no TensorFlow);
    Meta-World-shaped data, so Meta-World's (identity) action transform.
    12 episodes: 8 train, 4 held out (data.heldout per_task: the last 2 of each task) -- the probe
    comes from the held-out ones."""
    from vlaforget.data.cache import write_cache

    eps = synthetic_episodes(n_per_task=n_per_task, **kw)
    out = root / "datasets" / "cache" / name
    write_cache(
        eps, out, name, image_size=eps[0]["images"].shape[1], train_split=train_split, transform=transform
    )
    return out


def make_model(root: Path) -> Path:
    from vlaforget.models.tiny import random_tiny_backend

    b = random_tiny_backend(seed=0)
    path = root / "models" / "tiny"
    b.save(path)
    return path


def base_stage(
    root: Path, cache: Path, model: Path, method_name="baseline", method=None, **train_over
) -> dict:
    train = {
        "max_steps": 6,
        "batch_size": 4,
        "grad_accum": 1,
        "lr": 1e-3,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": None,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "image_aug": False,
        "save_steps": 3,
        "log_every": 1,
        "num_workers": 0,
        "nproc": 1,
        "use_wandb": False,
        "eval_every": 0,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["attn", "mlp"], "layers": "all"},
    }
    train.update(train_over)
    m = {"hsw": {"enabled": False}, "thermostat": {"enabled": False}, "craft": {"enabled": False}}
    if method:
        for k, v in method.items():
            m[k] = dict(v)
    run = f"toy__{method_name}__full__s1"
    return {
        "stage": "train",
        "root": str(root),
        "allowed_root": str(root.parent),
        "world": "metaworld",
        "run_name": run,
        "run_id": f"{run}-test",
        "method_name": method_name,
        "suite": "toy",
        "shots": None,
        "seed": 1,
        "model": {
            "backend": "tiny",
            "base": "tiny",
            "path": str(model),
            "dtype": "fp32",
            "cache_dir": str(root / "hf_cache"),
        },
        "dataset": {"name": "toy", "cache_dir": str(cache), "tasks": TASKS},
        "train": train,
        "method": m,
        "out_dir": str(root / "runs" / run),
        "icsm_dir": str(root / "artifacts" / "icsm"),
        "probe_dir": str(root / "probe"),
        "craft_dir": str(root / "artifacts" / "craft"),
    }


def run_stage(module, sc: dict, path: Path) -> None:
    """Run a stage on a hand-made config that records the stage's real code hash, as the workflow's
    configs do (a job started on other code refuses to run: stagefile.check_code)."""
    from vlaforget import codedeps

    sc = {**sc, "code": codedeps.code_hash(sc["stage"])}
    path.write_text(yaml.safe_dump(sc))
    assert module.main(argparse.Namespace(config=str(path))) == 0


def make_teacher_artifacts(root: Path, cache: Path, model: Path) -> None:
    """Run the real probe, icsm and craft-anchors stages on the tiny model."""
    from vlaforget.stages import craft_anchors as craft
    from vlaforget.stages import icsm, probe

    mb = {
        "backend": "tiny",
        "base": "tiny",
        "path": str(model),
        "dtype": "fp32",
        "cache_dir": str(root / "hf_cache"),
    }
    ds = {"name": "toy", "cache_dir": str(cache), "tasks": TASKS}
    common = {"root": str(root), "allowed_root": str(root.parent), "world": "metaworld"}
    run_stage(
        probe,
        {
            **common,
            "stage": "probe",
            "model": mb,
            "dataset": ds,
            "n": 24,
            "seed": 0,
            "split": "heldout",
            "trained_suites": ["toy"],
            "batch_size": 8,
            "out_dir": str(root / "probe"),
        },
        root / "probe.yaml",
    )
    run_stage(
        icsm,
        {
            **common,
            "stage": "icsm",
            "model": mb,
            "probe_dir": str(root / "probe"),
            "icsm": {
                "r": 8,
                "sensitivity_samples": 8,
                "direction_batch": 8,
                "layers": "auto",
                "groups": None,
            },
            "out_dir": str(root / "artifacts" / "icsm"),
        },
        root / "icsm.yaml",
    )
    run_stage(
        craft,
        {
            **common,
            "stage": "craft_anchors",
            "model": mb,
            "dataset": ds,
            "seed": 0,
            "craft": {"layer": -2, "pooling": "mean_image_tokens", "n_anchors": 16, "batch_size": 8},
            "out_dir": str(root / "artifacts" / "craft"),
        },
        root / "craft.yaml",
    )


def clone(sc: dict, **over) -> dict:
    out = copy.deepcopy(sc)
    out.update(over)
    return out


# CRaFT with a dual variable that moves fast (tests of the loop and of its speed paths)
CRAFT_TEST = {
    "enabled": True,
    "epsilon": 0.0,
    "lambda_init": 0.0,
    "lambda_lr": 0.5,
    "dual": True,
    "fixed_lambda": 0.1,
    "projection": True,
    "anchor": "mean_image_tokens",
}


def teacher_world(tmp_path_factory, name: str):
    """(root, cache, model) with the teacher's probe / ICSM / CRaFT artifacts, under a fresh tmp root."""
    root = tmp_path_factory.mktemp(name) / "data" / "vlaforget"
    root.mkdir(parents=True)
    cache = make_cache(root)
    model = make_model(root)
    make_teacher_artifacts(root, cache, model)
    return root, cache, model


def run_metrics(sc) -> list[dict]:
    """A run's metrics.jsonl records."""
    return [json.loads(line) for line in (Path(sc["out_dir"]) / "metrics.jsonl").read_text().splitlines()]


def run_adapter(sc) -> dict:
    """A finished run's adapter tensors."""
    from safetensors.torch import load_file

    return load_file(str(Path(sc["out_dir"]) / "final" / "adapter_model.safetensors"))
