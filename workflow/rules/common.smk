# Helpers shared by every rule: config validation, the study grid (run names), paths under the data
# root, stage-config files, job environment and resources. Everything with logic lives in vlaforget.

import json
import os
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from vlaforget import stageconfig as vsc
from vlaforget import stagefile as vsf
from vlaforget import study as vfs
from vlaforget.codedeps import code_hash
from vlaforget.config import ConfigError, validate
from vlaforget.io import config_id, stable_hash
from vlaforget.jobs import JobPythonError, check_job_python, crash_guard, job_python
from vlaforget.paths import PathPolicyError, job_env, resolve_root


# Fail in the first second, naming the key, before any DAG is built.
try:
    validate(config)
except (ConfigError, PathPolicyError) as e:
    sys.exit(f"vlaforget: {e}")


ROOT = resolve_root(config)
LAYOUT = vsc.layout(config)
BASE = config["model"]["base"]
PROBE_SET = vfs.probe_set_name(config)
METAWORLD = config["world"] == "metaworld"
FIXTURE = config["data"].get("fixture")  # world libero: LIBERO-format RLDS written here (rehearsal)
STUDY = config["study"]
UPSTREAM_SUITES = list(config["eval"].get("forgetting", {}).get("upstream_suites") or [])
RES = config.get("resources") or {}

NAME = vfs.NAME_RE
RUN_RE = rf"{NAME}__{NAME}__(?:full|\d+shot|chain\d+)__s\d+"


wildcard_constraints:
    stage="demos|cache|model|probe|icsm|craft_anchors|train|eval|forgetting",
    cid=vsf.CONFIG_ID_RE,
    dataset=NAME,
    suite=NAME,
    run=rf"{vfs.TEACHER_RE}|{RUN_RE}",
    trun=RUN_RE,


# ----------------------------------------------------------------------------- paths
# A result's identity is its path (docs/DEVELOPMENT.md): every output of a stage job lives at
# `{job folder}/{config id}/` (an eval: `{config id}.json`), its stage config at
# `configs/{stage}/{key}/{config id}.yaml`, so two configurations never share a file and Snakemake's
# own up-to-date logic is right for any number of checkouts on one root. Every path a rule declares
# is built here, once: rules call these with wildcards ("{dataset}", "{cid}"), input functions with
# values (the config id then comes from this checkout's config).

CID = vsf.CONFIG_ID_RE
_STAGE_CONFIGS = {}


def stage_cfg(stage, key):
    """stage_config(), memoised: the DAG asks for the same stage config many times."""
    k = (stage, key)
    if k not in _STAGE_CONFIGS:
        _STAGE_CONFIGS[k] = vsc.stage_config(config, stage, key)
    return _STAGE_CONFIGS[k]


def cid_of(stage, key):
    """The config id of one stage job in this checkout's config."""
    return config_id(stage_cfg(stage, key))


def this_config(stage, key, cid):
    """An input function's guard: a path with another config id is not this checkout's to build."""
    if cid != cid_of(stage, key):
        raise WorkflowError(
            f"{stage} {key}: config id {cid} is not this config's ({cid_of(stage, key)}). Outputs are "
            "addressed by the config that made them; ask for this config's targets (rule names, or "
            "`vlaforget plan`), not another config's files.")
    return cid


def R(path) -> str:
    """A path under the data root, as a string for Snakemake."""
    return str(path)


def out(stage, key, cid=None, rel=""):
    """A stage job's output folder (or, with `rel`, a file in it); cid None: this config's id."""
    p = vsc.job_dir(config, stage, key) / (cid or cid_of(stage, key))
    return R(p / rel) if rel else R(p)


def cfg_file(stage, key, cid=None):
    """The stage-config file a stage job reads (written by rule stage_config)."""
    return R(ROOT / "configs" / stage / key / f"{cid or cid_of(stage, key)}.yaml")


def log_file(stage, key, cid="{cid}"):
    return R(ROOT / "logs" / stage / key / f"{cid}.log")


