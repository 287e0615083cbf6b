# Evaluation of a run (or the teacher): closed-loop success per suite, and the forgetting metrics
# (general visual-question skill, representation drift, CKA vs the teacher).


# {suite}.json and forgetting.json share a folder; a suite cannot be called "forgetting".
ruleorder: forgetting > eval


rule eval:
    input:
        unpack(stage_input("eval")),
    output:
        result=eval_file("{run}", "{suite}", "{cid}"),
    wildcard_constraints:
        suite=rf"(?!forgetting/){NAME}",
    params:
        non_semantic=non_semantic("eval"),
    log:
        log_file("eval", "{run}@{suite}"),
    benchmark:
        bench_file("eval", "{run}@{suite}")
    threads: int(RES.get("eval_threads", 2))
    resources:
        gpu=gpus("eval"),
        mem_mb=int(RES.get("mem_mb_eval", 16000)),
    conda:
        CONDA_ENV
    shell:
        stage_shell("eval", gpu_kind="eval")


rule forgetting:
    input:
        unpack(stage_input("forgetting")),
    output:
        result=forgetting_file("{run}", "{cid}"),
    params:
        non_semantic=non_semantic("forgetting"),
    log:
        log_file("forgetting", "{run}"),
    benchmark:
        bench_file("forgetting", "{run}")
    threads: 1
    resources:
        gpu=gpus("eval"),
        mem_mb=int(RES.get("mem_mb_eval", 16000)),
    conda:
        CONDA_ENV
    shell:
        stage_shell("forgetting", gpu_kind="eval")
