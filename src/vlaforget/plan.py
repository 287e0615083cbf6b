"""`vlaforget plan`: what the configured study costs on a profile's GPUs, before it runs.

    vlaforget plan --profile profiles/4090                         # the real study on one RTX 4090
    vlaforget plan --profile profiles/v100x8 --configfiles config/profile_v100x8.yaml config/profile_v100x8_ddp.yaml
    vlaforget plan --profile profiles/4090 --configfiles config/profile_4090.yaml config/pilot.yaml
    vlaforget plan ... --runs-dir ROOT/runs                        # refine with your finished runs' step times

GPU-hours per rule = jobs x (work x time per unit + model load), from the figures measured at
OpenVLA-7B shape in docs/benchmarks.md (MEASURED below; H200/H100). Other GPUs are an ESTIMATE: the
compute-bound part is scaled by the ratio of published dense bf16/fp16 tensor TFLOP/s (GPU_TFLOPS),
i.e. it assumes the same fraction of peak as measured on the H200; an H200 is not a 4090 or a V100,
and their real speed differs from that ratio (memory bandwidth, clocks, host). `--runs-dir` replaces
the training step times with the medians of `step_time_s` in your own runs' metrics.jsonl. Wall-clock
is a lower bound: the teacher-only jobs one after another, then all other GPU-hours spread evenly
over the profile's GPUs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import UserError
from .settings import CraftAnchorSettings, ForgettingSettings, TrainSettings

# Published dense tensor-core TFLOP/s, bf16 (fp16 on the V100) with fp32 accumulation, vendor datasheets.
GPU_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0, "rtx4090": 165.2, "a6000": 154.8, "v100": 125.0}

# Measured at OpenVLA-7B shape (random init, bf16, gradient checkpointing, LoRA r 32 on
# attn+mlp+vision+projector); docs/benchmarks.md, raw JSON in docs/bench-results/.
MEASURED: dict[str, Any] = {
    "train": {  # seconds per micro-step by micro-batch, one GPU
        "gpu": "h100",
        # 16: OpenVLA-7B's real architecture, every tower checkpointed, baseline, H100 under a 23.5 GiB
        # cap (issue 28 run 1); 2: the host floor (2 x 8 took 5.24 s per optimizer step, issue 16, H200
        # stand-in; the real architecture's 8-row micro-steps, 0.81-0.99 s, sit near 16's too)
        "micro_s": {2: 0.655, 16: 0.794},
        # method: issue 28 run 4, the real architecture at 16 rows in fp16 under a V100's cap, the user's
        # Thermostat law in its warm-up (a measurement at every step: the upper bound; after the warm-up
        # it measures every 50 steps), 1.117 s against the baseline's 0.918 s in the same call;
        # CRaFT: issue 28 run 2, the fused task + anchor pass at 16 rows on the real architecture
        # (1.567 s; the separate pass 1.733 s) against the baseline's 0.794 s
        "method_factor": {"baseline": 1.0, "method": 1.117 / 0.918, "craft": 1.567 / 0.794},
    },
    "policy": {"gpu": "h100", "call_ms": 198.0, "ms_per_sample": 9.6},  # policy call = a + b x batch
    "libero_env_ms": 28.0,  # one LIBERO step in a worker (physics + 256 px render + JPEG), H100 host
    "eval_startup_s": 45.0,  # LIBERO workers' start (48 workers: 43-47 s)
    "probe_icsm_s": 77.0,  # probe (500) + ICSM (r 128, 128 sensitivity samples), H100
    "job_startup_s": 120.0,  # loading the 7B weights per GPU job: ASSUMED, not measured
}
FORWARD_PER_TRAIN_SAMPLE = (
    0.25  # a no-grad forward ~ 1/4 of a checkpointed training sample (fwd+recompute+bwd)
)
SUITE_TASKS_DEFAULT = 10


class PlanError(UserError, ValueError):
    """The study plan cannot be computed for this profile; the message names the key."""


# ----------------------------------------------------------------------------- profile


def read_profile(profile_dir: str | Path) -> dict:
    """{name, configfiles, gpus, gpu_model} from a Snakemake profile directory."""
    d = Path(profile_dir)
    files = sorted(d.glob("config*.yaml"))
    if not files:
        raise PlanError(
            f"{d}: no config.yaml / config.v8+.yaml: give a Snakemake profile directory (profiles/4090)"
        )
    prof = yaml.safe_load(files[-1].read_text()) or {}
    gpus = None
    for r in prof.get("resources") or []:
        m = re.fullmatch(r"\s*gpu\s*=\s*(\d+)\s*", str(r))
        if m:
            gpus = int(m.group(1))
    model = ((prof.get("set-resources") or {}).get("train") or {}).get("gpu_model")
    if not model:
        name = d.resolve().name.lower()
        model = next(
            (g for g in ("rtx4090", "4090", "v100", "h200", "h100", "a100", "a6000") if g in name), None
        )
    model = {"4090": "rtx4090"}.get(model, model)
    return {
        "name": d.name,
        "configfiles": list(prof.get("configfiles") or []),
        "gpus": gpus,
        "gpu_model": model,
    }


# ----------------------------------------------------------------------------- study grid


def study_runs(cfg: dict) -> list[str]:
    """Training runs of the study (study.all_runs: the workflow's train jobs, chains included)."""
    from .study import all_runs

    return all_runs(cfg)


def method_class(cfg: dict, method: str) -> str:
    """The cost class of a method's training steps (a key of MEASURED["train"]["method_factor"])."""
    from .study import method_config

    return method_class_of(method_config(cfg, method))


def method_class_of(mcfg: dict) -> str:
    """The cost class of a method block (study.method_config): the costliest of its enabled
    plug-ins' declared classes (settings.PluginSettings.COST), 'baseline' with none."""
    from .settings import method_blocks

    factors = MEASURED["train"]["method_factor"]
    classes = [blk.COST for name, blk in method_blocks().items() if (mcfg.get(name) or {}).get("enabled")]
    unknown = sorted(set(classes) - set(factors))
    if unknown:
        raise PlanError(
            f"method cost class {unknown} has no measured step-time factor: add it to "
            "plan.MEASURED['train']['method_factor'] (docs/benchmarks.md), or declare a measured one"
        )
    return max(classes, key=lambda c: factors[c], default="baseline")


# ----------------------------------------------------------------------------- times


def ratio(gpu: str, measured_on: str) -> float:
    """How much slower the compute-bound part is on `gpu` than on `measured_on` (TFLOP ratio)."""
    if gpu not in GPU_TFLOPS:
        raise PlanError(f"unknown GPU model '{gpu}': give --gpu one of {', '.join(GPU_TFLOPS)}")
    return GPU_TFLOPS[measured_on] / GPU_TFLOPS[gpu]


def micro_step_s(batch: int, gpu: str, table: dict = MEASURED) -> float:
    """Baseline seconds per micro-step of `batch` samples on `gpu`: max(host floor, GPU work).

    The smallest measured batch gives the floor (at micro-batch 2 the step is bound by kernel launches
    and Python, not by the GPU: 0.655 s for 2 samples against 0.764-0.794 s for 16); the GPU work is the
    largest measured batch's time, linear in the batch and scaled by the TFLOP ratio. The host floor
    is not scaled (it depends on the CPU, not the GPU)."""
    pts = sorted((int(b), float(t)) for b, t in table["train"]["micro_s"].items())
    floor = pts[0][1] if len(pts) > 1 else 0.0
    b_ref, t_ref = pts[-1]
    return max(floor, t_ref * batch / b_ref * ratio(gpu, table["train"]["gpu"]))


def train_hours(
    cfg: dict, run: str, gpu: str, table: dict = MEASURED, measured_step: dict | None = None
) -> float:
    """GPU-hours of one training run: steps x accum x micro-step x method factor x GPUs + load."""
    from .study import parse_run_name

    t = cfg["train"]
    cls = method_class(cfg, parse_run_name(run)["method"])
    nproc = int(t.get("nproc", TrainSettings.nproc))
    if measured_step and cls in measured_step:
        step = measured_step[cls]
    else:
        step = (
            int(t.get("grad_accum", TrainSettings.grad_accum))
            * micro_step_s(int(t["batch_size"]), gpu, table)
            * table["train"]["method_factor"][cls]
        )
    return (int(t["max_steps"]) * step + table["job_startup_s"]) * nproc / 3600.0


def suite_episode(cfg: dict, suite: str) -> tuple[int, int, int]:
    """(episodes, policy steps per episode cap, wait steps) of one closed-loop evaluation of a suite."""
    from .envs.libero import SUITE_TASKS, WAIT_STEPS, max_steps_for

    base = suite.removesuffix("_no_noops")
    tasks = SUITE_TASKS.get(base, SUITE_TASKS_DEFAULT)
    wait = int((cfg["eval"].get("libero") or {}).get("wait_steps", WAIT_STEPS))
    return tasks * int(cfg["eval"]["episodes_per_task"]), max_steps_for(suite), wait


def eval_hours(cfg: dict, suite: str, gpu: str, table: dict = MEASURED, step_fraction: float = 1.0) -> float:
    """GPU-hours of one closed-loop evaluation: waves of N envs, each control step one batched policy
    call (a + b N, b scaled by the TFLOP ratio) plus one env step; wait steps are env-only.
    step_fraction = share of the cap an episode runs (1.0 = every episode to its cap: an upper bound)."""
    n = max(1, int(cfg["eval"].get("num_envs", 1)))
    episodes, cap, wait = suite_episode(cfg, suite)
    pol = table["policy"]
    call_s = (pol["call_ms"] + pol["ms_per_sample"] * n * ratio(gpu, pol["gpu"])) / 1000.0
    env_s = table["libero_env_ms"] / 1000.0
    waves = math.ceil(episodes / n)
    seconds = waves * (cap * step_fraction * (call_s + env_s) + wait * env_s)
    return (seconds + table["eval_startup_s"] + table["job_startup_s"]) / 3600.0


def forward_s_per_sample(gpu: str, table: dict = MEASURED) -> float:
    return micro_step_s(16, gpu, table) / 16 * FORWARD_PER_TRAIN_SAMPLE


def forgetting_hours(cfg: dict, gpu: str, table: dict = MEASURED) -> float:
    n = int((cfg["eval"].get("forgetting") or {}).get("drift_samples", ForgettingSettings.drift_samples))
    return (2 * n * forward_s_per_sample(gpu, table) + table["job_startup_s"]) / 3600.0  # student + teacher


def craft_anchor_hours(cfg: dict, gpu: str, table: dict = MEASURED) -> float:
    n = int((cfg.get("craft") or {}).get("n_anchors", CraftAnchorSettings.n_anchors))
    return (n * forward_s_per_sample(gpu, table) + table["job_startup_s"]) / 3600.0


def probe_icsm_hours(cfg: dict, gpu: str, table: dict = MEASURED) -> float:
    return (table["probe_icsm_s"] * ratio(gpu, "h100") + 2 * table["job_startup_s"]) / 3600.0


def steps_from_runs(runs_dir: str | Path, cfg: dict) -> dict[str, float]:
    """Median optimizer-step time per method class from finished/partial runs' metrics.jsonl
    (their config.yaml says the method); steps of Thermostat measurements are included (amortised)."""
    out: dict[str, list[float]] = {}
    # runs/{run}/{config id}/metrics.jsonl (runs/{run}/metrics.jsonl: a root not yet migrated)
    for metrics in sorted(
        [*Path(runs_dir).glob("*/*/metrics.jsonl"), *Path(runs_dir).glob("*/metrics.jsonl")]
    ):
        conf = metrics.parent / "config.yaml"
        if not conf.exists():
            continue
        sc = yaml.safe_load(conf.read_text())
        cls = method_class_of(sc.get("method") or {})
        recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        times = [r["step_time_s"] for r in recs if "step_time_s" in r and r.get("step", 0) > 1]
        out.setdefault(cls, []).extend(times)
    return {k: float(np.median(v)) for k, v in out.items() if v}


# ----------------------------------------------------------------------------- the plan


def make_plan(
    cfg: dict,
    gpu: str,
    gpus: int,
    table: dict = MEASURED,
    step_fraction: float = 1.0,
    measured_step: dict | None = None,
) -> dict:

    runs = study_runs(cfg)
    rules: dict[str, dict] = {}

    def add(rule, jobs, hours, serial=False):
        r = rules.setdefault(rule, {"jobs": 0, "gpu_hours": 0.0, "serial": serial})
        r["jobs"] += jobs
        r["gpu_hours"] += hours

    add("probe+icsm", 2, probe_icsm_hours(cfg, gpu, table), serial=True)
    from .study import anchor_set_of

    # one anchor cache per suite, and one per few-shot subset a CRaFT run trains on (shots x seed)
    craft_sets = sorted({a for a in (anchor_set_of(cfg, r) for r in runs) if a})
    if craft_sets:
        add(
            "craft_anchors",
            len(craft_sets),
            len(craft_sets) * craft_anchor_hours(cfg, gpu, table),
            serial=True,
        )
    for r in runs:
        add("train", 1, train_hours(cfg, r, gpu, table, measured_step))
    from .study import run_eval_suites, teacher_evals

    eval_suites: dict[str, int] = {}  # closed-loop evaluations per suite (the workflow's eval jobs)
    for s in [s for _, s in teacher_evals(cfg, runs)] + [s for r in runs for s in run_eval_suites(cfg, r)]:
        eval_suites[s] = eval_suites.get(s, 0) + 1
    episodes = 0
    for s, n in sorted(eval_suites.items()):
        add("eval", n, n * eval_hours(cfg, s, gpu, table, step_fraction))
        episodes += n * suite_episode(cfg, s)[0]
    add("forgetting", len(runs) + 1, (len(runs) + 1) * forgetting_hours(cfg, gpu, table))
    total = sum(r["gpu_hours"] for r in rules.values())
    serial = sum(r["gpu_hours"] for r in rules.values() if r["serial"])
    wall_h = serial + (total - serial) / max(1, gpus)
    return {
        "gpu": gpu,
        "gpus": gpus,
        "estimate": gpu not in (table["train"]["gpu"],),
        "runs": len(runs),
        "eval_episodes": episodes,
        "train_steps": int(cfg["train"]["max_steps"]),
        "micro_batch": int(cfg["train"]["batch_size"]),
        "grad_accum": int(cfg["train"].get("grad_accum", TrainSettings.grad_accum)),
        "nproc": int(cfg["train"].get("nproc", TrainSettings.nproc)),
        "step_fraction": step_fraction,
        "measured_step_s": measured_step or None,
        "rules": {k: {"jobs": v["jobs"], "gpu_hours": round(v["gpu_hours"], 2)} for k, v in rules.items()},
        "total_gpu_hours": round(total, 1),
        "wall_clock_days": round(wall_h / 24.0, 2),
    }


def format_plan(p: dict, title: str) -> str:
    head = (
        f"# {title}: {p['runs']} training runs x {p['train_steps']} steps "
        f"(micro-batch {p['micro_batch']} x accum {p['grad_accum']} x {p['nproc']} GPU), "
        f"{p['eval_episodes']} evaluation episodes"
    )
    note = (
        " (ESTIMATE: H200/H100 measurements scaled by published TFLOP/s ratios; see docs/benchmarks.md)"
        if p["estimate"]
        else ""
    )
    lines = [
        head,
        f"GPU {p['gpu']} x {p['gpus']}{note}",
        "",
        "| rule | jobs | GPU-hours |",
        "| --- | --- | --- |",
    ]
    for k, v in p["rules"].items():
        lines.append(f"| {k} | {v['jobs']} | {v['gpu_hours']:.1f} |")
    tail = (
        f"wall-clock >= {p['wall_clock_days']:.1f} days on {p['gpus']} GPU(s) (teacher-only jobs first, "
        f"the rest spread evenly; evaluation assumes every episode runs {p['step_fraction']:.0%} of its step cap)"
    )
    lines += [f"| **total** | | **{p['total_gpu_hours']:.1f}** |", "", tail]
    return "\n".join(lines)


def profile_from_argv(argv: list[str], environ: dict | None = None) -> str | None:
    """The Snakemake profile of this invocation: --profile X / --profile=X, else $SNAKEMAKE_PROFILE."""
    for i, a in enumerate(argv):
        if a == "--profile" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--profile="):
            return a.split("=", 1)[1]
    return (environ or {}).get("SNAKEMAKE_PROFILE") or None


def is_dry_run(argv: list[str]) -> bool:
    short = {c for a in argv if a.startswith("-") and not a.startswith("--") for c in a[1:]}
    return "n" in short or any(a in ("--dry-run", "--dryrun") for a in argv)


def dry_run_summary(
    cfg: dict, argv: list[str], environ: dict | None = None, repo: str | Path = "."
) -> str | None:
    """The plan table for a Snakemake dry-run of a GPU profile (the workflow prints it at parse time):
    the configured study (`cfg` = the merged config of this invocation) on the profile's GPU model and
    count. None when this is not a dry-run or the profile names no GPU model / count (demo, ci, a
    cluster without gpu=N): `vlaforget plan --gpus N` covers those."""
    prof_dir = profile_from_argv(argv, environ)
    if not is_dry_run(argv) or not prof_dir:
        return None
    d = Path(prof_dir)
    if not d.is_absolute() and not d.exists():
        d = Path(repo) / d
    try:
        prof = read_profile(d)
    except PlanError:
        return None
    if not prof["gpu_model"] or not prof["gpus"] or prof["gpu_model"] not in GPU_TFLOPS:
        return None
    p = make_plan(cfg, prof["gpu_model"], prof["gpus"])
    return format_plan(p, f"vlaforget plan for this dry-run (profile {prof['name']})")


def add_args(p):
    p.add_argument("--profile", required=True, help="Snakemake profile directory (profiles/4090)")
    p.add_argument(
        "--configfiles",
        nargs="*",
        default=None,
        help="overlays on config/config.yaml (default: the profile's configfiles)",
    )
    p.add_argument(
        "--gpu", default=None, help=f"GPU model ({', '.join(GPU_TFLOPS)}); default: from the profile"
    )
    p.add_argument(
        "--gpus", type=int, default=None, help="GPUs to spread over (default: the profile's gpu=N)"
    )
    p.add_argument(
        "--step-fraction",
        type=float,
        default=1.0,
        help="share of the step cap an evaluation episode runs (1.0 = upper bound)",
    )
    p.add_argument(
        "--runs-dir", default=None, help="finished runs ({root}/runs) whose step times replace the table"
    )
    p.add_argument("--repo", default=".", help="repository root the config paths are relative to")
    p.add_argument("--json", default=None, help="also write the plan here")


def main(args) -> int:
    from .config import load_config

    repo = Path(args.repo)
    prof = read_profile(args.profile)
    overlays = args.configfiles if args.configfiles is not None else prof["configfiles"]
    cfg = load_config(repo / "config" / "config.yaml", *[repo / f for f in overlays])
    gpu = args.gpu or prof["gpu_model"]
    if not gpu:
        raise PlanError(f"profile {args.profile} names no GPU model: give --gpu ({', '.join(GPU_TFLOPS)})")
    gpus = args.gpus or prof["gpus"]
    if not gpus:
        raise PlanError(f"profile {args.profile} sets no gpu=N resource (e.g. a cluster): give --gpus N")
    measured = steps_from_runs(args.runs_dir, cfg) if args.runs_dir else None
    plan = make_plan(cfg, gpu, gpus, step_fraction=args.step_fraction, measured_step=measured)
    plan["profile"], plan["configfiles"] = args.profile, overlays
    print(format_plan(plan, f"{prof['name']} ({' + '.join(overlays) or 'config/config.yaml'})"))
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=2))
    return 0
