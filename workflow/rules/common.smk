# Helpers shared by every rule: config validation, the study grid (run names), paths under the data
# root, stage-config files, job environment and resources. Everything with logic lives in vlaforget.

import json
import os
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from vlaforget import config as vfc
from vlaforget.config import ConfigError
from vlaforget.jobs import JobPythonError, check_job_python, crash_guard, job_python
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
FIXTURE = config["data"].get("fixture")  # world libero: LIBERO-format RLDS written here (rehearsal)
STUDY = config["study"]
UPSTREAM_SUITES = list(config["eval"].get("forgetting", {}).get("upstream_suites") or [])
RES = config.get("resources") or {}
# Tables and figures: `results_dir` (relative to the repo; the real study: results/, the embedded
# studies: results/demo (git-ignored), results/embedded_gpu/); null = {root}/results (CI, rehearsal:
# nothing lands in the repo).
RESULTS = str(config.get("results_dir") or ROOT / "results").rstrip("/")

NAME = vfc.NAME_RE
RUN_RE = rf"{NAME}__{NAME}__(?:full|\d+shot|chain\d+)__s\d+"


wildcard_constraints:
    stage="demos|cache|model|probe|icsm|craft_anchors|train|eval|forgetting",
    dataset=NAME,
    suite=NAME,
    run=rf"teacher|{RUN_RE}",
    trun=RUN_RE,


# ----------------------------------------------------------------------------- paths
# Every path a rule declares is built here, once: rules call these with wildcards ("{dataset}"),
# input functions with values. Benchmarks (time and memory of each GPU job) sit under the data root.


def R(path) -> str:
    """A path under the data root, as a string for Snakemake."""
    return str(path)


def cfg_file(stage, key):
    """The stage-config file a stage job reads (written by rule stage_config)."""
    return R(ROOT / "configs" / stage / f"{key}.yaml")


def log_file(stage, key):
    return R(ROOT / "logs" / stage / f"{key}.log")


def bench_file(stage, key):
    """`benchmark:` of a GPU rule: Snakemake's per-job wall time, CPU time and peak memory (TSV)."""
    return R(ROOT / "benchmarks" / stage / f"{key}.tsv")


def demos_done(dataset):
    return R(LAYOUT.rlds(dataset) / "done.json")


def cache_outputs(dataset):
    d = LAYOUT.cache(dataset)
    return {"manifest": R(d / "manifest.json"), "stats": R(d / "dataset_statistics.json")}


def model_done():
    return R(LAYOUT.model(BASE) / "done.json")


def probe_file():
    return R(LAYOUT.probe(BASE, PROBE_SET) / "probe.pt")


def probe_audit():
    return R(LAYOUT.probe(BASE, PROBE_SET) / "audit.json")


def icsm_meta():
    return R(LAYOUT.icsm(BASE, PROBE_SET) / "meta.json")


def anchors_file(aset):
    return R(LAYOUT.craft(BASE, aset) / "anchors.pt")


def train_done(run):
    return R(LAYOUT.run(run) / "final" / "done.json")


def eval_file(run, suite):
    return R(LAYOUT.eval(run) / f"{suite}.json")


def forgetting_file(run):
    return R(LAYOUT.eval(run) / "forgetting.json")


def export_dir(run):
    return R(ROOT / "exports" / run)


def fixture_done():
    return R(ROOT / "datasets" / "rlds" / "libero_fixture.json")


def libero_vqa_manifest():
    return R(LAYOUT.libero_vqa() / "manifest.json")


def table_csv(kind):
    return f"{RESULTS}/table_{kind}.csv"


def table_md(kind):
    return f"{RESULTS}/table_{kind}.md"


def table_paper(kind, what):
    """The compact paper table beside table_{kind}.csv: paper_md, tex or stats (stages/table.py)."""
    from vlaforget.stages.table import paper_paths

    return str(paper_paths(table_csv(kind))[what])


def table_record(kind):
    """What table <kind> was built from, under the data root (rule table's `record`)."""
    return R(ROOT / "reports" / f"table_{kind}.json")


