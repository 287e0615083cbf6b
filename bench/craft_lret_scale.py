"""CRaFT's retention loss L_ret on its own scale, and what the dual variable does with it (issue 26.7).

Runs the real train stage (train/loop.py + the CRaFT plug-in) for --steps optimizer steps and reads its
train_metrics.jsonl: L_ret per step, the dual lambda, ||g_act|| and ||g_ret|| (so lambda* =
||g_act|| / ||g_ret||, the lambda at which the retention gradient weighs as much as the action
gradient), and the anchors' mean square E[f^2] (L_ret / E[f^2] = the drift relative to the feature
scale). It then replays the measured L_ret series through the dual update
lambda <- max(0, lambda + eta (L_ret - epsilon)) for several eta and epsilon (the guides' and the
project's values) and, for --extrapolate-steps, the lambda a run of that length reaches if L_ret held
its last measured value.

Default: a tiny teacher (tests/train_fixtures.py: random-init tiny VLA, optionally pretrained for
--pretrain-steps on the synthetic toy cache), anchors from the real craft_anchors stage. On a GPU with
the real model: --stage-config a CRaFT train stage config (`vlaforget stage-config ...` of a craft
run; its craft_dir must hold the anchors) -- the script overrides max_steps, out_dir and log_every only.
Also summarises the committed GPU study's CRaFT logs (results/embedded_gpu/raw/*craft*/).

    .venv/bin/python bench/craft_lret_scale.py [--steps 30] [--out docs/bench-results/craft_lret_scale_tiny.json]
    .venv/bin/python bench/craft_lret_scale.py --stage-config train_craft.yaml --steps 200 \\
        --out docs/bench-results/craft_lret_scale_7b.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

ETAS = [1e-4, 1e-3, 1e-2]  # OpenVLA CRaFT guide 1e-4; training/eval guide 0.01; between
EPSILONS = [0.05, 0.1]  # OpenVLA CRaFT guide 0.05; training/eval guide 0.1
DEMO_TINY = {
    "image_size": 64,
    "patch_size": 16,
    "vision_hidden": 128,
    "vision_layers": 3,
    "vision_heads": 4,
    "hidden": 128,
    "layers": 8,
    "heads": 4,
    "intermediate": 384,
    "vocab_words": 600,
}


def replay(l_ret: list[float], eta: float, eps: float, lam0: float = 0.0) -> float:
    from vlaforget.methods.craft import dual_update

    lam = lam0
    for x in l_ret:
        lam = dual_update(lam, x, eps, eta)
    return lam


def tiny_stage_config(tmp: Path, pretrain_steps: int, lambda_lr: float, epsilon: float, lr: float) -> dict:
    from train_fixtures import INSTR, base_stage, make_cache, run_stage

    from vlaforget.data.cache import CachedDataset
    from vlaforget.models.tiny import random_tiny_backend
    from vlaforget.stages import craft_anchors
    from vlaforget.train.pretrain import pretrain

    cache = make_cache(tmp, n_per_task=24, T=20, size=64, train_split=0.75)
    train = CachedDataset(cache, "train")
    be = random_tiny_backend(DEMO_TINY, seed=0, corpus=sorted(set(INSTR.values())), stats=train.statistics)
    if pretrain_steps:
        pretrain(
            be,
            train,
            [],
            {
                "steps": pretrain_steps,
                "batch_size": 24,
                "lr": 1e-3,
                "bin_sigma": 2.0,
                "image_aug": False,
                "seed": 0,
            },
        )
    model = tmp / "models" / "tiny"
    be.save(model)
    mb = {
        "backend": "tiny",
        "base": "tiny",
        "path": str(model),
        "dtype": "fp32",
        "cache_dir": str(tmp / "hf"),
    }
    ds = {"name": "toy", "cache_dir": str(cache), "tasks": sorted(INSTR)}
    common = {"root": str(tmp), "allowed_root": str(tmp.parent), "world": "metaworld", "code": "x"}
    run_stage(
        craft_anchors,
        {
            **common,
            "stage": "craft_anchors",
            "model": mb,
            "dataset": ds,
            "seed": 0,
            "craft": {"layer": -2, "pooling": "mean_image_tokens", "n_anchors": 64, "batch_size": 32},
            "out_dir": str(tmp / "artifacts" / "craft"),
        },
        tmp / "craft.yaml",
    )
    craft = {
        "enabled": True,
        "epsilon": epsilon,
        "lambda_init": 0.0,
        "lambda_lr": lambda_lr,
        "dual": True,
        "fixed_lambda": 0.1,
        "projection": True,
        "anchor_batch_size": 8,
    }
    sc = base_stage(
        tmp,
        cache,
        model,
        method_name="craft",
        method={"craft": craft},
        lr=lr,
        batch_size=16,
        lora={
            "r": 8,
            "alpha": 8,
            "dropout": 0.0,
            "targets": ["attn", "mlp", "vision", "projector"],
            "layers": "all",
        },
    )
    sc["model"] = mb
    return sc


def committed_study() -> dict:
    out = {}
    for f in sorted((ROOT / "results" / "embedded_gpu" / "raw").glob("*craft*/train_metrics.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        lam = [r["lambda"] for r in rows if r.get("lambda") is not None]
        ret = [r["L_ret"] for r in rows if r.get("L_ret") is not None]
        out[f.parent.name] = {
            "steps_logged": [rows[0]["step"], rows[-1]["step"]] if rows else None,
            "lambda_max": max(lam) if lam else None,
            "L_ret_max": max(ret) if ret else None,
            "L_ret_last": ret[-1] if ret else None,
            "epsilon": rows[-1].get("epsilon") if rows else None,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--stage-config", help="a CRaFT train stage config (default: the tiny teacher built here)"
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pretrain-steps", type=int, default=0, help="tiny teacher only")
    ap.add_argument(
        "--lambda-lr",
        type=float,
        default=0.0,
        help="tiny teacher only: the run's eta (0 = lambda stays 0: L_ret unconstrained, replayed below)",
    )
    ap.add_argument("--epsilon", type=float, default=0.05, help="tiny teacher only")
    ap.add_argument("--lr", type=float, default=5e-4, help="tiny teacher only: the study's lr")
    ap.add_argument("--extrapolate-steps", type=int, nargs="*", default=[10000, 20000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-results" / "craft_lret_scale_tiny.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from train_fixtures import run_stage

    from vlaforget.stages import train as train_stage

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="craft-lret-") as tmp:
        tmp = Path(tmp)
        if args.stage_config:
            sc = copy.deepcopy(yaml.safe_load(Path(args.stage_config).read_text()))
            source = args.stage_config
        else:
            sc = tiny_stage_config(tmp, args.pretrain_steps, args.lambda_lr, args.epsilon, args.lr)
            source = (
                f"tiny teacher (config/demo.yaml sizes), {args.pretrain_steps} pretraining steps, toy cache"
            )
        sc["train"] = {
            **sc["train"],
            "max_steps": args.steps,
            "log_every": 1,
            "save_steps": args.steps + 1,
            "eval_every": 0,
            "loss_check_min_steps": args.steps + 1,
        }  # a measurement, not a run to keep
        sc["out_dir"] = str(tmp / "run")
        craft_dir = Path(sc["craft_dir"])
        anchors = torch.load(craft_dir / "anchors.pt", map_location="cpu", weights_only=False)
        f = anchors["features"].double()
        run_stage(train_stage, sc, tmp / "train.yaml")
        rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ccfg = sc["method"]["craft"]
    l_ret = [float(r["L_ret"]) for r in rows if r.get("L_ret") is not None]
    f2 = float((f**2).mean())
    ratio = [r["g_act_norm"] / r["g_ret_norm"] for r in rows if r.get("g_ret_norm")]
    out = {
        "source": source,
        "steps": args.steps,
        "craft": ccfg,
        "train_lr": sc["train"]["lr"],
        "anchor_feature_mean_square": f2,
        "anchor_feature_dim": int(f.shape[1]),
        "L_ret": l_ret,
        "L_ret_over_feature_mean_square": [x / f2 for x in l_ret],
        "lambda": [r.get("lambda") for r in rows],
        "g_act_norm": [r.get("g_act_norm") for r in rows],
        "g_ret_norm": [r.get("g_ret_norm") for r in rows],
        "lambda_star_median": float(torch.tensor(ratio).median()) if ratio else None,
        "replay": {f"eta={eta:g},eps={eps:g}": replay(l_ret, eta, eps) for eta in ETAS for eps in EPSILONS},
        "extrapolated_lambda_at_last_L_ret": {
            f"eta={eta:g},eps={eps:g},T={T}": max(0.0, eta * (l_ret[-1] - eps) * T) if l_ret else None
            for eta in ETAS
            for eps in EPSILONS
            for T in args.extrapolate_steps
        },
        "committed_gpu_study": committed_study(),
        "torch": torch.__version__,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"L_ret: first {l_ret[:3]} last {l_ret[-1]:.4g} (E[f^2] = {f2:.4g}: relative {l_ret[-1] / f2:.3g}); "
        f"lambda* median {out['lambda_star_median']}"
    )
    for k, v in out["replay"].items():
        print(f"  replay {k}: lambda after {len(l_ret)} steps = {v:.3g}")
    print(f"wrote {args.out} ({out['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
