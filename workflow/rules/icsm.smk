# Teacher-only artifacts, computed once per (base model, probe set / dataset) and shared by every run:
# ICSM bases (SVD + sensitivity -> fragile / plastic directions, mu, C_T) and CRaFT anchor features.


rule icsm:
    input:
        cfg=cfg_file("icsm", PROBE_SET),
        model=model_done(),
        probe=probe_file(),
    output:
        meta=icsm_meta(),
    log:
        log_file("icsm", PROBE_SET),
    threads: 1
    resources:
        gpu=gpus("probe"),
        mem_mb=16000,
    conda:
        CONDA_ENV
    shell:
        stage_shell("icsm", gpu_kind="probe")


rule craft_anchors:
    input:
        cfg=cfg_file("craft_anchors", "{dataset}"),
        model=model_done(),
        cache=R(ROOT / "datasets" / "cache" / "{dataset}" / "manifest.json"),
    output:
        anchors=R(ROOT / "artifacts" / f"craft_{BASE}" / "{dataset}" / "anchors.pt"),
    log:
        log_file("craft_anchors", "{dataset}"),
    threads: 1
    resources:
        gpu=gpus("probe"),
        mem_mb=16000,
    conda:
        CONDA_ENV
    shell:
        stage_shell("craft-anchors", gpu_kind="probe")
