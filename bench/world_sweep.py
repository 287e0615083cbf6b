"""Sweep of the embedded world's design (issue 19): task split x fine-tuning budget -> partial forgetting?

For each split (upstream tasks the teacher is pretrained on, downstream tasks it is fine-tuned on):
demos -> caches -> the model stage's own `build_tiny` (config/demo.yaml's teacher recipe) -> the
teacher's closed-loop success on both suites (its success on the shared-scene upstream tasks is its
instruction-following) -> for each seed, plain LoRA fine-tuning (the train stage's `run_training`,
baseline = every plug-in off) for each budget, then the eval stage's protocol (`load_backend` with the
run's adapter and the suite's statistics, `evaluate_model`) on both suites. Retention = fine-tuned
upstream success / teacher upstream success. The split and budget are chosen by that number alone
(docs/benchmarks.md "Issue 19"), never by which method wins.

    python bench/world_sweep.py all --root /tmp/ws --out OUT_DIR --device cuda --workers 14 \\
        --splits '{"A": {"up": [...], "down": [...]}}' --seeds 42 123 456 --budgets 150 400 --episodes 10
    python bench/world_sweep.py summarize OUT_DIR/*.jsonl

`all` generates every task's demonstrations once, then runs one process per split (teacher) and one
per (split, seed) (fine-tuning), side by side; each writes JSON lines to OUT_DIR as it goes. With
`--per-budget` it builds the teachers first, then runs their evaluation and one fine-tuning process per
(split, seed, budget) side by side, the `--low-priority` budgets at CPU niceness 10 (a cut run loses
those first).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np

TINY = {
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
PRETRAIN = {
    "steps": 2500,
    "batch_size": 24,
    "lr": 1.0e-3,
    "vqa_fraction": 0.3,
    "bin_sigma": 2.0,
    "image_aug": False,
    "seed": 0,
    "threads": 2,
}
TRAIN = {
    "batch_size": 16,
    "early_stopping_min_delta": 0.01,
    "early_stopping_patience": 0,
    "eval_episodes_per_task": 1,
    "eval_every": 0,
    "grad_accum": 1,
    "gradient_checkpointing": False,
    "image_aug": False,
    "log_every": 10,
    "lora": {"alpha": 16, "dropout": 0.0, "layers": "all", "r": 8, "targets": ["attn", "mlp"]},
    "loss_scale_init": 65536.0,
    "loss_scaling": None,
    "lr": 1.0e-3,
    "lr_schedule": "constant",
    "max_grad_norm": None,
    "max_steps": 300,
    "nproc": 1,
    "num_workers": 0,
    "precision": "fp32",
    "save_steps": 100000,
    "use_wandb": False,
    "wandb_mode": "offline",
    "wandb_project": "vlaforget",
    "warmup_steps": 0,
    "weight_decay": 0.0,
}
EVAL_SEED = 500000  # held-out seeds (demos use 1000+)


def _write(out: Path, rec: dict) -> None:
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def prepare(a) -> None:
    """Every task's demonstrations once (pickled, images decoded), then one cache per split and role."""
    import io

    from PIL import Image

    from vlaforget.data.cache import write_cache
    from vlaforget.data.metaworld_demos import generate, interleave

    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    splits = json.loads(a.splits)
    tasks = sorted({t for s in splits.values() for t in s["up"] + s["down"]})
    pk = root / "episodes.pkl"
    if not pk.exists():
        t0 = time.time()
        kept, counts = generate(
            tasks,
            a.episodes_per_task,
            1000,
            camera="corner3",
            render_size=64,
            max_steps=150,
            workers=a.workers,
        )
        for eps in kept.values():
            for ep in eps:
                ep["images"] = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in ep["images"]]
        with open(pk, "wb") as f:
            pickle.dump(kept, f)
        caps = {t: int(np.ceil(1.3 * counts[t]["max_steps_used"])) for t in tasks}
        (root / "demos.json").write_text(
            json.dumps(
                {
                    "seconds": time.time() - t0,
                    "caps": caps,
                    "counts": {t: {k: v for k, v in c.items() if k != "seeds"} for t, c in counts.items()},
                },
                indent=1,
            )
        )
    with open(pk, "rb") as f:
        kept = pickle.load(f)
    for name, s in splits.items():
        for role in ("up", "down"):
            out = root / name / f"cache_{role}"
            if not (out / "manifest.json").exists():
                write_cache(
                    interleave({t: kept[t] for t in s[role]}),
                    out,
                    f"{name}_{role}",
                    image_size=64,
                    extra={"camera": "corner3"},
                    transform="metaworld",
                )