def bench_file(stage, key, cid="{cid}"):
    """`benchmark:` of a GPU rule: Snakemake's per-job wall time, CPU time and peak memory (TSV)."""
    return R(ROOT / "benchmarks" / stage / key / f"{cid}.tsv")


def demos_done(dataset, cid=None):
    return out("demos", dataset, cid, "done.json")


def cache_outputs(dataset, cid=None):
    return {"manifest": out("cache", dataset, cid, "manifest.json"),
            "stats": out("cache", dataset, cid, "dataset_statistics.json")}


def model_done(cid=None):
    return out("model", BASE, cid, "done.json")


def probe_file(cid=None):
    return out("probe", PROBE_SET, cid, "probe.pt")


def probe_audit(cid=None):
    return out("probe", PROBE_SET, cid, "audit.json")


def icsm_meta(cid=None):
    return out("icsm", PROBE_SET, cid, "meta.json")


def anchors_file(aset, cid=None):
    return out("craft_anchors", aset, cid, "anchors.pt")


def train_done(run, cid=None):
    return out("train", run, cid, "final/done.json")


def eval_file(run, suite, cid=None):
    return R(vsc.job_dir(config, "eval", f"{run}@{suite}") / f"{cid or cid_of('eval', f'{run}@{suite}')}.json")


def forgetting_file(run, cid=None):
    return R(vsc.job_dir(config, "forgetting", run) / f"{cid or cid_of('forgetting', run)}.json")


def export_dir(run, cid=None):
    return R(ROOT / "exports" / run / (cid or cid_of("train", run)))


FIXTURE_DIR = vsc.rlds_root(config) if FIXTURE else ROOT / "datasets" / "rlds" / "fixture" / "none"


def fixture_done():
    return R(FIXTURE_DIR / "libero_fixture.json")


def libero_vqa_manifest():
    return R(vsc.libero_vqa_dir(config) / "manifest.json")


# ----------------------------------------------------------------------------- study grid
# The grid is the library's (vlaforget.study): the same lists `vlaforget plan` and migrate-root read.

CHAIN_SUITES = vfs.chain_suites(config)
TABLE_RUNS = vfs.table_runs(config)  # kind -> runs (lifelong only with study.chain)
CHAIN_RUNS = set(vfs.chain_runs(config))


def main_runs():
    return vfs.main_runs(config)


def ablation_runs():
    return vfs.ablation_runs(config)


def chain_runs():
    return vfs.chain_runs(config)


def all_runs():
    return vfs.all_runs(config)


def run_eval_files(run):
    return [eval_file(run, s) for s in vfs.run_eval_suites(config, run)] + [forgetting_file(run)]


def teacher_eval_files(runs):
    """The teacher's evals on every suite the given runs are trained or measured on (eval.initial_states
    per_seed: on each seed's initial states, `teacher__s{seed}`), and its forgetting metrics."""
    return [eval_file(t, s) for t, s in vfs.teacher_evals(config, runs)] + [forgetting_file("teacher")]


def table_inputs(runs):
    files = []
    for r in runs:
        files += run_eval_files(r)
    return files + teacher_eval_files(runs)


# ----------------------------------------------------------------------------- reports


def report_cfg(key):
    """What a table (key main / fewshot / ablation / lifelong) or the figures are built from: the
    study, the exact eval files (their paths hold their config ids) and the report code. Its hash
    names the table's record under the data root, {root}/reports/<key>/<id>.json: a table whose
    record is missing (an empty root, another config's evals) is rebuilt, whatever its file says."""
    from vlaforget.io import relocatable

    runs = main_runs() if key == "figures" else TABLE_RUNS[key]
    body = {
        "stage": "report",
        "key": key,
        "study_name": config.get("study_name"),
        "upstream_suites": UPSTREAM_SUITES,
        "inputs": lifelong_inputs() if key == "lifelong" else table_inputs(runs),
        "code": code_hash("figures" if key == "figures" else "table"),
        **({"chain_suites": CHAIN_SUITES} if key == "lifelong" else {}),
    }
    return relocatable(body, str(ROOT))


def report_id(key):
    return stable_hash(report_cfg(key))


def table_record(kind):
    """What table <kind> was built from, under the data root (an output of its table rule)."""
    return R(ROOT / "reports" / f"table_{kind}" / f"{report_id(kind)}.json")


