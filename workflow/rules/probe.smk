# The probe set: pooled instruction hidden states of the teacher on N_probe samples never trained on.


rule probe:
    input:
        unpack(stage_input("probe")),
    output:
        probe=probe_file("{cid}"),
        audit=probe_audit("{cid}"),
    params:
        non_semantic=non_semantic("probe"),
    log:
        log_file("probe", PROBE_SET),
    benchmark:
        bench_file("probe", PROBE_SET)
    threads: 1
    resources:
        gpu=gpus("probe"),
        mem_mb=16000,
    conda:
        CONDA_ENV
    shell:
        stage_shell("probe", gpu_kind="probe")
