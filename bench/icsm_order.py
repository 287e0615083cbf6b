"""How far the ICSM sensitivity order follows the variance order, per injection (issue 26.3).

On a tiny teacher with config/demo.yaml's model sizes (8 decoder layers, hidden 128, 16 image tokens),
random-init and then pretrained for --pretrain-steps on a synthetic toy cache (tests/train_fixtures.py's
Meta-World-shaped episodes; the demo's real teacher needs the Meta-World demonstrations), this runs the
ICSM's SVD + sensitivity (methods/icsm.compute_layer) for each representative layer under
  unit  -- the default, the user's offline_icms.py: epsilon * u_k (epsilon = 1e-3), and
  std   -- the project's earlier injection alpha * std_k * u_k (alpha = 1),
and reports Spearman(KL, variance rank) (stages/icsm.spearman, scipy), the resolved count, the
fragile / plastic columns and their overlap with the variance-order split (the no_sensitivity
ablation), and the unit order at epsilon vs 2 epsilon. Writes JSON (default
docs/bench-results/icsm_order_tiny.json).

    .venv/bin/python bench/icsm_order.py [--pretrain-steps 300] [--out docs/bench-results/icsm_order_tiny.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--n-probe", type=int, default=128)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--sens", type=int, default=32, help="sensitivity samples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--dtype",
        choices=["fp32", "fp64"],
        default="fp32",
        help="the teacher's dtype for the probe and the sensitivity (after pretraining in fp32)",
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-results" / "icsm_order_tiny.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from train_fixtures import INSTR, make_cache

    from vlaforget.data.cache import CachedDataset
    from vlaforget.methods.icsm import compute_layer, layer_groups, representative_layers, split_directions
    from vlaforget.models.features import pooled_states
    from vlaforget.models.tiny import random_tiny_backend
    from vlaforget.stages.icsm import spearman
    from vlaforget.train.pretrain import heldout_metrics, pretrain

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="icsm-order-") as tmp:
        cache = make_cache(Path(tmp), n_per_task=24, T=20, size=64, train_split=0.75)
        train, held = CachedDataset(cache, "train"), CachedDataset(cache, "heldout")
        corpus = sorted(set(INSTR.values()))
        be = random_tiny_backend(DEMO_TINY, seed=0, corpus=corpus, stats=train.statistics)
        hist = {}
        if args.pretrain_steps:
            hist = pretrain(
                be,
                train,
                [],
                {
                    "steps": args.pretrain_steps,
                    "batch_size": 24,
                    "lr": 1e-3,
                    "bin_sigma": 2.0,
                    "image_aug": False,
                    "seed": 0,
                },
            )
        be.model.eval()
        if args.dtype == "fp64":
            be.model.to(torch.float64)
        for p in be.model.parameters():
            p.requires_grad_(False)
        acc = heldout_metrics(be, held, [], 64) if args.pretrain_steps else {}
        idx = torch.linspace(0, len(held) - 1, min(args.n_probe, len(held))).round().long().unique()
        samples = [held[int(i)] for i in idx]
        reps = representative_layers(layer_groups(be.num_layers))
        pooled, empty = pooled_states(be, samples, 32, layers=reps)
        keep = ~empty
        sens_pos = torch.linspace(0, int(keep.sum()) - 1, min(args.sens, int(keep.sum()))).round().long()
        sens_samples = [s for s, k in zip(samples, keep.tolist()) if k]
        sens_samples = [sens_samples[int(i)] for i in sens_pos]
        out = {
            "model": "tiny (config/demo.yaml sizes)",
            "pretrain_steps": args.pretrain_steps,
            "dtype": args.dtype,
            "heldout_metrics": {k: v for k, v in acc.items() if isinstance(v, (int, float))} or None,
            "pretrain_final_bc_loss_ema": hist["bc_loss"][-1] if hist.get("bc_loss") else None,
            "pretrain_seconds": round(hist.get("train_seconds", 0.0), 1),
            "n_probe": int(keep.sum()),
            "r": args.r,
            "sensitivity_samples": len(sens_samples),
            "torch": torch.__version__,
            "layers": {},
        }
        for rep in reps:
            X = pooled[rep][keep]
            row = {}
            base = {"r": args.r, "sensitivity_samples": len(sens_samples), "direction_batch": args.r + 1}
            runs = {
                "unit": dict(base),
                "unit_2eps": dict(base, epsilon=2e-3),
                "std": dict(base, injection="std", alpha=1.0),
            }
            var_split = None
            res_by = {}
            for name, icfg in runs.items():
                t1 = time.perf_counter()
                res = compute_layer(be, X, sens_samples, rep, icfg)
                res_by[name] = res
                sp = res["split"]
                if var_split is None:
                    var_split = split_directions(res["U"], None, sp["n_f"], sp["n_p"])
                r_ = res["U"].shape[1]
                var_f = set(range(sp["n_f"]))
                var_p = set(range(r_ - sp["n_p"], r_))
                f, p_ = sp["order"][: sp["n_f"]].tolist(), sp["order"][r_ - sp["n_p"] :].tolist()
                row[name] = {
                    "spearman_kl_vs_variance_rank": spearman(res["scores"], -torch.arange(r_).double()),
                    "kl_max": float(res["scores"].max()),
                    "kl_median": float(res["scores"].median()),
                    "kl_min": float(res["scores"].min()),
                    "kl_noise_floor": res["kl_noise_floor"],
                    "n_resolved": int((res["scores"] > 10 * res["kl_noise_floor"]).sum()),
                    "n_f": sp["n_f"],
                    "n_p": sp["n_p"],
                    "fragile_variance_ranks": f,
                    "plastic_variance_ranks": p_,
                    "fragile_overlap_with_variance_split": len(var_f & set(f)) / max(1, sp["n_f"]),
                    "plastic_overlap_with_variance_split": len(var_p & set(p_)) / max(1, sp["n_p"]),
                    "seconds": round(time.perf_counter() - t1, 1),
                }
            s1, s2 = res_by["unit"]["scores"], res_by["unit_2eps"]["scores"]
            row["unit_eps_vs_2eps"] = {
                "spearman": spearman(s1, s2),
                "kl_ratio_min": float((s2 / s1).min()),
                "kl_ratio_max": float((s2 / s1).max()),
                "same_order": bool(
                    torch.equal(res_by["unit"]["split"]["order"], res_by["unit_2eps"]["split"]["order"])
                ),
            }
            row["unit_vs_std_spearman"] = spearman(s1, res_by["std"]["scores"])
            out["layers"][str(rep)] = row
        out["total_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for rep, row in out["layers"].items():
        print(
            f"L{rep}: spearman(KL, variance rank) unit {row['unit']['spearman_kl_vs_variance_rank']:.3f} "
            f"std {row['std']['spearman_kl_vs_variance_rank']:.3f}; unit eps vs 2eps "
            f"{row['unit_eps_vs_2eps']['spearman']:.4f} (KL ratio {row['unit_eps_vs_2eps']['kl_ratio_min']:.3f}"
            f"-{row['unit_eps_vs_2eps']['kl_ratio_max']:.3f}); fragile overlap with variance split: unit "
            f"{row['unit']['fragile_overlap_with_variance_split']:.2f} std "
            f"{row['std']['fragile_overlap_with_variance_split']:.2f}"
        )
    print(f"wrote {args.out} ({out['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