def _ecfg(root: Path, name: str, role: str, tasks: list[str], a) -> dict:
    caps = json.loads((root / "demos.json").read_text())["caps"]
    return {
        "suite": f"{name}_{role}",
        "tasks": tasks,
        "camera": "corner3",
        "render_size": 64,
        "image_size": 64,
        "center_crop": False,
        "max_steps": {t: caps[t] for t in tasks},
        "seed": EVAL_SEED,
        "num_envs": a.num_envs,
        "pipeline_groups": 1,
        "world": "metaworld",
        "instructions": {},
        "videos_per_task": 0,
    }


def _evaluate(mblock: dict, adapter, root: Path, name: str, s: dict, a) -> dict:
    from vlaforget.eval.closed_loop import evaluate_model
    from vlaforget.models import load_backend

    out = {}
    for role in ("up", "down"):
        stats = root / name / f"cache_{role}" / "dataset_statistics.json"
        b = load_backend(mblock, device=a.device, adapter_dir=adapter, stats=str(stats))
        r = evaluate_model(b, _ecfg(root, name, role, s[role], a), episodes_per_task=a.episodes)
        out[role] = {
            "success": r["success_rate"],
            "per_task": {t: d["success_rate"] for t, d in r["per_task"].items()},
            "n": len(r["episodes"]) if "episodes" in r else None,
        }
        del b
    return out


def teacher(a) -> None:
    from vlaforget.stages.model import build_tiny

    root, name = Path(a.root), a.split
    s = json.loads(a.splits)[name]
    mdir = root / name / "teacher"
    mblock = {"backend": "tiny", "path": str(mdir), "dtype": "fp32"}
    if not (mdir / "teacher.json").exists():
        sc = {
            "upstream": {"name": f"{name}_up", "cache_dir": str(root / name / "cache_up"), "tasks": s["up"]},
            "corpus_datasets": [
                {"name": f"{name}_down", "cache_dir": str(root / name / "cache_down"), "tasks": s["down"]}
            ],
            "instructions": {},
            "tiny": TINY,
            "pretrain": dict(PRETRAIN, **json.loads(a.pretrain)),
            "out_dir": str(mdir),
        }
        t0 = time.time()
        info = build_tiny(sc, device=a.device)
        info["build_seconds"] = time.time() - t0
        (mdir / "teacher.json").write_text(json.dumps(info, default=str))
    info = json.loads((mdir / "teacher.json").read_text())
    if a.build_only:
        return
    t0 = time.time()
    ev = _evaluate(mblock, None, root, name, s, a)
    _write(
        Path(a.out) / f"{name}_teacher.jsonl",
        {
            "split": name,
            "kind": "teacher",
            "up_tasks": s["up"],
            "down_tasks": s["down"],
            "eval": ev,
            "eval_seconds": time.time() - t0,
            "build_seconds": info.get("build_seconds"),
            "heldout": {k: v for k, v in info["metrics"].items() if not isinstance(v, dict)},
            "vqa_mc": (info["metrics"].get("vqa_mc") or {}).get("accuracy"),
        },
    )


