# The config file of every stage job. Its content is a params value, so Snakemake's params trigger
# rewrites exactly the files whose content changed; their new mtime reruns exactly the jobs reading them.
# Library edits reach the same files through the `code` hash each stage config carries.

localrules:
    stage_config,


rule stage_config:
    """The exact config of one stage job; its params trigger reruns only of what changed."""
    output:
        cfg=cfg_file("{stage}", "{key}"),
    params:
        # a shell job, not `run:` (which would re-parse the whole workflow in a subprocess per job)
        text=lambda w: yaml.safe_dump(stage_cfg(w.stage, w.key), sort_keys=True),
    log:
        log_file("configs/{stage}", "{key}"),
    wildcard_constraints:
        key=r"[^/]+",
    shell:
        "printf '%s' {params.text:q} > {output.cfg}.tmp && mv {output.cfg}.tmp {output.cfg} "
        "&& echo 'wrote {output.cfg}' > {log}"
