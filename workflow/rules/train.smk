# One training loop for every run {suite}__{method}__{shots}__s{seed}; methods and ablations plug in by
# config. Only final/done.json is declared: resumable checkpoints live undeclared under the run dir, so
# a rerun (or a killed run restarted) continues from the last checkpoint instead of being deleted.


rule train:
    input:
        unpack(stage_input("train")),
    output:
        # update(): a failing rerun keeps (restores) the previous done.json instead of deleting it
        done=update(train_done("{trun}", "{cid}")),
    params:
        non_semantic=non_semantic("train"),
    log:
        log_file("train", "{trun}"),
    benchmark:
        bench_file("train", "{trun}")
    threads: int(RES.get("train_threads", 2))
    resources:
        gpu=gpus("train"),
        mem_mb=int(RES.get("mem_mb_train", 16000)),
    conda:
        CONDA_ENV
    shell:
        stage_shell("train", gpu_kind="train", launcher=train_launcher())
