"""Shell lines of the workflow's jobs: which Python runs them, and what a crashed job tells the user.

The rules (workflow/rules/common.smk) build every job's command with these functions, so the tests
can run the same lines outside Snakemake.

* `job_python(cfg, repo)`: the interpreter every rule's command runs with. Config key `job_python`
  (a path, relative to the repository, or an absolute path; e.g. `.venv-real/bin/python` made by
  `make real-env`, or `~/miniconda3/envs/openvla/bin/python`); null = the Python running Snakemake.
* `crash_guard(cmd, ...)`: runs `cmd`; when it dies of a signal (exit status > 128: 139 = SIGSEGV,
  137 = SIGKILL, 134 = SIGABRT) it appends a message to the job's log and stderr naming the log,
  the signal and what to try, then exits with the same status. Plain bash: the message must come
  even when Python itself is what crashed.
"""

from __future__ import annotations

import os
from pathlib import Path


class JobPythonError(ValueError):
    """The configured job interpreter is missing; the message names the command that makes it."""


def job_python(cfg: dict, repo: str | Path, default: str) -> str:
    """Absolute path of the jobs' Python (config `job_python`), or `default` when unset."""
    p = cfg.get("job_python")
    if not p:
        return default
    path = Path(os.path.expanduser(str(p)))
    if not path.is_absolute():
        path = Path(repo) / path
    return str(path)


def check_job_python(path: str) -> None:
    if not os.access(path, os.X_OK):
        raise JobPythonError(
            f"job_python = {path} does not exist or is not executable. The real study's jobs run in "
            "their own environment: create it with `make real-env` (it writes .venv-real/), or point "
            "job_python at your own env's interpreter, e.g. `job_python: ~/miniconda3/envs/openvla/bin/python` "
            "(`conda activate openvla && which python`); null = the Python running Snakemake"
        )


# No backticks, double quotes, $ or braces: the text sits inside a double-quoted bash echo.
# (Kept short: Snakemake prints every job's shell line.) docs/troubleshooting.md has the long form.
CRASH_TRIES = (
    "139 SIGSEGV: TensorFlow next to triton? jobs export USE_TF=0, test python -c 'import tensorflow, timm'; "
    "137 SIGKILL: out of memory, lower batch / eval.num_envs or raise mem_mb; the Python stack "
    "(PYTHONFAULTHANDLER) ends the log; docs/troubleshooting.md. Rerun by hand: "
)


def crash_guard(cmd: str, log: str, stage: str, rerun: str, then: str = "") -> str:
    """`cmd`, plus a message naming the log and what to try if it is killed by a signal; `then`: a
    command run after `cmd` succeeds (exit 0), before the line exits with cmd's status.

    Usable as a Snakemake shell template: it adds no braces of its own, so `cmd`, `log`, `rerun` and
    `then` may hold placeholders such as {log} or {input.cfg}."""
    hint = (
        f'echo "vlaforget: the {stage} job was killed by signal $((rc - 128)) '
        f"($(kill -l $((rc - 128)) 2>/dev/null || echo ?), exit $rc), a crash below Python, not a "
        f'Python error. Log: {log} . {CRASH_TRIES}{rerun}"'
    )
    after = f"[ $rc -ne 0 ] || {then}; " if then else ""
    return f"rc=0; {cmd} || rc=$?; if [ $rc -gt 128 ]; then {hint} | tee -a {log} >&2; fi; {after}exit $rc"
