"""The workflow DAG: profiles dry-run on a fresh clone (no GPU, model or data), tables need only their
runs, config errors name the key, and a config change reruns exactly the stages whose config changed."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO, copy_workflow, snakemake

CI = ["--profile", "profiles/ci"]
CI_CONFIGS = ["config/demo.yaml", "config/ci.yaml"]


def env_for(base):
    return {"VLAFORGET_ROOT": str(base / "data" / "root"), "VLAFORGET_ALLOWED_ROOT": str(base / "data")}


def planned(out: str) -> dict[str, list[str]]:
    """rule -> outputs of the jobs a dry-run plans (from `snakemake -n` text)."""
    jobs: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not m:
            continue
        o = re.search(r"^\s+output: (.*)$", block, re.MULTILINE)
        rule = "table" if re.fullmatch(r"table_\w+_build", m.group(1)) else m.group(1)  # one rule per table
        jobs.setdefault(rule, []).extend(o.group(1).split(", ") if o else [])
    return jobs


def trained_runs(out: str) -> set[str]:
    return {re.search(r"/runs/([^/]+)/[0-9a-f]{12}/final", p).group(1) for p in planned(out).get("train", [])}


def dry(args, cwd, env):
    r = snakemake(["-n", "--nolock", *args], cwd=cwd, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.mark.parametrize("profile", ["demo"])  # ci: the `touched` fixture below
def test_dryrun_embedded_profiles(tmp_path, profile):
    wf = copy_workflow(tmp_path / "wf")
    out = dry(["--profile", f"profiles/{profile}"], wf, env_for(tmp_path))
    jobs = planned(out)
    for rule in (
        "demos",
        "cache",
        "model",
        "probe",
        "icsm",
        "craft_anchors",
        "train",
        "eval",
        "forgetting",
        "table",
        "figures",
        "stage_config",
    ):
        assert jobs.get(rule), f"rule {rule} not in the {profile} DAG"
    # every data output lives under the data root
    for rule, outs in jobs.items():
        if rule not in ("table", "figures", "all"):
            assert all(o.startswith(str(tmp_path / "data" / "root")) for o in outs), (rule, outs)
    assert not (wf / "results" / "table_main.csv").exists()


@pytest.mark.parametrize("profile", ["4090"])  # v100x8: test_v100_ddp_overlay_uses_torchrun
def test_dryrun_real_profiles_on_fresh_clone(tmp_path, profile):
    # The real config's paths are under /opt/data/private; a dry-run writes nothing there.
    wf = copy_workflow(tmp_path / "wf")
    env = {"VLAFORGET_ROOT": "", "VLAFORGET_ALLOWED_ROOT": ""}
    out = dry(["--profile", f"profiles/{profile}"], wf, env)
    jobs = planned(out)
    assert "demos" not in jobs  # LIBERO RLDS comes from data.rlds_dir
    runs = trained_runs(out)
    assert "libero_10_no_noops__craft__full__s456" in runs
    assert "libero_spatial_no_noops__baseline__5shot__s42" in runs
    assert "libero_spatial_no_noops__no_sensitivity__full__s123" in runs


def test_v100_ddp_overlay_uses_torchrun(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    env = {"VLAFORGET_ROOT": "", "VLAFORGET_ALLOWED_ROOT": ""}
    out = dry(
        [
            "--profile",
            "profiles/v100x8",
            "-p",
            "--configfiles",
            "config/profile_v100x8.yaml",
            "config/profile_v100x8_ddp.yaml",
        ],
        wf,
        env,
    )
    assert re.search(
        r"-m vlaforget\.cli gpu-run --gpus 4 -- \S+ -m torch\.distributed\.run --standalone "
        r"--nproc-per-node 4 -m vlaforget\.cli train --config \S+/configs/train/",
        out,
    )


def test_console_is_one_short_line_per_job_naming_its_log(tmp_path):
    """profiles/ci's dry-run prints each job as one line (its rule and its log file, whose path names
    the stage and the key; workflow/rules/console.smk), no shell line and no block per job; `-p`
    brings the shell lines back."""
    wf = copy_workflow(tmp_path / "wf")
    root = tmp_path / "data" / "root"
    out = dry(CI, wf, {**env_for(tmp_path), "VLAFORGET_CONSOLE": ""})
    jobs = re.findall(r"^Job \d+: (.*)$", out, re.MULTILINE)
    total = int(re.search(r"^total\s+(\d+)$", out, re.MULTILINE).group(1))
    assert len(jobs) == total > 50
    assert not re.search(r"^(?:local)?rule \w+:", out, re.MULTILINE)  # no block per job
    assert "vlaforget.cli" not in out and "export HF_HOME" not in out  # no shell lines
    # at most 200 characters with the real study's root (/opt/data/private/vlaforget) in place of tmp's
    assert max(len(j.replace(str(root), "/opt/data/private/vlaforget")) for j in jobs) <= 200 - len(
        "Job 99: "
    )
    run = "mw_downstream__baseline__full__s42"
    # logs and stage configs sit at paths holding the job's config id (issue 29): {stage}/{key}/{id}.log
    for want in (
        rf"train: {root}/logs/train/{run}/[0-9a-f]+\.log",
        rf"eval: {root}/logs/eval/{run}@mw_upstream/[0-9a-f]+\.log",
        rf"stage_config: {root}/logs/configs/train/{run}(/[0-9a-f]+)?\.log",
        rf"table_main_build: {root}/logs/report/table_main\.log",
    ):
        assert any(re.fullmatch(want, j) for j in jobs), (want, [j for j in jobs if run in j][:6])
    assert "all" in jobs
    assert all(re.fullmatch(r"\w+: \S+\.log", j) for j in jobs if j != "all")
    shells = dry([*CI, "-p"], wf, {**env_for(tmp_path), "VLAFORGET_CONSOLE": ""})
    assert re.search(rf"vlaforget.cli train --config {root}/configs/train/{run}/[0-9a-f]+\.yaml", shells)


def test_a_failed_job_shows_the_tail_of_its_log(tmp_path):
    """A failing job: the console ends with the last lines of its log (not all of it: the log names
    the rest)."""
    (tmp_path / "console.smk").write_text((REPO / "workflow" / "rules" / "console.smk").read_text())
    (tmp_path / "Snakefile").write_text(
        'rule boom:\n    output: "out/{x}.txt"\n    log: "logs/{x}.log"\n'
        '    shell: "for i in $(seq 1 100); do echo line$i; done > {log}; exit 3"\n\n\n'
        'include: "console.smk"\n'
    )
    r = snakemake(["-c1", "--nolock", "out/a.txt"], cwd=tmp_path, env={"VLAFORGET_CONSOLE": ""})
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Job 0: boom: logs/a.log" in out
    assert "---- last 25 lines of logs/a.log ----" in out
    assert "line100" in out and "line76" in out and "line75" not in out


def test_config_error_names_key_fast(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    (wf / "config" / "typo.yaml").write_text("train:\n  max_stpes: 10\n")
    r = snakemake(
        ["-n", "--nolock", *CI, "--configfiles", *CI_CONFIGS, "config/typo.yaml"],
        cwd=wf,
        env=env_for(tmp_path),
    )
    assert r.returncode != 0
    assert "train.max_stpes" in r.stdout + r.stderr


def test_root_outside_allowed_root_is_refused(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    env = {"VLAFORGET_ROOT": str(tmp_path / "elsewhere"), "VLAFORGET_ALLOWED_ROOT": str(tmp_path / "data")}
    r = snakemake(["-n", "--nolock", *CI], cwd=wf, env=env)
    assert r.returncode != 0
    assert "outside the allowed root" in r.stdout + r.stderr


def test_ablation_table_needs_only_its_runs(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    out = dry([*CI, "table_ablation"], wf, env_for(tmp_path))
    runs = trained_runs(out)
    assert runs == {
        "mw_downstream__icsm_hsw_thermostat__full__s42",
        "mw_downstream__craft__full__s42",
        "mw_downstream__no_thermostat__full__s42",
        "mw_downstream__craft_no_projection__full__s42",
    }
    jobs = planned(out)
    # csv + md + paper md + tex + stats csv + record of this table only
    assert "figures" not in jobs and len(jobs["table"]) == 6


# ----------------------------------------------------------------------------- rerun triggers


@pytest.fixture(scope="module")
def touched(tmp_path_factory):
    """The CI study with every output present and recorded (snakemake --touch), nothing to do."""
    base = tmp_path_factory.mktemp("touched")
    wf = copy_workflow(base / "wf")
    env = env_for(base)
    r = snakemake([*CI, "--summary"], cwd=wf, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in r.stdout.splitlines()[1:]:
        path = line.split("\t")[0]
        p = (wf / path) if not path.startswith("/") else __import__("pathlib").Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    # (retried: a library file edited meanwhile changes a stage's code hash, rightly rerunning it)
    for _ in range(3):
        r = snakemake([*CI, "--touch", "--forceall"], cwd=wf, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        out = dry(CI, wf, env)
        if "Nothing to be done" in out:
            break
    assert "Nothing to be done" in out, out[-3000:]
    return wf, env


def _dry_with(touched, overlay: dict) -> str:
    wf, env = touched
    (wf / "config" / "change.yaml").write_text(yaml.safe_dump(overlay))
    return dry([*CI, "--configfiles", *CI_CONFIGS, "config/change.yaml"], wf, env)


def test_method_param_change_reruns_only_that_method(touched):
    out = _dry_with(touched, {"methods": {"craft": {"craft": {"epsilon": 0.2}}}})
    runs = trained_runs(out)
    # craft and the ablation built on it; nothing else
    assert runs == {
        "mw_downstream__craft__full__s42",
        "mw_downstream__craft__1shot__s42",
        "mw_downstream__craft_no_projection__full__s42",
    }
    jobs = planned(out)
    for rule in ("demos", "cache", "model", "probe", "icsm", "craft_anchors"):
        assert rule not in jobs, rule
    assert all("craft" in p for p in jobs["eval"] + jobs["forgetting"])
    assert (
        len(jobs["table"]) == 18
    )  # the three tables each hold craft runs (csv, md, paper md, tex, stats, record)


def test_probe_change_reruns_probe_chain_not_baseline_training(touched):
    out = _dry_with(touched, {"probe": {"n": 20}})
    jobs = planned(out)
    assert jobs.get("probe") and jobs.get("icsm")
    runs = trained_runs(out)
    assert runs == {
        "mw_downstream__icsm_hsw_thermostat__full__s42",
        "mw_downstream__icsm_hsw_thermostat__1shot__s42",
        "mw_downstream__no_thermostat__full__s42",
    }
    assert not any("baseline" in r or "craft" in r for r in runs)
    assert "craft_anchors" not in jobs and "model" not in jobs
    # closed-loop evals of untouched runs stay; forgetting (drift vs ICSM basis) is recomputed for all
    assert not any("baseline" in p for p in jobs.get("eval", []))
    assert any("baseline" in p for p in jobs.get("forgetting", []))
    assert jobs.get("table")


def test_icsm_r_change_reruns_icsm_and_downstream_not_probe(touched):
    out = _dry_with(touched, {"icsm": {"r": 3}})
    jobs = planned(out)
    assert jobs.get("icsm") and "probe" not in jobs
    for rule in ("demos", "cache", "model", "craft_anchors"):
        assert rule not in jobs, rule
    runs = trained_runs(out)
    assert runs and all("thermostat" in r for r in runs)  # only the ICSM-based method runs
    assert jobs.get("table")


def test_unchanged_config_reruns_nothing(touched):
    out = _dry_with(touched, {})
    assert "Nothing to be done" in out


def test_report_rule_wrappers_present():
    text = (REPO / "workflow" / "rules" / "report.smk").read_text()
    assert text.count("report(") >= 2


def test_library_code_is_tracked_for_every_stage_and_the_report(tmp_path, monkeypatch):
    """Snakemake's code trigger sees only rule bodies: each stage's config (and the table/figure
    rules' `code` param) carries a hash of the library files its entry module imports, so editing
    one reruns it (tests/test_invalidation.py: how the files are found)."""
    import shutil

    from vlaforget import codedeps

    pkg = tmp_path / "vlaforget"
    shutil.copytree(codedeps.PKG_DIR, pkg)
    monkeypatch.setattr(codedeps, "PKG_DIR", pkg)
    before = {s: codedeps.code_hash(s) for s in codedeps.STAGES_WITH_CODE}
    (pkg / "report" / "figures.py").write_text((pkg / "report" / "figures.py").read_text() + "\n_EDIT = 1\n")
    after = {s: codedeps.code_hash(s) for s in codedeps.STAGES_WITH_CODE}
    assert {s for s in before if before[s] != after[s]} == {"figures"}
    text = (REPO / "workflow" / "rules" / "common.smk").read_text()  # in the record's id (report_cfg)
    assert '"code": code_hash("figures" if key == "figures" else "table")' in text


# ----------------------------------------------------------------------------- exact invalidation (15.3)


def _edited(touched, rel: str, old: str, new: str):
    """A context: the workflow copy's library file `rel` with one edit, put back afterwards."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        f = touched[0] / "src" / "vlaforget" / rel
        text = f.read_text()
        assert old in text, (rel, old)
        f.write_text(text.replace(old, new, 1))
        try:
            yield
        finally:
            f.write_text(text)

    return cm()


def test_plugin_code_edit_reruns_only_the_runs_that_enable_it(touched):
    with _edited(
        touched,
        "train/plugins/hsw.py",
        "\nclass HSWPlugin(Plugin):",
        "\n_EDIT = 1\n\n\nclass HSWPlugin(Plugin):",
    ):
        out = _dry_with(touched, {})
    runs = trained_runs(out)
    assert runs == {
        "mw_downstream__icsm_hsw_thermostat__full__s42",
        "mw_downstream__icsm_hsw_thermostat__1shot__s42",
        "mw_downstream__no_thermostat__full__s42",
    }
    jobs = planned(out)
    for rule in ("demos", "cache", "model", "probe", "icsm", "craft_anchors"):
        assert rule not in jobs, rule


def test_comment_and_docstring_edits_rerun_nothing(touched):
    with (
        _edited(
            touched, "train/loop.py", "\ndef make_schedule(", "\n# an edited comment\n\ndef make_schedule("
        ),
        _edited(touched, "models/tiny.py", '"""', '"""An edited docstring. '),
        _edited(touched, "data/cache.py", "\n", "\n# another comment\n"),
    ):
        out = _dry_with(touched, {})
    assert "Nothing to be done" in out, out[-3000:]


def test_non_semantic_keys_rerun_nothing(touched):
    out = _dry_with(
        touched,
        {
            "train": {
                "log_every": 3,
                "save_steps": 7,
                "num_workers": 1,
                "use_wandb": True,
                "eval_every": 5,
                "eval_episodes_per_task": 2,
            },
            "data": {"metaworld": {"workers": 3}},
        },
    )
    assert "Nothing to be done" in out, out[-3000:]


def test_raised_max_steps_reruns_training_and_the_dry_run_says_why(touched):
    out = _dry_with(touched, {"train": {"max_steps": 999}})
    jobs = planned(out)
    assert trained_runs(out) and "model" not in jobs and "cache" not in jobs
    assert any("baseline" in p for p in jobs["eval"])  # what reads the runs follows them


def test_upstream_libero_preset_plans_upstream_evals_and_the_question_set(tmp_path):
    """config/upstream_libero.yaml: the LIBERO-Spatial checkpoint fine-tuned on LIBERO-Object; the
    teacher and every run are evaluated on LIBERO-Spatial; the simulator question set is built once
    and every forgetting job depends on it."""
    wf = copy_workflow(tmp_path / "wf")
    env = {"VLAFORGET_ROOT": "", "VLAFORGET_ALLOWED_ROOT": ""}
    out = dry(
        [
            "--profile",
            "profiles/4090",
            "--configfiles",
            "config/profile_4090.yaml",
            "config/upstream_libero.yaml",
        ],
        wf,
        env,
    )
    jobs = planned(out)
    assert len(jobs["libero_vqa"]) == 1 and re.search(
        r"/vqa/libero/\w+/manifest.json$", jobs["libero_vqa"][0]
    )
    evals = jobs["eval"]
    assert any(re.search(r"/evals/teacher/libero_spatial_no_noops/\w{12}.json", e) for e in evals)
    assert any(
        re.search(
            r"/evals/libero_object_no_noops__baseline__full__s42/libero_spatial_no_noops/\w{12}.json", e
        )
        for e in evals
    )
    assert {r.split("__")[0] for r in trained_runs(out)} == {"libero_object_no_noops"}