def finetune(a) -> None:
    from vlaforget.data.cache import CachedDataset
    from vlaforget.train.loop import run_training

    root, name, seed = Path(a.root), a.split, int(a.seed)
    s = json.loads(a.splits)[name]
    mdir = root / name / "teacher"
    mblock = {"backend": "tiny", "path": str(mdir), "dtype": "fp32"}
    if a.nice:
        os.nice(10)
    for steps in a.budgets:
        run = f"{name}__baseline__{steps}__s{seed}"
        out_dir = root / name / "runs" / run
        sc = {
            "root": str(root),
            "allowed_root": str(root),
            "stage": "train",
            "world": "metaworld",
            "seed": seed,
            "shots": None,
            "suite": f"{name}_down",
            "method_name": "baseline",
            "method": {
                "craft": {"enabled": False},
                "hsw": {"enabled": False},
                "thermostat": {"enabled": False},
            },
            "dataset": {
                "name": f"{name}_down",
                "cache_dir": str(root / name / "cache_down"),
                "tasks": s["down"],
            },
            "model": dict(mblock, base="tiny-vla", attn_implementation=None, cache_dir=str(root / "hf")),
            "icsm_dir": None,
            "probe_dir": None,
            "craft_dir": None,
            "out_dir": str(out_dir),
            "run_id": run,
            "run_name": run,
            "train": dict(copy.deepcopy(TRAIN), max_steps=int(steps), **json.loads(a.train)),
        }
        t0 = time.time()
        if not (out_dir / "final" / "adapter_config.json").exists():
            run_training(sc, dataset=CachedDataset(sc["dataset"]["cache_dir"], split="train"))
        t_train = time.time() - t0
        hist = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        t0 = time.time()
        ev = _evaluate(mblock, out_dir / "final", root, name, s, a)
        _write(
            Path(a.out) / f"{name}_s{seed}.jsonl",
            {
                "split": name,
                "kind": "baseline",
                "seed": seed,
                "steps": int(steps),
                "eval": ev,
                "train_seconds": t_train,
                "eval_seconds": time.time() - t0,
                "final_train_acc": hist[-1].get("action_accuracy") if hist else None,
                "train": sc["train"],
            },
        )


