"""Stage `model`: build + pretrain the tiny teacher, or check that an OpenVLA base is available offline.

tiny: train the word-level tokenizer on the instruction + VQA corpus, build the model from
`model.tiny`, pretrain it (train/pretrain.py: behaviour cloning on the upstream cache mixed with VQA
on its frames and on those of `model.pretrain.vqa_datasets`),
save the HF directory to out_dir, then `{out_dir}/done.json` (held-out teacher metrics, provenance).
openvla: resolve the model folder offline (local path, or hub id in cache_dir with HF_HUB_OFFLINE=1),
check its config and remote-code files, and record what was found in `{out_dir}/done.json`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..io import log, provenance, seed_everything, write_json
from ..settings import DEFAULT_VQA_HELDOUT_SAMPLES, DEFAULT_VQA_TRAIN_SAMPLES, PretrainSettings
from ..stagefile import load_stage_config

VQA_TRAIN_SAMPLES = (
    DEFAULT_VQA_TRAIN_SAMPLES  # defaults of model.pretrain.vqa_train_samples / vqa_heldout_samples
)
VQA_HELDOUT_SAMPLES = DEFAULT_VQA_HELDOUT_SAMPLES


def tokenizer_corpus(sc: dict, datasets: list, vqa: list) -> list[str]:
    """Instructions (built-in paraphrases of every configured task + the episodes' own) and VQA text."""
    from ..data.instructions import instructions_for

    texts: list[str] = []
    for blk in [sc["upstream"]] + list(sc.get("corpus_datasets") or []):
        for task in blk.get("tasks") or []:
            texts += instructions_for(task, sc.get("instructions") or {})
            texts.append(task.replace("-", " "))
    for ds in datasets:
        texts += [e["instruction"] for e in ds.episodes]
    for s in vqa:
        texts += [str(s["question"]), str(s["answer"])]
    return texts


def build_tiny(sc: dict, build_dir: str | Path | None = None, device: str = "cpu") -> dict:
    """Build and pretrain the tiny teacher of a model stage config `sc` on `device`; save it to
    `build_dir` (default sc["out_dir"]). Returns the done.json record (sizes, recipe, held-out metrics)."""
    import torch

    from ..data.cache import CachedDataset
    from ..data.vqa import vqa_samples
    from ..models.tiny import build_tiny_backend
    from ..train.pretrain import heldout_metrics, pretrain

    pcfg = PretrainSettings.of(sc.get("pretrain") or {})
    seed = pcfg.seed
    torch.set_num_threads(pcfg.threads)
    seed_everything(seed)
    up = sc["upstream"]
    cache_dir = Path(up["cache_dir"])
    if not (cache_dir / "manifest.json").exists():
        raise FileNotFoundError(
            f"upstream dataset cache {cache_dir} is missing (no manifest.json): run the "
            f"`cache` stage for dataset '{up['name']}' first"
        )
    train = CachedDataset(cache_dir, split="train")
    heldout = CachedDataset(cache_dir, split="heldout")
    n_vqa = pcfg.vqa_train_samples
    n_vqa_held = pcfg.vqa_heldout_samples
    vqa_train = vqa_samples(train, n_vqa, seed) if n_vqa else []
    vqa_held = vqa_samples(heldout, n_vqa_held, seed + 1) if len(heldout) and n_vqa_held else []
    # model.pretrain.vqa_datasets: questions on more scenes (e.g. the downstream suite's, issue 27.4),
    # vqa_train_samples each, mixed into the VQA batches; their held-out questions are scored apart
    blocks = {b["name"]: b for b in sc.get("corpus_datasets") or []}
    extra_held: dict[str, list] = {}
    for name in pcfg.vqa_datasets:
        if name not in blocks:
            raise ValueError(f"model.pretrain.vqa_datasets: '{name}' is not among the model job's datasets")
        xdir = Path(blocks[name]["cache_dir"])
        if not (xdir / "manifest.json").exists():
            raise FileNotFoundError(f"dataset cache {xdir} missing: run the cache stage for '{name}'")
        xtrain, xheld = CachedDataset(xdir, split="train"), CachedDataset(xdir, split="heldout")
        vqa_train += vqa_samples(xtrain, n_vqa, seed) if n_vqa else []
        if len(xheld) and n_vqa_held:
            extra_held[name] = vqa_samples(xheld, n_vqa_held, seed + 1)
    corpus = tokenizer_corpus(
        sc, [train, heldout], vqa_train + vqa_held + [s for v in extra_held.values() for s in v]
    )
    tiny = dict(sc["tiny"])
    backend = build_tiny_backend(
        tiny, corpus, action_dim=train.action_dim, seed=seed, stats=train.statistics, device=device
    )
    n_params = sum(p.numel() for p in backend.model.parameters())
    log.info(
        "tiny teacher: %.2fM parameters, vocab %d (%d words + 256 action tokens), %d image tokens",
        n_params / 1e6,
        backend.vocab_end,
        backend.vocab_end - 256,
        backend.n_image_tokens,
    )
    t0 = time.time()
    hist = pretrain(backend, train, vqa_train, pcfg)
    metrics = heldout_metrics(backend, heldout, vqa_held)
    if vqa_held:  # the teacher's own multiple-choice score on its held-out questions (eval/vqa_mc.py)
        from ..eval.vqa_mc import mc_metrics, score_mc

        ll = score_mc(backend, vqa_held, 64)
        mc = mc_metrics(vqa_held, ll, ll)
        metrics["vqa_mc"] = {k: mc[k] for k in ("accuracy", "chance", "n", "by_category")}
    for name, held in extra_held.items():  # questions on the extra datasets' scenes, apart
        from ..eval.vqa_mc import mc_metrics, score_mc

        ll = score_mc(backend, held, 64)
        mc = mc_metrics(held, ll, ll)
        metrics.setdefault("vqa_mc_by_dataset", {})[name] = {
            k: mc[k] for k in ("accuracy", "chance", "n", "by_category")
        }
    log.info("teacher held-out metrics: %s", {k: v for k, v in metrics.items() if not isinstance(v, dict)})
    out_dir = Path(sc["out_dir"])
    build = Path(build_dir) if build_dir else out_dir  # main(): a temp dir renamed into place
    backend.save(build)
    write_json(build / "pretrain_history.json", hist)
    return {
        "backend": "tiny",
        "path": str(out_dir),
        "parameters": n_params,
        "vocab_size": backend.vocab_end,
        "n_image_tokens": backend.n_image_tokens,
        "num_layers": backend.num_layers,
        "hidden_size": backend.hidden_size,
        "action_dim": backend.action_dim,
        "upstream": up["name"],
        "train_samples": len(train),
        "heldout_samples": len(heldout),
        "vqa_train_samples": len(vqa_train),
        "pretrain": dict(sc.get("pretrain") or {}),  # the block as configured (done.json unchanged)
        "tiny": tiny,
        "pretrain_seconds": time.time() - t0,
        "metrics": metrics,
    }


def check_openvla(sc: dict) -> dict:
    from ..models.openvla import OpenVLAUnavailable, check_remote_code, offline_env, resolve_model_path

    m = sc["model"]
    offline_env(m.get("cache_dir"))
    path = resolve_model_path(str(m["path"]), m.get("cache_dir"))
    info = check_remote_code(path)
    if info["missing_code_files"]:
        raise FileNotFoundError(
            f"{path} lacks OpenVLA's modelling files {info['missing_code_files']} named "
            "in config.json auto_map: download the full repository (not only weights)"
        )
    if not info["weight_files"]:
        raise FileNotFoundError(f"{path} holds no *.safetensors / *.bin weights: the download is incomplete")
    # The stack the later stages load the model with: fail here, naming the fix, not in the probe stage.
    from ..preflight import Report, check_stack

    rep = Report()
    check_stack(rep)
    if rep.problems:
        raise OpenVLAUnavailable("the jobs' Python cannot load OpenVLA:\n" + rep.message())
    import timm

    info["timm"] = timm.__version__
    return {"backend": "openvla", "requested": m["path"], **info}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="stage config (vlaforget stage-config model ...)")
    p.add_argument(
        "--device",
        default=None,
        help="torch device the tiny teacher is pretrained on (default: cuda if available, else cpu)",
    )


def main(args) -> int:
    sc = load_stage_config(args.config, "model")
    from ..paths import apply_job_env

    apply_job_env(Path(sc["root"]))
    out_dir = Path(sc["out_dir"])
    done = out_dir / "done.json"
    if done.exists():
        done.unlink()  # a rebuilt model must not look finished before it is
    backend = sc["model"]["backend"]
    build = None
    if backend == "tiny":
        # written to a temp dir and renamed into place (a kill never leaves a half-saved teacher)
        import shutil

        for stale in out_dir.parent.glob(f".{out_dir.name}.*-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        from ..gpus import pick_device

        device = pick_device(getattr(args, "device", None))
        result = build_tiny(sc, build_dir=build, device=device)
        result["device"] = device
    elif backend == "openvla":
        result = check_openvla(sc)
    else:
        raise ValueError(f"unknown model.backend '{backend}': use 'tiny' or 'openvla'")
    result.update(provenance=provenance(), code=sc.get("code"), stage_config=str(args.config))
    if build is not None:
        from ..io import replace_dir

        write_json(build / "done.json", result)
        replace_dir(build, out_dir)
    else:
        write_json(done, result)
    log.info("model stage done: %s", done)
    return 0
