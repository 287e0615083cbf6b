# Helpers shared by every rule: config validation, the study grid (run names), paths under the data
# root, stage-config files, job environment and resources. Everything with logic lives in vlaforget.

import os
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from vlaforget import config as vfc
from vlaforget.config import ConfigError
from vlaforget.paths import PathPolicyError, job_env


# Fail in the first second, naming the key, before any DAG is built.
try:
    vfc.validate(config)
except (ConfigError, PathPolicyError) as e:
    sys.exit(f"vlaforget: {e}")


ROOT = vfc.resolve_root(config)
LAYOUT = vfc.layout(config)
BASE = config["model"]["base"]
PROBE_SET = vfc.probe_set_name(config)
METAWORLD = config["world"] == "metaworld"
STUDY = config["study"]
UPSTREAM_SUITES = list(config["eval"].get("forgetting", {}).get("upstream_suites") or [])
RES = config.get("resources") or {}

NAME = vfc.NAME_RE
RUN_RE = rf"{NAME}__{NAME}__(?:full|\d+shot)__s\d+"


wildcard_constraints:
    stage="demos|cache|model|probe|icsm|craft_anchors|train|eval|forgetting",
    dataset=NAME,
    suite=NAME,
    run=rf"teacher|{RUN_RE}",
    trun=RUN_RE,


# ----------------------------------------------------------------------------- paths


def R(path) -> str:
    """A path under the data root, as a string for Snakemake."""
    return str(path)


def cfg_file(stage, key):
    """The stage-config file a stage job reads (written by rule stage_config)."""
    return R(ROOT / "configs" / stage / f"{key}.yaml")


def log_file(stage, key):
    return R(ROOT / "logs" / stage / f"{key}.log")


def cache_outputs(dataset):
    d = LAYOUT.cache(dataset)
    return {"manifest": R(d / "manifest.json"), "stats": R(d / "dataset_statistics.json")}


def model_done():
    return R(LAYOUT.model(BASE) / "done.json")


def probe_file():
    return R(LAYOUT.probe(BASE, PROBE_SET) / "probe.pt")


def icsm_meta():
    return R(LAYOUT.icsm(BASE, PROBE_SET) / "meta.json")


def anchors_file(dataset):
    return R(LAYOUT.craft(BASE, dataset) / "anchors.pt")


def train_done(run):
    return R(LAYOUT.run(run) / "final" / "done.json")


def eval_file(run, suite):
    return R(LAYOUT.eval(run) / f"{suite}.json")


def forgetting_file(run):
    return R(LAYOUT.eval(run) / "forgetting.json")


# ----------------------------------------------------------------------------- study grid


def main_runs():
    return [vfc.run_name(m, s, "full", seed)
            for s in STUDY.get("suites", []) for m in STUDY.get("methods", []) for seed in STUDY.get("seeds", [])]


def fewshot_runs():
    suite = STUDY.get("fewshot_suite")
    if not suite:
        return []
    return [vfc.run_name(m, suite, vfc.shots_name(k), seed)
            for m in STUDY.get("fewshot_methods", []) for k in STUDY.get("shots", [])
            for seed in STUDY.get("seeds", [])]


def ablation_methods():
    """The listed ablations plus the full methods they ablate (their bases), bases first."""
    abl = list(STUDY.get("ablations", []))
    bases = []
    for a in abl:
        b = config["ablations"][a]["base"]
        if b not in bases:
            bases.append(b)
    return bases + abl


def ablation_runs():
    suite = STUDY.get("ablation_suite")
    if not suite or not STUDY.get("ablations"):
        return []
    return [vfc.run_name(m, suite, "full", seed)
            for m in ablation_methods() for seed in STUDY.get("ablation_seeds", [])]


def all_runs():
    out = []
    for r in main_runs() + fewshot_runs() + ablation_runs():
        if r not in out:
            out.append(r)
    return out


def run_suite(run):
    return vfc.parse_run_name(run)["suite"]


def run_eval_suites(run):
    """Suites a run (or the teacher) is evaluated on in closed loop: its own + the upstream suites."""
    suites = [] if run == "teacher" else [run_suite(run)]
    for s in UPSTREAM_SUITES:
        if s not in suites:
            suites.append(s)
    return suites


def run_eval_files(run):
    return [eval_file(run, s) for s in run_eval_suites(run)] + [forgetting_file(run)]


def teacher_eval_files(runs):
    """The teacher's evals on every suite the given runs are trained or measured on."""
    suites = []
    for r in runs:
        for s in run_eval_suites(r):
            if s not in suites:
                suites.append(s)
    for s in UPSTREAM_SUITES:
        if s not in suites:
            suites.append(s)
    return [eval_file("teacher", s) for s in suites] + [forgetting_file("teacher")]


def table_inputs(runs):
    files = []
    for r in runs:
        files += run_eval_files(r)
    return files + teacher_eval_files(runs)


# ----------------------------------------------------------------------------- stage configs

_STAGE_CONFIGS = {}


def stage_cfg(stage, key):
    """stage_config(), memoised: the DAG asks for the same stage config many times."""
    k = (stage, key)
    if k not in _STAGE_CONFIGS:
        _STAGE_CONFIGS[k] = vfc.stage_config(config, stage, key)
    return _STAGE_CONFIGS[k]


# ----------------------------------------------------------------------------- jobs