def figures_record():
    return R(ROOT / "reports" / "figures.json")


def report_log(name):
    return R(ROOT / "logs" / "report" / f"{name}.log")


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


CHAIN_SUITES = vfc.chain_suites(config)


def chain_runs():
    """Every stage of every chain (study.chain: method x seed), stage 1 first in each chain."""
    return [r for ch in vfc.chain_runs(config) for r in ch]


def all_runs():
    out = []
    for r in main_runs() + fewshot_runs() + ablation_runs() + chain_runs():
        if r not in out:
            out.append(r)
    return out


def run_suite(run):
    return vfc.parse_run_name(run)["suite"]


def run_eval_suites(run):
    """Suites a run (or the teacher) is evaluated on in closed loop: its own + the upstream suites."""
    suites = [] if run == "teacher" else [run_suite(run)]
    # a chain stage: every chain suite (its row of the success matrix)
    extra = CHAIN_SUITES if run in CHAIN_RUNS else []
    for s in extra + UPSTREAM_SUITES:
        if s not in suites:
            suites.append(s)
    return suites


CHAIN_RUNS = set(chain_runs())


def run_eval_files(run):
    return [eval_file(run, s) for s in run_eval_suites(run)] + [forgetting_file(run)]


def teacher_eval_files(runs):
    """The teacher's evals on every suite the given runs are trained or measured on."""
    suites = []
    for r in runs:
        for s in run_eval_suites(r):
            if s not in suites:
                suites.append(s)
    for s in UPSTREAM_SUITES + (CHAIN_SUITES if set(runs) & CHAIN_RUNS else []):
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


def report_cfg(key):
    """What a table (key main / fewshot / ablation) or the figures are built from: the study, the
    exact eval files and the report code. Written to {root}/reports/<key>.json next to the data it
    describes, so a table is never 'up to date' for a root it was not built from (an empty root has
    no record: Snakemake does not regenerate missing inputs of a job whose outputs all exist), and
    a changed input list reruns it (params trigger)."""
    runs = main_runs() if key == "figures" else TABLE_RUNS[key]()
    return {
        "stage": "report",
        "key": key,
        "study_name": config.get("study_name"),
        "root": str(ROOT),
        "results_dir": RESULTS,
        "upstream_suites": UPSTREAM_SUITES,
        "inputs": lifelong_inputs() if key == "lifelong" else table_inputs(runs),
        "code": vfc.code_hash("figures" if key == "figures" else "table"),
        **({"chain_suites": CHAIN_SUITES} if key == "lifelong" else {}),
    }


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
    out = vfc.suites_all(config)
    if config["model"]["backend"] == "tiny":
        out += [d for d in vfc.tiny_corpus_datasets(config) if d not in out]
    return out


def cache_input(w):
    inp = {"cfg": cfg_file("cache", w.dataset)}
    if METAWORLD:
        inp["rlds"] = demos_done(w.dataset)
    elif FIXTURE:
        inp["rlds"] = fixture_done()
    return inp


def model_input(w):
    inp = {"cfg": cfg_file("model", BASE)}
    if config["model"]["backend"] == "tiny":
        inp["caches"] = [cache_outputs(d)["manifest"] for d in vfc.tiny_corpus_datasets(config)]
    return inp


def train_input(w):
    sc = stage_cfg("train", w.trun)
    inp = {"cfg": cfg_file("train", w.trun), "model": model_done(), "cache": cache_outputs(sc["suite"])["manifest"]}
    if sc.get("icsm_dir"):
        inp["icsm"] = icsm_meta()
    if sc.get("probe_dir"):
        inp["probe"] = probe_file()
    if sc.get("craft_dir"):
        inp["anchors"] = R(Path(sc["craft_dir"]) / "anchors.pt")  # the suite's or the few-shot subset's
    prev = vfc.chain_previous(config, w.trun)
    if prev:  # a chain stage starts from the previous stage's adapter
        inp["init"] = train_done(prev)
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
if CHAIN_SUITES:  # study.chain: the lifelong table (rule table_lifelong_build)
    TABLE_RUNS["lifelong"] = chain_runs
