# Evaluation of a run (or the teacher): closed-loop success per suite, and the forgetting metrics
# (general visual-question skill, representation drift, CKA vs the teacher).


def eval_input(w):
    inp = {"cfg": cfg_file("eval", f"{w.run}@{w.suite}"), "model": model_done(),
           "stats": cache_outputs(w.suite)["stats"]}
    if w.run != "teacher":
        inp["train"] = train_done(w.run)
    return inp


# {suite}.json and forgetting.json share a folder; a suite cannot be called "forgetting".
ruleorder: forgetting > eval


rule eval:
    input:
        unpack(eval_input),
    output:
        result=R(ROOT / "evals" / "{run}" / "{suite}.json"),
    log:
        log_file("eval", "{run}@{suite}"),
    threads: 2
    resources:
        gpu=gpus("eval"),
        mem_mb=16000,
    shell:
        stage_shell("eval", gpu_kind="eval")


def forgetting_input(w):
    inp = {"cfg": cfg_file("forgetting", w.run), "model": model_done(), "probe": probe_file(),
           "icsm": icsm_meta()}
    if w.run != "teacher":
        inp["train"] = train_done(w.run)
    if METAWORLD:
        inp["caches"] = [cache_outputs(s)["manifest"] for s in UPSTREAM_SUITES]
    return inp


rule forgetting:
    input:
        unpack(forgetting_input),
    output:
        result=R(ROOT / "evals" / "{run}" / "forgetting.json"),
    log:
        log_file("forgetting", "{run}"),
    threads: 1
    resources:
        gpu=gpus("eval"),
        mem_mb=16000,
    shell:
        stage_shell("forgetting", gpu_kind="eval")
