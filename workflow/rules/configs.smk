# The config file of every stage job. Its config id is a params value, so Snakemake's params trigger
# rewrites exactly the files whose id changed; their new mtime reruns exactly the jobs reading them.
# Library edits reach the same files through the `code` hash each stage config carries.

localrules:
    stage_config,


rule stage_config:
    """The exact config of one stage job; its params trigger reruns only of what changed."""
    output:
        cfg=cfg_file("{stage}", "{key}"),
    params:
        # the trigger: the config id (non-semantic keys left out: config.NON_SEMANTIC; parse-time
        # sync brings their values into the file without a rerun)
        id=lambda w: vfc.config_id_of(stage_cfg(w.stage, w.key)),
        # a shell job, not `run:` (which would re-parse the whole workflow in a subprocess per job);
        # taking `output` makes it a derived param, which the params trigger does not compare
        text=lambda w, output: yaml.safe_dump(stage_cfg(w.stage, w.key), sort_keys=True),
    log:
        log_file("configs/{stage}", "{key}"),
    wildcard_constraints:
        key=r"[^/]+",
    shell:
        "printf '%s' {params.text:q} > {output.cfg}.tmp && mv {output.cfg}.tmp {output.cfg} "
        "&& echo 'wrote {output.cfg}' > {log}"