FIGURES = ["pareto", "training_curves", "ablation", "category_retention"]


def table_outputs():
    return [table_csv(kind) for kind in TABLE_RUNS]


def report_records():
    """{root}/reports/*.json: what each table and the figures were built from (rule table / figures)."""
    return [table_record(kind) for kind in TABLE_RUNS] + [figures_record()]


def lifelong_inputs():
    """The success matrix of every chain: each stage and the teacher (row 0) on every chain suite."""
    return [eval_file(r, s) for r in ["teacher"] + chain_runs() for s in CHAIN_SUITES]


def lifelong_run_dirs():
    return [R(LAYOUT.run(r)) for r in chain_runs()]


def figures_outputs():
    return [f"{RESULTS}/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]


def figure_run_files():
    """Runs whose metrics.jsonl the figures plot (main + ablation), via their completion files."""
    return [train_done(r) for r in dict.fromkeys(main_runs() + ablation_runs())]


def report_shell(args, record=False):
    """Shell line of a report job (table / figures), logged; then its record (params.record)."""
    cli = args.split()[0]
    line = f"{JOB_ENV}; " + crash_guard(f"{VLAFORGET} {args} > {{log}} 2>&1", "{log}", cli,
                                         f"{VLAFORGET} {cli} ... (snakemake -p prints the full line)")
    if record:  # crash_guard ends with `exit`: write the record first, only when the command succeeded
        line = line.replace("; exit $rc", "; [ $rc -ne 0 ] || printf '%s' {params.record:q} > {output.record}; exit $rc")
    return line


# ----------------------------------------------------------------------------- freshness (issue 17)


def stage_jobs():
    """(stage, key) of every stage job the study can ask for."""
    jobs = [("model", BASE), ("probe", PROBE_SET), ("icsm", PROBE_SET)]
    mw = (config["data"].get("metaworld") or {}).get("datasets") or {}
    jobs += [("demos", d) for d in mw] if METAWORLD else []
    jobs += [("cache", d) for d in vfc.suites_all(config)]
    runs = all_runs()
    for r in runs:
        jobs.append(("train", r))
        tc = stage_cfg("train", r)
        if tc.get("craft_dir"):
            # the run's own anchor set: its suite, or a few-shot run's `{suite}__{n}shot__s{seed}`
            # (keyed by the suite alone, the few-shot sets' configs were never synced: after an
            # upstream change their jobs refused the remade model as "made for another config")
            jobs.append(("craft_anchors", vfc.anchor_set(tc["suite"], tc["shots"], tc["seed"])))
        jobs += [("eval", f"{r}@{s}") for s in run_eval_suites(r)] + [("forgetting", r)]
    teacher = [f.rsplit("/", 1)[1][: -len(".json")] for f in teacher_eval_files(runs)]
    jobs += [("eval", f"teacher@{s}") for s in teacher if s != "forgetting"] + [("forgetting", "teacher")]
    return list(dict.fromkeys(jobs))


BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _stage_output(stage, key):
    """The declared completion output of a GPU stage job (the rule's output, via the same helper)."""
    if stage == "eval":
        return eval_file(*key.rsplit("@", 1))
    if stage in ("model", "probe", "icsm"):  # one job each: no key in the path
        return {"model": model_done, "probe": probe_file, "icsm": icsm_meta}[stage]()
    return {"craft_anchors": anchors_file, "train": train_done, "forgetting": forgetting_file}[stage](key)


def _placeholder_benchmarks():
    """Snakemake counts a missing `benchmark:` file as a missing output: a job finished before the
    GPU rules had benchmarks would rerun for it. Such a job gets a placeholder benchmark (header + NA:
    not measured), so nothing reruns; this is bookkeeping under the data root, written in a dry-run
    too, so the dry-run plans what a run does."""
    jobs = [(st, k) for st, k in stage_jobs() if st in BENCH_STAGES]
    craft_dir = ROOT / "artifacts" / f"craft_{BASE}"
    jobs += [("craft_anchors", p.parent.name) for p in craft_dir.glob("*/anchors.pt")] if craft_dir.is_dir() else []
    n = 0
    for st, k in dict.fromkeys(jobs):
        b = Path(bench_file(st, k))
        if b.exists() or not Path(_stage_output(st, k)).exists():
            continue
        try:
            b.parent.mkdir(parents=True, exist_ok=True)
            b.write_text(BENCH_HEADER + "\t".join(["NA"] * BENCH_HEADER.count("\t")) + "\tNA\n")
            n += 1
        except OSError as e:
            print(f"vlaforget: warning: cannot write placeholder benchmark {b}: {e}", file=sys.stderr)
    if n:
        print(f"vlaforget: {n} finished job(s) predate benchmarks: placeholder benchmark written (NA), "
              "nothing reruns for it", file=sys.stderr)


BENCH_STAGES = ("model", "probe", "icsm", "craft_anchors", "train", "eval", "forgetting")


# Never serve a stale result, whatever .snakemake holds: each output records the id of the config it
# was made for; a stage-config file whose content or output disagrees with this config is rewritten
# or touched before the DAG is built, so mtimes rerun exactly those jobs (a dry-run only reports them).
if workflow.is_main_process:
    from vlaforget import freshness, validation

    _mode = freshness.sync_mode(sys.argv)
    if _mode == "run" and "--nolock" not in sys.argv:
        freshness.clear_stale_snakemake_lock(Path.cwd(), out=sys.stderr)  # after a kill -9: no --unlock
    _problems = validation.data_checks(config)
    if _problems and _mode == "run":
        sys.exit("vlaforget: " + "\n  ".join(["the config points at data that is not there:"] + _problems))
    for _p in _problems:
        print(f"vlaforget: warning: {_p}", file=sys.stderr)
    freshness.sync_all(((cfg_file(st, k), stage_cfg(st, k)) for st, k in stage_jobs()), mode=_mode,
                       out=sys.stderr)
    _placeholder_benchmarks()
    try:  # a dry-run of a GPU profile also says what the study costs (vlaforget plan; docs/benchmarks.md)
        from vlaforget.plan import dry_run_summary

        _plan = dry_run_summary(config, sys.argv, dict(os.environ), repo=workflow.basedir)
    except Exception as _e:  # the cost figure never breaks a dry-run
        _plan = f"vlaforget plan: not computed ({type(_e).__name__}: {_e})"
    if _plan:
        print(_plan, file=sys.stderr)
    # A table file not built from this data root (copied in, left by another study, or a root emptied
    # since) is never served, not even as a file target (`snakemake results/table_ablation.csv`, which
    # Snakemake would call up to date while its inputs are missing): a run moves it aside to
    # {root}/stale/<path>.stale (nothing is deleted; outside the repo, so `git status` stays clean) so it
    # is rebuilt; a dry-run says so.
    for _kind in TABLE_RUNS:
        _csv, _rec = Path(table_csv(_kind)), Path(table_record(_kind))
        _want = json.dumps(report_cfg(_kind), sort_keys=True)
        if not _csv.exists() or (_rec.exists() and _rec.read_text() == _want):
            continue
        _why = "has no record under the data root" if not _rec.exists() else "was built from other inputs"
        if _mode != "run":
            print(f"vlaforget: {_csv} {_why} ({_rec}): a run moves it under {ROOT}/stale and rebuilds it",
                  file=sys.stderr)
            continue
        from vlaforget.report.tables import move_stale
        from vlaforget.stages.table import paper_paths

        _to = [move_stale(_f, ROOT, workflow.basedir)
               for _f in (_csv, _csv.with_suffix(".md"), *paper_paths(_csv).values()) if _f.exists()]
        print(f"vlaforget: {_csv} {_why} ({_rec}): moved to {_to[0].parent}; it is rebuilt", file=sys.stderr)
