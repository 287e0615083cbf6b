# Data: scripted Meta-World demonstrations as RLDS (embedded world only), then the random-access
# training cache + dataset_statistics.json of every dataset (LIBERO RLDS is read from data.rlds_dir).


rule demos:
    input:
        cfg=cfg_file("demos", "{dataset}"),
    output:
        done=R(ROOT / "datasets" / "rlds" / "{dataset}" / "done.json"),
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
        unpack(cache_input),
    output:
        manifest=R(ROOT / "datasets" / "cache" / "{dataset}" / "manifest.json"),
        stats=R(ROOT / "datasets" / "cache" / "{dataset}" / "dataset_statistics.json"),
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