def figures_record():
    return R(ROOT / "reports" / "figures" / f"{report_id('figures')}.json")


def table_csv(kind):
    return f"{RESULTS}/table_{kind}.csv"


def table_md(kind):
    return f"{RESULTS}/table_{kind}.md"


def table_paper(kind, what):
    """The compact paper table beside table_{kind}.csv: paper_md, tex or stats (stages/table.py)."""
    from vlaforget.stages.table import paper_paths

    return str(paper_paths(table_csv(kind))[what])


def report_log(name):
    return R(ROOT / "logs" / "report" / f"{name}.log")


# ----------------------------------------------------------------------------- jobs

# How jobs call the library. With `--sdm conda` each rule runs in its conda env (envs/*.yaml) and the
# library comes from the source tree (PYTHONPATH); otherwise the Python running Snakemake (the venv
# of `make install`) runs it, so nothing depends on PATH.
# `job_python` (config) names another interpreter for every job: the real study's env of
# `make real-env` (.venv-real/bin/python) or the user's conda env (docs: README "The real study").
USE_CONDA = "conda" in str(getattr(workflow.deployment_settings, "deployment_method", "")).lower()
JOB_PYTHON = job_python(config, workflow.basedir, sys.executable)
PYTHON = "python" if USE_CONDA else shlex.quote(JOB_PYTHON)
VLAFORGET = f"{PYTHON} -m vlaforget.cli"
SRC_DIR = str(Path(workflow.basedir) / "src")
CONDA_ENV = "../../envs/openvla.yaml" if config["model"]["backend"] == "openvla" else "../../envs/vlaforget.yaml"

# Every job exports these so no library (HF, torch, W&B, matplotlib, TMPDIR) writes outside root.
JOB_ENV = "; ".join(f"export {k}={shlex.quote(v)}" for k, v in job_env(ROOT).items())
JOB_ENV = f"{JOB_ENV}; mkdir -p {shlex.quote(str(LAYOUT.tmp))}"
# The embedded study's CPU numbers the same on every x86 machine (issue 27 item 7; docs/benchmarks.md
# "Issue 27: CPU reproducibility"): one kernel family for ATen's own vector kernels, MKL's BLAS
# (conditional numerical reproducibility) and oneDNN, whatever the CPU offers beyond AVX2. A variable
# already set in the caller's environment wins.
CPU_KERNEL_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}
if METAWORLD:
    JOB_ENV = f"{JOB_ENV}; " + "; ".join(
        f"export {k}={shlex.quote(os.environ.get(k, v))}" for k, v in CPU_KERNEL_ENV.items())
if USE_CONDA or JOB_PYTHON != sys.executable:
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
        # Snakemake deletes {log} before each attempt: {log}.attempts keeps every attempt, each with a header
        'echo "=== attempt $(date -u +%Y-%m-%dT%H:%M:%SZ) host=$(hostname) pid=$$ '
        'CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}} USE_TF=$USE_TF '
        f'python={PYTHON}"'
        " | tee -a {log}.attempts > {log}; "
        # the current values of the keys outside the job's id (stagefile.NON_SEMANTIC_ENV)
        + "export VLAFORGET_NON_SEMANTIC={params.non_semantic:q}; "
        + crash_guard(f"{gpu}{run} {stage_cli} --config {{input.cfg}} 2>&1 | tee -a {{log}}.attempts >> {{log}}",
                      "{log}", stage_cli, f"{VLAFORGET} {stage_cli} --config {{input.cfg}}")
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


