# What a run gives besides its PEFT adapter: one merged HF checkpoint (base + adapter, processor,
# remote code, the suite's statistics under its unnorm key) that openvla's own get_vla /
# predict_action / run_libero_eval.py load unchanged. Not in `rule all` (a 7B export is ~15 GB):
# ask for `snakemake exports` (every run of the study) or one {root}/exports/{run}.


rule export:
    input:
        done=lambda w: train_done(w.trun, this_config("train", w.trun, w.cid)),
    output:
        ckpt=directory(export_dir("{trun}", "{cid}")),
    params:
        run_dir=lambda w: out("train", w.trun, w.cid),
        code=code_hash("export"),
    log:
        log_file("export", "{trun}"),
    threads: 2
    resources:
        # the merge holds the whole model in host memory, as training does
        mem_mb=int(RES.get("mem_mb_train", 16000)),
    conda:
        CONDA_ENV
    shell:
        f"{JOB_ENV}; export OMP_NUM_THREADS={{threads}}; "
        f"{VLAFORGET} export --run-dir {{params.run_dir}} --out {{output.ckpt}} > {{log}} 2>&1"


rule exports:
    input:
        [export_dir(r) for r in all_runs()],
