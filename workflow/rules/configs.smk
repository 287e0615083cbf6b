# The config file of every stage job, at a path holding its config id: written once, never rewritten
# (a changed config is another file). The job reads it and refuses unless its content has that id.


localrules:
    stage_config,


rule stage_config:
    """The exact config of one stage job (its id is in its path)."""
    output:
        cfg=R(ROOT / "configs" / "{stage}" / "{key}" / "{cid}.yaml"),
    params:
        # a shell job, not `run:` (which would re-parse the whole workflow in a subprocess per job)
        text=stage_config_text,
    log:
        log_file("configs/{stage}", "{key}"),
    wildcard_constraints:
        key=r"[^/]+",
    shell:
        "printf '%s' {params.text:q} > {output.cfg}.tmp && mv {output.cfg}.tmp {output.cfg} "
        "&& echo 'wrote {output.cfg}' > {log}"
