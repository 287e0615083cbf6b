"""Sweep of tiny-teacher recipes: demos -> cache -> build + pretrain -> closed-loop success.

Each variant is a JSON object overriding DEFAULT below (data keys: tasks, randomization, camera,
episodes_per_task; model keys: patch_size, vision_hidden, hidden, layers; pretraining keys: steps,
batch_size, lr, bin_sigma, image_aug, vqa_fraction). Demonstrations are generated once per data key.
Closed-loop success is measured with the batched engine on held-out seeds (500000+), the same
protocol as the eval stage. Writes one JSON line per variant to --out.

    python bench/teacher_sweep.py --out sweep.jsonl --device cuda --workers 12 \\
        --variants '[{"steps": 1000}, {"steps": 1000, "bin_sigma": 2}]'
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np

DEFAULT = {
    "tasks": ["button-press-topdown-v3", "drawer-open-v3", "door-open-v3", "plate-slide-v3"],
    "randomization": 1.0,
    "camera": "corner3",
    "episodes_per_task": 24,
    "max_steps": 150,
    "patch_size": 16,
    "vision_hidden": 128,
    "vision_layers": 3,
    "hidden": 128,
    "layers": 8,
    "steps": 800,
    "batch_size": 32,
    "lr": 1e-3,
    "bin_sigma": 0.0,
    "image_aug": True,
    "vqa_fraction": 0.3,
    "eval_episodes": 10,
    "eval_max_steps": 150,
    "seed": 0,
}


def make_cache(v: dict, root: Path, workers: int) -> Path:
    from PIL import Image

    from vlaforget.data.cache import write_cache
    from vlaforget.data.metaworld_demos import generate, interleave

    key = (
        f"{'_'.join(t[:6] for t in v['tasks'])}_r{v['randomization']}_{v['camera']}_e{v['episodes_per_task']}"
    )
    out = root / key
    if (out / "manifest.json").exists():
        return out
    kept, _counts = generate(
        list(v["tasks"]),
        int(v["episodes_per_task"]),
        1000,
        camera=v["camera"],
        render_size=64,
        max_steps=int(v["max_steps"]),
        workers=workers,
        randomization=float(v["randomization"]),
    )
    eps = []
    for ep in interleave(kept):
        imgs = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in ep["images"]]
        eps.append(dict(ep, images=imgs))
    write_cache(eps, out, key, image_size=64, extra={"camera": v["camera"]}, transform="metaworld")
    return out


def run_variant(v: dict, cache: Path, device: str, workers: int) -> dict:
    import torch

    from vlaforget.data.cache import CachedDataset
    from vlaforget.data.instructions import canonical_instruction
    from vlaforget.data.vqa import vqa_samples
    from vlaforget.envs.metaworld import MetaWorldFactory
    from vlaforget.eval.closed_loop import BackendPolicy
    from vlaforget.eval.rollout import make_episodes, run_episodes
    from vlaforget.io import seed_everything
    from vlaforget.models.tiny import build_tiny_backend
    from vlaforget.settings import PretrainSettings
    from vlaforget.stages.model import VQA_HELDOUT_SAMPLES, VQA_TRAIN_SAMPLES, tokenizer_corpus
    from vlaforget.train.pretrain import heldout_metrics, pretrain

    seed_everything(int(v["seed"]))
    train = CachedDataset(cache, split="train")
    held = CachedDataset(cache, split="heldout")
    vqa_train = vqa_samples(train, VQA_TRAIN_SAMPLES, 0, camera=v["camera"])
    vqa_held = vqa_samples(held, VQA_HELDOUT_SAMPLES, 1, camera=v["camera"]) if len(held) else []
    sc = {"upstream": {"tasks": v["tasks"]}, "instructions": {}}
    corpus = tokenizer_corpus(sc, [train, held], vqa_train + vqa_held)
    tiny = {
        "image_size": 64,
        "patch_size": v["patch_size"],
        "vision_hidden": v["vision_hidden"],
        "vision_layers": v["vision_layers"],
        "vision_heads": 4,
        "hidden": v["hidden"],
        "layers": v["layers"],
        "heads": 4,
        "intermediate": 3 * v["hidden"],
        "vocab_words": 600,
    }
    b = build_tiny_backend(
        tiny, corpus, action_dim=4, seed=int(v["seed"]), stats=train.statistics, device=device
    )
    t0 = time.time()
    hist = pretrain(b, train, vqa_train, PretrainSettings.of_keys(v))  # the variant's model.pretrain keys
    t_train = time.time() - t0
    met = heldout_metrics(b, held, vqa_held)
    fac = MetaWorldFactory(v["camera"], 64, int(v["eval_max_steps"]), float(v["randomization"]))
    instr = {t: canonical_instruction(t, {}) for t in v["tasks"]}
    eps = make_episodes(v["tasks"], instr, int(v["eval_episodes"]), lambda t, i: 500000 + i)
    torch.set_num_threads(4)
    res = run_episodes(fac, BackendPolicy(b), eps, num_envs=workers, desc="eval")
    return {
        "variant": v,
        "train_seconds": t_train,
        "final_bc_acc": hist["bc_acc"][-1],
        "heldout": {k: x for k, x in met.items() if not isinstance(x, dict)},
        "success": res["success_rate"],
        "per_task": {t: d["success_rate"] for t, d in res["per_task"].items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--root", default="/tmp/teacher_sweep")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--variants", required=True, help="JSON list of overrides of DEFAULT")
    p.add_argument("--prepare-only", action="store_true", help="only generate the demo caches")
    a = p.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    for over in json.loads(a.variants):
        v = dict(DEFAULT, **over)
        cache = make_cache(v, root, a.workers)
        if a.prepare_only:
            continue
        r = run_variant(v, cache, a.device, a.workers)
        print(
            json.dumps({k: r[k] for k in ("success", "per_task", "final_bc_acc", "train_seconds")}),
            over,
            flush=True,
        )
        with open(a.out, "a") as f:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