def preflight_check():
    """onstart: the jobs' Python exists; for world libero `vlaforget preflight` in that Python (model,
    OpenVLA stack, RLDS builder dirs, LIBERO + verified assets, VQA set): one message, before any job.
    VLAFORGET_SKIP_PREFLIGHT=1 skips it."""
    import subprocess
    import tempfile

    if os.environ.get("VLAFORGET_SKIP_PREFLIGHT") == "1":
        return
    if not USE_CONDA:
        try:
            check_job_python(JOB_PYTHON)
        except JobPythonError as e:
            raise WorkflowError(f"vlaforget: {e}")
    if config["world"] != "libero" or USE_CONDA:
        return
    LAYOUT.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=LAYOUT.tmp, delete=False) as f:
        yaml.safe_dump(dict(config), f)
    pythonpath = os.pathsep.join(p for p in (SRC_DIR, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **job_env(ROOT), "PYTHONPATH": pythonpath}
    try:
        r = subprocess.run([JOB_PYTHON, "-m", "vlaforget.cli", "preflight", "--configfile", f.name],
                           env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(f.name)
    print((r.stdout + r.stderr).strip(), file=sys.stderr)
    if r.returncode != 0:
        raise WorkflowError("preflight failed (see above); nothing was run. Check it by hand: "
                            f"{JOB_PYTHON} -m vlaforget.cli preflight --configfile <your configs>")


# ----------------------------------------------------------------------------- input functions


def fixture_datasets():
    """Every dataset the fixture writes: the study's suites and the tiny teacher's pretraining data."""
    return vsc.fixture_params(config)["suites"]


def stage_input(stage):
    """Input function of a stage rule (wildcards key-named per rule, and cid): its stage-config file
    and the completion files of every job it reads, each at its config id's path (stageconfig.stage_inputs)."""
    def inputs(w):
        key = {"demos": lambda: w.dataset, "cache": lambda: w.dataset, "model": lambda: BASE,
               "probe": lambda: PROBE_SET, "icsm": lambda: PROBE_SET, "craft_anchors": lambda: w.aset,
               "train": lambda: w.trun, "eval": lambda: f"{w.run}@{w.suite}",
               "forgetting": lambda: w.run}[stage]()
        cid = this_config(stage, key, w.cid)
        inp = {"cfg": cfg_file(stage, key, cid)}
        for name, i in stage_cfg(stage, key)["inputs"].items():
            inp[name.replace(":", "_")] = i["file"]
        if stage == "cache" and FIXTURE:
            inp["rlds"] = fixture_done()
        if stage == "eval":  # the suite's statistics (the action de-normalisation)
            inp["stats"] = cache_outputs(w.suite)["stats"]
        if stage == "forgetting":
            inp.update(libero_vqa_input())  # workflow/rules/vqa.smk
        return inp

    return inputs


def non_semantic(stage):
    """Derived param (it takes `output`, so Snakemake's params trigger does not compare it): the
    current values of the keys a job's id leaves out, passed to the job (stagefile.NON_SEMANTIC_ENV)."""
    def values(w, output):
        key = {"demos": "dataset", "train": "trun"}.get(stage)
        return json.dumps(vsf.non_semantic_values(stage_cfg(stage, getattr(w, key)))) if key else "{}"

    return values


FIGURES = ["pareto", "training_curves", "ablation", "category_retention"]


def table_outputs():
    return [table_csv(kind) for kind in TABLE_RUNS]


def report_records():
    """{root}/reports/<name>/<id>.json: what each table and the figures were built from."""
    return [table_record(kind) for kind in TABLE_RUNS] + [figures_record()]


def lifelong_inputs():
    """The success matrix of every chain: each stage and the teacher (row 0) on every chain suite."""
    teacher = [eval_file(t, s) for t, s in vfs.teacher_evals(config, chain_runs()) if s in CHAIN_SUITES]
    return teacher + [eval_file(r, s) for r in chain_runs() for s in CHAIN_SUITES]


def lifelong_run_dirs():
    return [out("train", r) for r in chain_runs()]


def figures_outputs():
    return [f"{RESULTS}/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]


def figure_run_files():
    """Runs whose metrics.jsonl the figures plot (main + ablation), via their completion files."""
    return [train_done(r) for r in dict.fromkeys(main_runs() + ablation_runs())]


def report_shell(args, record=False):
    """Shell line of a report job (table / figures), logged; with `record`, the job then writes its
    record (params.record), only when the command succeeded."""
    cli = args.split()[0]
    then = "printf '%s' {params.record:q} > {output.record}" if record else ""
    return f"{JOB_ENV}; " + crash_guard(f"{VLAFORGET} {args} > {{log}} 2>&1", "{log}", cli,
                                         f"{VLAFORGET} {cli} ... (snakemake -p prints the full line)", then=then)


# Tables and figures: `results_dir` (relative to the repo: per checkout; the real study: results/, the
# embedded studies: results/demo (git-ignored), results/embedded_gpu/); null = under the data root, in a folder named by what the
# tables were built from ({root}/results/<study>-<id>/: CI and rehearsal write nothing into the repo).
if config.get("results_dir"):
    RESULTS = str(config["results_dir"]).rstrip("/")
else:
    RESULTS = R(ROOT / "results" / f"{config.get('study_name') or 'study'}-"
                f"{stable_hash([report_cfg(k) for k in [*TABLE_RUNS, 'figures']])}")  # after the input functions report_cfg calls (lifelong_inputs)


# ----------------------------------------------------------------------------- before any job
# Parsing writes nothing (a dry-run leaves the root and the checkout as they were): outputs are
# addressed by their config ids, so there is nothing to rewrite or touch to make a job rerun.
if workflow.is_main_process:
    from vlaforget import freshness, validation

    _mode = freshness.sync_mode(sys.argv)
    if _mode == "run" and "--nolock" not in sys.argv:
        # before Snakemake takes its lock (onstart runs after it): a real run only, never a dry-run
        freshness.clear_stale_snakemake_lock(Path.cwd(), out=sys.stderr)  # after a kill -9: no --unlock
    _problems = validation.data_checks(config)
    if _problems and _mode == "run":
        sys.exit("vlaforget: " + "\n  ".join(["the config points at data that is not there:"] + _problems))
    for _p in _problems:
        print(f"vlaforget: warning: {_p}", file=sys.stderr)
    # what each job that builds beside an older config of itself changes (reads only)
    freshness.explain(((_st, _k, stage_cfg(_st, _k)) for _st, _k in vfs.stage_jobs(config)), out=sys.stderr)
    try:  # a dry-run of a GPU profile also says what the study costs (vlaforget plan; docs/benchmarks.md)
        from vlaforget.plan import dry_run_summary

        _plan = dry_run_summary(config, sys.argv, dict(os.environ), repo=workflow.basedir)
    except Exception as _e:  # the cost figure never breaks a dry-run
        _plan = f"vlaforget plan: not computed ({type(_e).__name__}: {_e})"
    if _plan:
        print(_plan, file=sys.stderr)
    # A table file in results_dir that this root holds no record for (built from another config's or
    # another root's evaluations, or copied in), asked for as a file target (`snakemake
    # results/table_main.csv`): Snakemake alone calls an existing file target up to date, so it would
    # be served. The rule targets (table_main, ..., the default) also ask for the record and rebuild
    # it; a file target is refused with that advice. Nothing is moved or written here.
    _targets = {os.path.normpath(a) for a in sys.argv[1:] if not a.startswith("-")}
    for _kind in TABLE_RUNS:
        _csv, _rec = Path(table_csv(_kind)), Path(table_record(_kind))
        _asked = {os.path.normpath(table_csv(_kind)), os.path.normpath(table_md(_kind))} & _targets
        if _asked and _csv.exists() and not _rec.exists():
            _msg = (f"vlaforget: {_csv} was not built from this root's evaluations of this config (no {_rec}); "
                    f"ask for the rule target `table_{_kind}` instead (it rebuilds the table), or delete the file")
            if _mode == "run":
                sys.exit(_msg)
            print(_msg, file=sys.stderr)


# ----------------------------------------------------------------------------- rule helpers


def stage_config_text(w, output):
    """The file's content, {root} relative (stagefile.stage_config_text). It takes `output`: a derived
    param, which Snakemake's params trigger does not compare (the id in the path is the trigger)."""
    this_config(w.stage, w.key, w.cid)
    return vsf.stage_config_text(stage_cfg(w.stage, w.key))


def record_param(key):
    """The record's text, as a function (its `{root}` is no wildcard for Snakemake to expand)."""
    text = json.dumps(report_cfg(key), sort_keys=True)
    return lambda w: text
