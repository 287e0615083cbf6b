"""Issue 13 item 4: the embedded studies' committed tables and figures do not sit where the real study
writes (results/table_*.csv), and a table is never 'up to date' for a data root it was not built from."""

from __future__ import annotations

import re
import shutil
import subprocess

import yaml
from conftest import REPO, copy_workflow
from test_workflow_dryrun import dry, planned

REAL_TABLES = [f"results/table_{k}.csv" for k in ("main", "fewshot", "ablation")]


def test_no_committed_table_at_the_real_study_paths():
    files = subprocess.run(
        ["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert files, "the embedded study's committed tables are gone"
    offending = [f for f in files if not f.startswith("results/embedded")]
    assert not offending, f"committed outside results/embedded*/: {offending}"
    assert "results/embedded/table_main.csv" in files


def test_profiles_write_tables_in_their_own_folder():
    real = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    demo_gpu = yaml.safe_load((REPO / "config" / "demo_gpu.yaml").read_text())
    assert real["results_dir"] == "results"
    assert demo["results_dir"] == "results/demo"  # git-ignored: a user's `make demo` leaves the tree clean
    assert "/results/demo/" in (REPO / ".gitignore").read_text().splitlines()
    assert demo_gpu["results_dir"] not in ("results", "results/embedded")


def test_real_study_with_empty_root_schedules_the_tables_despite_stale_copies(tmp_path):
    """A copy of the repo that holds tables at the real paths (e.g. the demo's, with fresh mtimes):
    with an empty data root the real profile must rebuild them, never say 'Nothing to be done'."""
    wf = copy_workflow(tmp_path / "wf")
    (wf / "results" / "figures").mkdir(parents=True)
    for f in (REPO / "results" / "embedded").glob("table_*"):
        shutil.copy(f, wf / "results" / f.name)
    for f in (REPO / "results" / "embedded" / "figures").glob("*"):
        shutil.copy(f, wf / "results" / "figures" / f.name)
    env = {"VLAFORGET_ROOT": "", "VLAFORGET_ALLOWED_ROOT": ""}  # /opt/data/private/...: empty here
    out = dry(["--profile", "profiles/4090"], wf, env)
    jobs = planned(out)
    assert "Nothing to be done" not in out
    tables = [o for o in jobs["table"] if o.startswith("results/")]
    paper = [t.replace(".csv", x) for t in REAL_TABLES for x in (".md", "_paper.md", ".tex", "_stats.csv")]
    assert sorted(tables) == sorted(REAL_TABLES + paper)
    assert jobs.get("figures")
    assert any(
        re.search(r"/reports/table_main/\w+\.json$", o) for o in jobs["table"]
    )  # what it was built from
    # one table by name: also rebuilt for an empty root (a stale file target would be "up to date")
    jobs = planned(dry(["--profile", "profiles/4090", "table_ablation"], wf, env))
    assert "results/table_ablation.csv" in jobs["table"] and "results/table_main.csv" not in jobs["table"]
    # the user's own command, a file target: Snakemake alone would call it up to date; the dry-run
    # says it was not built from this root (a real run refuses it, test below)
    out = dry(["--profile", "profiles/4090", "results/table_ablation.csv"], wf, env)
    assert "results/table_ablation.csv was not built from this root's evaluations" in out
    assert "ask for the rule target `table_ablation`" in out


def test_file_target_not_built_from_this_root_is_refused_and_nothing_is_moved(tmp_path):
    """`snakemake results/.../table_main.csv` with a table that exists but was not built from this data
    root's evaluations of this config: the run refuses (it would be served as up to date) and says to
    ask for `table_main`, which rebuilds it; parsing moves nothing (it used to move the file to
    .stale, writing into the checkout at parse time)."""
    from conftest import snakemake

    wf = copy_workflow(tmp_path / "wf")
    allowed = tmp_path / "data"
    env = {"VLAFORGET_ALLOWED_ROOT": str(allowed), "VLAFORGET_ROOT": str(allowed / "root")}
    (allowed / "root").mkdir(parents=True)
    tgt = wf / "results" / "demo" / "table_main.csv"
    tgt.parent.mkdir(parents=True, exist_ok=True)
    tgt.write_text("run,success\nold,1.0\n")
    r = snakemake(
        ["--profile", "profiles/demo", "--nolock", "results/demo/table_main.csv"],
        cwd=wf,
        env=env,
        timeout=600,
    )
    assert r.returncode != 0 and "ask for the rule target `table_main`" in r.stdout + r.stderr
    assert tgt.read_text() == "run,success\nold,1.0\n" and not list(tgt.parent.glob("*.stale"))
    out = dry(["--profile", "profiles/demo", "table_main"], wf, env)
    assert "results/demo/table_main.csv" in planned(out).get("table", [])


def test_embedded_jobs_pin_the_cpu_kernel_family(tmp_path):
    """Issue 27 item 7: every job of the embedded study (world metaworld) exports one CPU kernel family
    (ATen, MKL, oneDNN), so its numbers do not depend on whether the machine has AVX-512; the real
    study's jobs do not."""
    from test_workflow_dryrun import env_for

    wf = copy_workflow(tmp_path / "wf")
    out = dry(["--profile", "profiles/demo", "-p", "table_main"], wf, env_for(tmp_path))
    shells = [line for line in out.splitlines() if "vlaforget.cli" in line]
    assert shells, out[-2000:]
    for want in ("export ATEN_CPU_CAPABILITY=avx2", "export MKL_CBWR=AVX2", "export DNNL_MAX_CPU_ISA=AVX2"):
        assert all(want in line for line in shells), want
    real = dry(
        ["--profile", "profiles/4090", "-p", "table_main"],
        wf,
        {"VLAFORGET_ROOT": "", "VLAFORGET_ALLOWED_ROOT": ""},
    )
    assert "ATEN_CPU_CAPABILITY" not in real
