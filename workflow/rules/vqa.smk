# The LIBERO-simulator visual-question set (data/libero_vqa.py): generated once under the data root
# when eval.forgetting.libero_vqa is set (and no vqa_jsonl of the user's own); every forgetting job
# scores its questions (eval/vqa_mc.py). docs/evaluation.md "General visual-language skill".

LIBERO_VQA = (config["eval"].get("forgetting") or {}).get("libero_vqa") or None
LIBERO_VQA_ON = bool(LIBERO_VQA) and not (config["eval"].get("forgetting") or {}).get("vqa_jsonl")


def libero_vqa_input():
    return {"vqa": libero_vqa_manifest()} if LIBERO_VQA_ON else {}


if LIBERO_VQA_ON:

    rule libero_vqa:
        output:
            manifest=libero_vqa_manifest(),  # written last
        params:
            out=R(LAYOUT.libero_vqa()),
            suites=" ".join(LIBERO_VQA.get("suites") or ["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"]),
            n=int(LIBERO_VQA.get("n", 600)),
            seed=int(LIBERO_VQA.get("seed", config.get("seed", 0))),
            states=int(LIBERO_VQA.get("states_per_task", 2)),
            tasks=(f"--tasks-per-suite {int(LIBERO_VQA['tasks_per_suite'])}"
                   if LIBERO_VQA.get("tasks_per_suite") else ""),
            cfgdir=(f"--config-dir {config['eval'].get('libero', {}).get('config_path')}"
                    if (config["eval"].get("libero") or {}).get("config_path") else ""),
        log:
            log_file("libero_vqa", "libero_vqa"),
        threads: 1
        resources:
            gpu=0,
            mem_mb=8000,
        conda:
            CONDA_ENV
        shell:
            f"{JOB_ENV}; {VLAFORGET} libero-vqa --out {{params.out}} --suites {{params.suites}} "
            "--n {params.n} --seed {params.seed} --states-per-task {params.states} {params.tasks} {params.cfgdir} > {log} 2>&1"
