# What a person sees on the console: one line per job (rule, key, log file) and Snakemake's progress,
# not its block per job and the ~1,500-character shell line of every job (the profiles turn
# printshellcmds off; `snakemake -p ...` prints the shell lines again). When a job fails, the last
# lines of its log follow Snakemake's error (the whole log is the file it names).
# VLAFORGET_CONSOLE=blocks keeps Snakemake's block per job (input, output, log, wildcards, resources).

import os
import sys
from pathlib import Path

CONSOLE_LOG_TAIL = 25  # lines of a failed job's log shown on the console


def console_message(rule):
    """The `message` given where none is set (Snakemake then prints it instead of its block), per rule:
    the rule's name and its log file, whose path names the stage and the key (logs/<stage>/<key>.log;
    the key once, so a line stays short); without a log, the name and the wildcards' values."""
    if len(rule.log):
        return "{rule}: {log}"
    return " ".join(["{rule}", *(f"{{wildcards.{n}}}" for n in sorted(rule.wildcard_names))])


def failed_log_tails(snakemake_logs, n=CONSOLE_LOG_TAIL, out=sys.stderr):
    """The last n lines of the log of every job Snakemake's own log reports as failed ("log: <file>
    (check log file(s) for error details)")."""
    import re

    pattern = re.compile(r"^\s*log: (.+?) \(check log file\(s\) for error details\)\s*$")
    seen = []
    for f in snakemake_logs or []:
        try:
            lines = Path(str(f)).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = pattern.match(line)
            if m:
                seen += [p for p in m.group(1).split(", ") if p not in seen]
    for p in seen:
        try:
            tail = Path(p).read_text(errors="replace").splitlines()[-n:]
        except OSError:
            continue
        print(f"\n---- last {len(tail)} lines of {p} ----", *tail, f"---- end of {p} ----", sep="\n", file=out)


if os.environ.get("VLAFORGET_CONSOLE", "lines") != "blocks":
    for _r in workflow.rules:  # (not `_rule`: Snakemake's --lint would take that for a rule)
        if not _r.message:
            _r.message = console_message(_r)


onerror:
    failed_log_tails(log)