def run_all(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prepare(a)
    print(f"prepare: {time.time() - t0:.0f} s", flush=True)
    base = [
        sys.executable,
        __file__,
        "{cmd}",
        "--root",
        a.root,
        "--out",
        a.out,
        "--device",
        a.device,
        "--splits",
        a.splits,
        "--episodes",
        str(a.episodes),
        "--num-envs",
        str(a.num_envs),
        "--pretrain",
        a.pretrain,
        "--train",
        a.train,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2", VLAFORGET_THREADS="2")
    names = list(json.loads(a.splits))

    def cmd(c: str) -> list[str]:
        return [x.replace("{cmd}", c) for x in base]

    def start(args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as f:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT)

    if not a.per_budget:
        procs = [start(cmd("teacher") + ["--split", n], out / f"{n}_teacher.log") for n in names]
        rcs = [p.wait() for p in procs]
        print(f"teachers: {time.time() - t0:.0f} s, exit {rcs}", flush=True)
        procs = [
            start(
                cmd("finetune") + ["--split", n, "--seed", str(sd), "--budgets", *map(str, a.budgets)],
                out / f"{n}_s{sd}.log",
            )
            for n in names
            if rcs[names.index(n)] == 0
            for sd in a.seeds
        ]
    else:  # teachers built first; then their evaluation and one process per (split, seed, budget), side by side
        procs = [
            start(cmd("teacher") + ["--split", n, "--build-only"], out / f"{n}_teacher_build.log")
            for n in names
        ]
        rcs = [p.wait() for p in procs]
        print(f"teachers built: {time.time() - t0:.0f} s, exit {rcs}", flush=True)
        ok = [n for n in names if rcs[names.index(n)] == 0]
        procs = [start(cmd("teacher") + ["--split", n], out / f"{n}_teacher.log") for n in ok]
        procs += [
            start(
                cmd("finetune")
                + ["--split", n, "--seed", str(sd), "--budgets", str(b)]
                + (["--nice"] if b in a.low_priority else []),
                out / f"{n}_s{sd}_{b}.log",
            )
            for b in a.budgets
            for n in ok
            for sd in a.seeds
        ]
    rcs2 = [p.wait() for p in procs]
    print(f"fine-tuning: {time.time() - t0:.0f} s, exit {rcs2}", flush=True)
    return 0 if not any(rcs + rcs2) else 1


def _ci(xs: list[float]) -> tuple[float, float]:
    from scipy import stats

    m = float(np.mean(xs))
    if len(xs) < 2:
        return m, float("nan")
    return m, float(stats.t.ppf(0.975, len(xs) - 1) * np.std(xs, ddof=1) / np.sqrt(len(xs)))


def summarize(a) -> int:
    # A split's teacher is rebuilt in each sweep: a run is compared with the teacher of its own file
    # (a concatenated sweep), else of its own directory (`all`'s per-process files).
    recs = [
        dict(json.loads(x), file=str(f), dir=str(Path(f).resolve().parent))
        for f in a.files
        for x in Path(f).read_text().splitlines()
        if x.strip()
    ]
    teach = {(r[k], r["split"]): r for r in recs if r["kind"] == "teacher" for k in ("dir", "file")}
    print(
        "| split (upstream → downstream) | budget (steps) | teacher upstream (instruction-following) | "
        "teacher downstream | baseline downstream | baseline upstream | upstream retention (mean ± 95 % CI, "
        "per seed) | seeds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    groups: dict = {}
    for r in recs:
        if r["kind"] == "baseline":
            groups.setdefault(
                (
                    r["file"] if (r["file"], r["split"]) in teach else r["dir"],
                    r["split"],
                    f"{r['steps']} @ lr {r['train']['lr']:g}",
                ),
                [],
            ).append(r)
    for (fi, name, steps), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[1][0]["steps"])
    ):
        t = teach[(fi, name)]
        tu = t["eval"]["up"]["success"]
        per_task = ", ".join(
            f"{k.removesuffix('-v3')} {v:.1f}" for k, v in t["eval"]["up"]["per_task"].items()
        )
        ret = [r["eval"]["up"]["success"] / tu if tu else float("nan") for r in rs]
        m, h = _ci(ret)
        dm, dh = _ci([r["eval"]["down"]["success"] for r in rs])
        um, uh = _ci([r["eval"]["up"]["success"] for r in rs])
        print(
            f"| {name}: {', '.join(x.removesuffix('-v3') for x in t['up_tasks'])} → "
            f"{', '.join(x.removesuffix('-v3') for x in t['down_tasks'])} | {steps} | {tu:.2f} "
            f"({per_task}) | "
            f"{t['eval']['down']['success']:.2f} | {dm:.2f} ± {dh:.2f} | {um:.2f} ± {uh:.2f} | "
            f"**{m:.2f} ± {h:.2f}** ({', '.join(f'{x:.2f}' for x in ret)}) | {len(rs)} |"
        )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/world_sweep")
    p.add_argument("--out", default="/tmp/world_sweep/out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2, help="demo-generation processes")
    p.add_argument("--splits", default="{}", help='JSON {name: {"up": [tasks], "down": [tasks]}}')
    p.add_argument("--split")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--budgets", type=int, nargs="+", default=[300])
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per task")
    p.add_argument("--episodes-per-task", type=int, default=24, help="demonstrations per task")
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--pretrain", default="{}", help="JSON overrides of the teacher recipe (e.g. steps)")
    p.add_argument("--train", default="{}", help="JSON overrides of the train block (e.g. lr)")
    p.add_argument(
        "--per-budget",
        action="store_true",
        help="all: one fine-tuning process per (split, seed, budget), beside the teachers' evaluation",
    )
    p.add_argument(
        "--low-priority",
        type=int,
        nargs="*",
        default=[],
        help="all --per-budget: budgets whose processes run at CPU niceness 10 (cut first)",
    )
    p.add_argument("--build-only", action="store_true", help="teacher: build it, do not evaluate")
    p.add_argument("--nice", action="store_true", help="finetune: run at CPU niceness 10")
    p.add_argument("cmd", choices=["all", "prepare", "teacher", "finetune", "summarize"])
    p.add_argument("files", nargs="*")
    a = p.parse_args()
    if a.cmd == "summarize":
        return summarize(a)
    return {
        "all": run_all,
        "prepare": lambda a: prepare(a) or 0,
        "teacher": lambda a: teacher(a) or 0,
        "finetune": lambda a: finetune(a) or 0,
    }[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
