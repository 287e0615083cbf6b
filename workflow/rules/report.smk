# Paper tables and figures: each table depends only on the runs it needs (plus the teacher's evals);
# `snakemake --report report.html` collects them with their captions.

TABLE_RUNS = {"main": main_runs, "fewshot": fewshot_runs, "ablation": ablation_runs}
FIGURES = ["pareto", "training_curves", "ablation"]


def figures_outputs():
    return [f"results/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]


localrules:
    table,
    figures,


rule table:
    input:
        evals=lambda w: table_inputs(TABLE_RUNS[w.kind]()),
    output:
        csv=report("results/table_{kind}.csv", caption="../report/table.rst", category="Tables",
                   labels={"table": "{kind}", "format": "csv"}),
        md="results/table_{kind}.md",
    params:
        upstream=" ".join(UPSTREAM_SUITES) or "''",
    wildcard_constraints:
        kind="main|fewshot|ablation",
    log:
        "results/logs/table_{kind}.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
    shell:
        "vlaforget table --kind {wildcards.kind} --upstream-suites {params.upstream} "
        "--inputs {input.evals} --out {output.csv} > {log} 2>&1"


rule figures:
    input:
        ablation="results/table_ablation.csv",
        evals=table_inputs(main_runs()),
        runs=[train_done(r) for r in dict.fromkeys(main_runs() + ablation_runs())],
    output:
        figs=[report(f, caption="../report/figures.rst", category="Figures") for f in figures_outputs()],
    params:
        outdir="results/figures",
        upstream=" ".join(UPSTREAM_SUITES) or "''",
    log:
        "results/logs/figures.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
    shell:
        JOB_ENV + "; vlaforget figures --ablation-table {input.ablation} "
        "--upstream-suites {params.upstream} --evals {input.evals} --run-done {input.runs} "
        "--out-dir {params.outdir} > {log} 2>&1"
