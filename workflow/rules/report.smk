# Paper tables and figures (in results_dir): each table depends only on the runs it needs (plus the
# teacher's evals); each also writes {root}/reports/<name>.json, the record of what it was built from;
# `snakemake --report report.html` collects them with their captions.

localrules:
    table,
    figures,
    table_main,
    table_fewshot,
    table_ablation,


rule table:
    input:
        evals=lambda w: table_inputs(TABLE_RUNS[w.kind]()),
    output:
        csv=report(f"{RESULTS}/table_{{kind}}.csv", caption="../report/table.rst", category="Tables",
                   labels={"table": "{kind}", "format": "csv"}),
        md=f"{RESULTS}/table_{{kind}}.md",
        # what the table was built from, under the data root: a table copied in (or left from another
        # study) is never up to date for an empty root, whose record is missing
        record=R(ROOT / "reports" / "table_{kind}.json"),
    params:
        upstream=" ".join(UPSTREAM_SUITES) or "''",
        code=vfc.code_hash("table"),  # reruns the tables when the code they import changes
        record=lambda w: json.dumps(report_cfg(w.kind), sort_keys=True),  # input list change: params trigger
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
            "--inputs {input.evals} --out {output.csv}",
            record=True,
        )


rule figures:
    input:
        ablation=f"{RESULTS}/table_ablation.csv",
        evals=table_inputs(main_runs()),
        runs=figure_run_files(),
    output:
        figs=[report(f, caption="../report/figures.rst", category="Figures") for f in figures_outputs()],
        record=R(ROOT / "reports" / "figures.json"),
    params:
        outdir=lambda w, output: os.path.dirname(output.figs[0]),
        upstream=" ".join(UPSTREAM_SUITES) or "''",
        code=vfc.code_hash("figures"),  # redraws the figures when the code they import changes
        record=json.dumps(report_cfg("figures"), sort_keys=True),
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
            "--evals {input.evals} --run-done {input.runs} --out-dir {params.outdir}",
            record=True,
        )


# One table and what it needs: `snakemake --profile ... table_ablation`. Prefer these to a file target
# (results/table_ablation.csv): a file target that exists is "up to date" to Snakemake even when the
# data root is empty; these also request the table's record under the root.
rule table_main:
    input:
        f"{RESULTS}/table_main.csv",
        R(ROOT / "reports" / "table_main.json"),


rule table_fewshot:
    input:
        f"{RESULTS}/table_fewshot.csv",
        R(ROOT / "reports" / "table_fewshot.json"),


rule table_ablation:
    input:
        f"{RESULTS}/table_ablation.csv",
        R(ROOT / "reports" / "table_ablation.json"),
