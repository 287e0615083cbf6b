"""Sweep fine-tuning recipes of the embedded study: train → closed-loop eval (downstream + upstream).

    python bench/finetune_sweep.py --root /opt/data/private/vlaforget --episodes 10 --parallel 6 \\
        --variant '{"name": "b_lr1e-3_300", "method": "baseline", "lr": 1e-3, "steps": 300}' ... \\
        --out sweep.jsonl

Needs a data root where the embedded study's stage configs exist and the teacher, the downstream
cache and the ICSM / probe / CRaFT artifacts are built (`make demo`, or copy those parts). Each
variant copies the stage configs of run `{suite}__{method}__full__s{seed}` and changes only the
train keys it names (lr, steps → max_steps, batch → batch_size, lora_r, and any `train` dict),
then runs the real stages by their CLI: `vlaforget train --config ...` and `vlaforget eval --config
...` for both suites, with `--episodes` episodes per task on the held-out seeds. Outputs go to
`{root}/sweep/{name}/`; one JSON line per variant (success per suite and task, wall times).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

TRAIN_KEYS = {"lr": "lr", "steps": "max_steps", "batch": "batch_size"}


def run_variant(a, v: dict) -> dict:
    root = Path(a.root)
    base = f"{a.suite}__{v.get('method', 'baseline')}__full__s{a.seed}"
    out = root / "sweep" / v["name"]
    (out / "configs").mkdir(parents=True, exist_ok=True)
    tc = yaml.safe_load((root / "configs" / "train" / f"{base}.yaml").read_text())
    for k, key in TRAIN_KEYS.items():
        if k in v:
            tc["train"][key] = v[k]
    if "lora_r" in v:
        tc["train"]["lora"]["r"] = v["lora_r"]
    tc["train"].update(v.get("train", {}))
    tc["out_dir"] = str(out / "run")
    tc["run_name"] = tc["run_id"] = f"sweep_{v['name']}"
    tc["train"]["use_wandb"] = False
    (out / "configs" / "train.yaml").write_text(yaml.safe_dump(tc))
    rec = {"name": v["name"], "variant": v, "base_run": base}
    with open(out / "log.txt", "w") as log:
        t = time.time()
        cmd = [
            sys.executable,
            "-m",
            "vlaforget.cli",
            "train",
            "--config",
            str(out / "configs" / "train.yaml"),
        ]
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        rec["train_s"] = round(time.time() - t, 1)
        if rc:
            rec["error"] = f"train exit {rc} (see {out / 'log.txt'})"
            return rec
        for suite in a.eval_suites:
            ec = yaml.safe_load((root / "configs" / "eval" / f"{base}@{suite}.yaml").read_text())
            ec["adapter_dir"] = str(out / "run" / "final")
            ec["eval"]["episodes_per_task"] = a.episodes
            ec["eval"]["num_envs"] = a.num_envs
            ec["eval"]["videos_per_task"] = 0
            ec["out_file"] = str(out / f"eval_{suite}.json")
            ec["run_name"] = f"sweep_{v['name']}"
            p = out / "configs" / f"eval_{suite}.yaml"
            p.write_text(yaml.safe_dump(ec))
            t = time.time()
            rc = subprocess.call(
                [sys.executable, "-m", "vlaforget.cli", "eval", "--config", str(p)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            rec[f"eval_{suite}_s"] = round(time.time() - t, 1)
            if rc:
                rec["error"] = f"eval {suite} exit {rc}"
                return rec
            res = json.loads((out / f"eval_{suite}.json").read_text())
            rec[suite] = res["success_rate"]
            rec[f"{suite}_per_task"] = {k: x["success_rate"] for k, x in res["per_task"].items()}
    hist = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if hist:
        rec["final_train_acc"] = hist[-1].get("action_accuracy")
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--suite", default="mw_downstream")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-suites", nargs="+", default=["mw_downstream", "mw_upstream"])
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--num-envs", type=int, default=3)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument(
        "--variant", action="append", required=True, help="JSON object (name, method, lr, steps, ...)"
    )
    p.add_argument("--out", required=True)
    a = p.parse_args()
    variants = [json.loads(v) for v in a.variant]
    with cf.ThreadPoolExecutor(a.parallel) as ex, open(a.out, "a") as f:
        for rec in ex.map(lambda v: run_variant(a, v), variants):
            print(json.dumps(rec), flush=True)
            f.write(json.dumps(rec) + "\n")
            f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
