# The probe set: pooled instruction hidden states of the teacher on N_probe samples never trained on.


rule probe:
    input:
        cfg=cfg_file("probe", PROBE_SET),
        model=model_done(),
        cache=cache_outputs(config["probe"]["dataset"])["manifest"],
    output:
        probe=probe_file(),
        audit=probe_audit(),
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
