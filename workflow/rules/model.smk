# The teacher: the tiny backend is built and pretrained here on the upstream datasets (+ a visual-question
# skill); the OpenVLA backend is only checked (loads offline from model.path, shapes as expected).


rule model:
    input:
        unpack(stage_input("model")),
    output:
        done=model_done("{cid}"),
    params:
        non_semantic=non_semantic("model"),
    log:
        log_file("model", BASE),
    benchmark:
        bench_file("model", BASE)
    threads: (config["model"].get("pretrain") or {}).get("threads", 1)
    resources:
        gpu=gpus("probe"),
        mem_mb=16000,
    conda:
        CONDA_ENV
    shell:
        stage_shell("model", gpu_kind="probe")
