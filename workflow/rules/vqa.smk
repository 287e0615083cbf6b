# The LIBERO-simulator visual-question set (data/libero_vqa.py): generated once under the data root
# when eval.forgetting.libero_vqa is set (and no vqa_jsonl of the user's own); every forgetting job
# scores its questions (eval/vqa_mc.py). docs/evaluation.md "General visual-language skill".

LIBERO_VQA = vsc.libero_vqa_params(config)  # None: not generated here
LIBERO_VQA_ON = LIBERO_VQA is not None


def libero_vqa_input():
    return {"vqa": libero_vqa_manifest()} if LIBERO_VQA_ON else {}


if LIBERO_VQA_ON:

    rule libero_vqa:
        output:
            manifest=libero_vqa_manifest(),  # written last; its folder is named by LIBERO_VQA's hash
        params:
            out=R(vsc.libero_vqa_dir(config)),
            suites=" ".join(LIBERO_VQA["suites"]),
            n=LIBERO_VQA["n"],
            seed=LIBERO_VQA["seed"],
            states=LIBERO_VQA["states_per_task"],
            tasks=(f"--tasks-per-suite {LIBERO_VQA['tasks_per_suite']}" if LIBERO_VQA["tasks_per_suite"] else ""),
            cfgdir=f"--config-dir {LIBERO_VQA['config_path']}" if LIBERO_VQA["config_path"] else "",
        log:
            log_file("libero_vqa", "libero_vqa", vsc.libero_vqa_dir(config).name),
        threads: 1
        resources:
            gpu=0,
            mem_mb=8000,
        conda:
            CONDA_ENV
        shell:
            f"{JOB_ENV}; {VLAFORGET} libero-vqa --out {{params.out}} --suites {{params.suites}} "
            "--n {params.n} --seed {params.seed} --states-per-task {params.states} {params.tasks} {params.cfgdir} > {log} 2>&1"
