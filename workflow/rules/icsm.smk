# Teacher-only artifacts, computed once per (base model, probe set / dataset) and shared by every run:
# ICSM bases (SVD + sensitivity -> fragile / plastic directions, mu, C_T) and CRaFT anchor features.


rule icsm:
    input:
        unpack(stage_input("icsm")),
    output:
        meta=icsm_meta("{cid}"),
    params:
        non_semantic=non_semantic("icsm"),
    log:
        log_file("icsm", PROBE_SET),
    benchmark:
        bench_file("icsm", PROBE_SET)
    threads: 1
    resources:
        gpu=gpus("probe"),
        mem_mb=16000,
    conda:
        CONDA_ENV
    shell:
        stage_shell("icsm", gpu_kind="probe")


rule craft_anchors:
    """{aset} = a suite (its train split) or {suite}__{n}shot__s{seed} (a few-shot run's subset)."""
    input:
        unpack(stage_input("craft_anchors")),
    output:
        anchors=anchors_file("{aset}", "{cid}"),
    params:
        non_semantic=non_semantic("craft_anchors"),
    log:
        log_file("craft_anchors", "{aset}"),
    benchmark:
        bench_file("craft_anchors", "{aset}")
    wildcard_constraints:
        aset=rf"{NAME}(?:__\d+shot__s\d+)?",
    threads: 1
    resources:
        gpu=gpus("probe"),
        mem_mb=16000,
    conda:
        CONDA_ENV
    shell:
        stage_shell("craft-anchors", gpu_kind="probe")
