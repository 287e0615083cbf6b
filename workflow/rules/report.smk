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
        # the compact paper table first in the HTML report (categories sort by name), the wide CSV after it
        paper=report(table_paper("{kind}", "paper_md"), caption="../report/table_paper.rst",
                     category="1. Paper tables", labels={"table": "{kind}", "format": "md"}),
        tex=table_paper("{kind}", "tex"),
        stats=report(table_paper("{kind}", "stats"), caption="../report/table_paper.rst",
                     category="1. Paper tables", labels={"table": "{kind}", "format": "comparisons csv"}),
        csv=report(table_csv("{kind}"), caption="../report/table.rst", category="3. Data tables",
                   labels={"table": "{kind}", "format": "csv"}),
        md=table_md("{kind}"),
        # what the table was built from, under the data root: a table copied in (or left from another
        # study) is never up to date for an empty root, whose record is missing
        record=table_record("{kind}"),
    params:
        upstream=" ".join(UPSTREAM_SUITES) or "''",
        bases=" ".join(f"{a}={config['ablations'][a]['base']}" for a in STUDY.get("ablations", [])) or "''",
        code=vfc.code_hash("table"),  # reruns the tables when the code they import changes
        record=lambda w: json.dumps(report_cfg(w.kind), sort_keys=True),  # input list change: params trigger
    wildcard_constraints:
        kind="main|fewshot|ablation",
    log:
        report_log("table_{kind}"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
    conda:
        "../../envs/vlaforget.yaml"
    shell:
        report_shell(
            "table --kind {wildcards.kind} --upstream-suites {params.upstream} "
            "--ablation-bases {params.bases} --inputs {input.evals} --out {output.csv}",
            record=True,
        )


# study.chain (LIBERO's lifelong protocol): the success matrix of every chain and its FWT / NBT / AUC
# (report/lifelong.py; docs/evaluation.md "LIBERO's lifelong metrics").
if CHAIN_SUITES:

    localrules:
        table_lifelong_build,
        table_lifelong,

    rule table_lifelong_build:
        input:
            evals=lifelong_inputs(),
            runs=[train_done(r) for r in chain_runs()],  # their metrics.jsonl: periodic evals
        output:
            csv=report(table_csv("lifelong"), caption="../report/table_lifelong.rst", category="3. Data tables",
                       labels={"table": "lifelong", "format": "csv"}),
            md=table_md("lifelong"),
            detail=f"{RESULTS}/table_lifelong.json",
            record=table_record("lifelong"),
        params:
            chain=" ".join(CHAIN_SUITES),
            run_dirs=" ".join(lifelong_run_dirs()),
            code=vfc.code_hash("table"),
            record=json.dumps(report_cfg("lifelong"), sort_keys=True),
        log:
            report_log("table_lifelong"),
        threads: 1
        resources:
            gpu=0,
            mem_mb=2000,
        conda:
            "../../envs/vlaforget.yaml"
        shell:
            report_shell(
                "table --kind lifelong --chain-suites {params.chain} --run-dirs {params.run_dirs} "
                "--inputs {input.evals} --out {output.csv}",
                record=True,
            )

    rule table_lifelong:
        input:
            table_csv("lifelong"),
            table_record("lifelong"),


rule figures:
    input:
        ablation=table_csv("ablation"),
        evals=table_inputs(main_runs()),
        runs=figure_run_files(),
    output:
        figs=[report(f, caption="../report/figures.rst", category="2. Figures") for f in figures_outputs()],
        record=figures_record(),
    params:
        outdir=lambda w, output: os.path.dirname(output.figs[0]),
        upstream=" ".join(UPSTREAM_SUITES) or "''",
        code=vfc.code_hash("figures"),  # redraws the figures when the code they import changes
        record=json.dumps(report_cfg("figures"), sort_keys=True),
    log:
        report_log("figures"),
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
        table_csv("main"),
        table_record("main"),


rule table_fewshot:
    input:
        table_csv("fewshot"),
        table_record("fewshot"),


rule table_ablation:
    input:
        table_csv("ablation"),
        table_record("ablation"),
