# Data: scripted Meta-World demonstrations as RLDS (embedded world only), then the random-access
# training cache + dataset_statistics.json of every dataset (LIBERO RLDS is read from data.rlds_dir).


rule demos:
    input:
        unpack(stage_input("demos")),
    output:
        done=demos_done("{dataset}", "{cid}"),
    params:
        non_semantic=non_semantic("demos"),
    log:
        log_file("demos", "{dataset}"),
    threads: (config["data"].get("metaworld") or {}).get("workers", 1)
    resources:
        gpu=0,
        mem_mb=4000,
    conda:
        CONDA_ENV
    shell:
        stage_shell("demos")


rule cache:
    input:
        unpack(stage_input("cache")),
    output:
        **cache_outputs("{dataset}", "{cid}"),
    params:
        non_semantic=non_semantic("cache"),
    log:
        log_file("cache", "{dataset}"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        stage_shell("cache")


rule libero_fixture:
    """World libero with data.fixture (the rehearsal): a LIBERO-format RLDS fixture in openvla's
    modified_libero_rlds layout (TFDS builder dirs {dataset}/1.0.0/, synthetic episodes) for every
    suite, read by the cache stage exactly as the real data would be."""
    output:
        done=fixture_done(),
    params:
        out=R(FIXTURE_DIR),  # named by what it is made from (stageconfig.fixture_params)
        suites=" ".join(fixture_datasets()) if FIXTURE else "",
        fx=vsc.fixture_params(config) if FIXTURE else {},
    log:
        log_file("libero_fixture", "fixture", FIXTURE_DIR.name),
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
    conda:
        CONDA_ENV
    shell:
        f"{JOB_ENV}; "
        + crash_guard(
            f"{VLAFORGET} libero-fixture --out {{params.out}} --suites {{params.suites}} "
            "--tasks {params.fx[tasks]} --episodes {params.fx[episodes]} --steps {params.fx[steps]} "
            "--seed {params.fx[seed]} --shards {params.fx[shards]} --source {params.fx[source]} > {log} 2>&1",
            "{log}", "libero-fixture", f"{VLAFORGET} libero-fixture ...",
        )