# How jobs call the library. With `--sdm conda` each rule runs in its conda env (envs/*.yaml) and the
# library comes from the source tree (PYTHONPATH); otherwise the Python running Snakemake (the venv
# of `make install`) runs it, so nothing depends on PATH.
USE_CONDA = "conda" in str(getattr(workflow.deployment_settings, "deployment_method", "")).lower()
PYTHON = "python" if USE_CONDA else shlex.quote(sys.executable)
VLAFORGET = f"{PYTHON} -m vlaforget.cli"
SRC_DIR = str(Path(workflow.basedir) / "src")
CONDA_ENV = "../../envs/openvla.yaml" if config["model"]["backend"] == "openvla" else "../../envs/vlaforget.yaml"

# Every job exports these so no library (HF, torch, W&B, matplotlib, TMPDIR) writes outside root.
JOB_ENV = "; ".join(f"export {k}={shlex.quote(v)}" for k, v in job_env(ROOT).items())
JOB_ENV = f"{JOB_ENV}; mkdir -p {shlex.quote(str(LAYOUT.tmp))}"
if USE_CONDA:
    JOB_ENV = f"{JOB_ENV}; export PYTHONPATH={shlex.quote(SRC_DIR)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}"


def gpus(kind):
    """GPUs per job of one kind (train / eval / probe), from config resources."""
    n = int(RES.get(f"{kind}_gpus", 0))
    if kind == "train" and n > 0:
        n = max(n, int(config["train"].get("nproc", 1)))
    return n


def stage_shell(stage_cli, gpu_kind=None, launcher=""):
    """Shell line of a stage job: job env, GPU slot allocation, the stage command, its log.

    `vlaforget gpu-run --gpus N` holds N free GPU ids (lock files) and sets CUDA_VISIBLE_DEVICES;
    it is a no-op for N=0 and under SLURM (the scheduler sets the ids).
    """
    run = launcher or VLAFORGET
    gpu = f"{VLAFORGET} gpu-run --gpus {{resources.gpu}} -- " if gpu_kind else ""
    return (
        f"{JOB_ENV}; export OMP_NUM_THREADS={{threads}}; "
        'echo "host=$(hostname) CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}" > {log}; '
        f"{gpu}{run} {stage_cli} --config {{input.cfg}} >> {{log}} 2>&1"
    )


def train_launcher():
    """torchrun --standalone over train.nproc processes (one per GPU), else the plain stage command."""
    nproc = int(config["train"].get("nproc", 1))
    if nproc > 1:
        return f"{PYTHON} -m torch.distributed.run --standalone --nproc-per-node {nproc} -m vlaforget.cli"
    return ""


def disk_safety_check():
    """onstart: data-root policy, root creatable, large files in the repo, free space."""
    from vlaforget import disk

    ok = disk.workflow_check(config, repo_dir=workflow.basedir)
    if not ok:
        raise WorkflowError("disk-safety check failed (see above); nothing was run")


# ----------------------------------------------------------------------------- input functions


def cache_input(w):
    inp = {"cfg": cfg_file("cache", w.dataset)}
    if METAWORLD:
        inp["rlds"] = R(LAYOUT.rlds(w.dataset) / "done.json")
    return inp


def model_input(w):
    inp = {"cfg": cfg_file("model", BASE)}
    if config["model"]["backend"] == "tiny":
        inp["caches"] = [cache_outputs(d)["manifest"] for d in config["data"]["metaworld"]["datasets"]]
    return inp


def train_input(w):
    sc = stage_cfg("train", w.trun)
    inp = {"cfg": cfg_file("train", w.trun), "model": model_done(), "cache": cache_outputs(sc["suite"])["manifest"]}
    if sc.get("icsm_dir"):
        inp["icsm"] = icsm_meta()
    if sc.get("probe_dir"):
        inp["probe"] = probe_file()
    if sc.get("craft_dir"):
        inp["anchors"] = anchors_file(sc["suite"])
    return inp


def eval_input(w):
    inp = {"cfg": cfg_file("eval", f"{w.run}@{w.suite}"), "model": model_done(),
           "stats": cache_outputs(w.suite)["stats"]}
    if w.run != "teacher":
        inp["train"] = train_done(w.run)
    return inp


def forgetting_input(w):
    inp = {"cfg": cfg_file("forgetting", w.run), "model": model_done(), "probe": probe_file(),
           "icsm": icsm_meta()}
    if w.run != "teacher":
        inp["train"] = train_done(w.run)
    if METAWORLD:
        inp["caches"] = [cache_outputs(s)["manifest"] for s in UPSTREAM_SUITES]
    inp.update(libero_vqa_input())  # workflow/rules/vqa.smk
    return inp


TABLE_RUNS = {"main": main_runs, "fewshot": fewshot_runs, "ablation": ablation_runs}
FIGURES = ["pareto", "training_curves", "ablation", "category_retention"]


def figures_outputs():
    return [f"results/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]


def figure_run_files():
    """Runs whose metrics.jsonl the figures plot (main + ablation), via their completion files."""
    return [train_done(r) for r in dict.fromkeys(main_runs() + ablation_runs())]


def report_shell(args):
    """Shell line of a report job (table / figures), logged."""
    return f"{JOB_ENV}; {VLAFORGET} {args} > {{log}} 2>&1"
