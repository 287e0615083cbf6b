# Paper tables and figures: each table depends only on the runs it needs (plus the teacher's evals);
# `snakemake --report report.html` collects them with their captions.

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
        code=vfc.code_hash("report"),  # reruns the tables when report/ changes
    wildcard_constraints:
        kind="main|fewshot|ablation",
    log:
        R(ROOT / "logs" / "report" / "table_{kind}.log"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
    conda:
        "../../envs/vlaforget.yaml"
    shell:
        report_shell(
            "table --kind {wildcards.kind} --upstream-suites {params.upstream} "
            "--inputs {input.evals} --out {output.csv}"
        )


rule figures:
    input:
        ablation="results/table_ablation.csv",
        evals=table_inputs(main_runs()),
        runs=figure_run_files(),
    output:
        figs=[report(f, caption="../report/figures.rst", category="Figures") for f in figures_outputs()],
    params:
        outdir=lambda w, output: os.path.dirname(output.figs[0]),
        upstream=" ".join(UPSTREAM_SUITES) or "''",
        code=vfc.code_hash("report"),  # redraws the figures when report/ changes
    log:
        R(ROOT / "logs" / "report" / "figures.log"),
    conda:
        "../../envs/vlaforget.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
    shell:
        report_shell(
            "figures --ablation-table {input.ablation} --upstream-suites {params.upstream} "
            "--evals {input.evals} --run-done {input.runs} --out-dir {params.outdir}"
        )
