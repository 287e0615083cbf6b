"""`snakemake --lint` with the findings that do not apply silenced, each with its reason (`make lint`).

Snakemake's linter has no inline way to silence a finding (and its `--lint json` prints text in
Snakemake 9), so this runs it, reads its text report ("Lints for <what>:" then "* <title>:" items),
drops the findings listed in ALLOWED and fails on any other. Usage (the arguments go to Snakemake):
    python workflow/scripts/snakemake_lint.py --profile profiles/demo
"""

from __future__ import annotations

import re
import subprocess
import sys

# (where: regex on "snakefile <path>" / "rule <name> (line ...)", finding: regex on its title, why)
ALLOWED = [
    (
        r"^snakefile .*/common\.smk$",
        r'^Absolute path "/"',
        "the '/' of f.rsplit('/', 1) is a separator, not a path",
    ),
    (
        r"^snakefile .*/common\.smk$",
        r"^Path composition with '\+'",
        "the '+' joins a message and a TSV row (placeholder benchmarks), not paths; paths are built by the "
        "helpers of common.smk from the layout",
    ),
    (
        r"^snakefile .*/(common|vqa)\.smk$",
        r"^Mixed rules and functions",
        "common.smk holds the rules' helpers by design (rules stay thin; its comments say 'rule X'); "
        "vqa.smk's one input helper sits with the rule it switches on",
    ),
    (
        r"^rule stage_config ",
        r"^Specify a conda environment",
        "a local rule that writes its config with printf: no software to pin",
    ),
    (
        r"^rule libero_fixture ",
        r"^Param out is a prefix",
        "`out` is the fixture's folder under the data root (a shared filesystem); the layout names it",
    ),
]

_HEAD = re.compile(r"^Lints for (?P<what>.+):$")
_ITEM = re.compile(r"^    \* (?P<title>.+)$")


def findings(text: str) -> list[tuple[str, str, list[str]]]:
    """(where, title, the finding's lines) of every finding in Snakemake's text report."""
    out: list[tuple[str, str, list[str]]] = []
    where = None
    for line in text.splitlines():
        head, item = _HEAD.match(line), _ITEM.match(line)
        if head:
            where = head["what"]
        elif item and where:
            out.append((where, item["title"], [line]))
        elif where and out and out[-1][0] == where and line.startswith("      "):
            out[-1][2].append(line)
        elif not line.strip():
            continue
        else:
            where = None
    return out


def main(argv: list[str]) -> int:
    r = subprocess.run([sys.executable, "-m", "snakemake", "--lint", *argv], capture_output=True, text=True)
    text = r.stdout + r.stderr
    found = findings(text)
    if r.returncode != 0 and not found:  # it failed before linting (a parse error): show why
        print(text, file=sys.stderr)
        return r.returncode
    left, silenced = [], 0
    for where, title, lines in found:
        if any(re.search(w, where) and re.search(t, title) for w, t, _ in ALLOWED):
            silenced += 1
        else:
            left.append((where, lines))
    for where, lines in left:
        print(f"Lints for {where}:", *lines, sep="\n")
    print(f"snakemake --lint: {len(left)} finding(s), {silenced} silenced (reasons: {__file__})")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
