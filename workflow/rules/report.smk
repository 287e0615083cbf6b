# Paper tables and figures (in results_dir): each table depends only on the runs it needs (plus the
# teacher's evals); each also writes {root}/reports/<name>.json, the record of what it was built from;
# `snakemake --report report.html` collects them with their captions.

localrules:
    table_main_build,
    table_fewshot_build,
    table_ablation_build,
    figures,
    table_main,
    table_fewshot,
    table_ablation,


# One rule per table: its record's path holds the id of what it was built from, which a `{kind}`
# wildcard could not carry (every output of a rule needs the same wildcards).
for _kind in [k for k in TABLE_RUNS if k != "lifelong"]:

    rule:
        name:
            f"table_{_kind}_build"
        input:
            evals=table_inputs(TABLE_RUNS[_kind]),
        output:
            # the compact paper table first in the HTML report (categories sort by name), the wide CSV after it
            paper=report(table_paper(_kind, "paper_md"), caption="../report/table_paper.rst",
                         category="1. Paper tables", labels={"table": _kind, "format": "md"}),
            tex=table_paper(_kind, "tex"),
            stats=report(table_paper(_kind, "stats"), caption="../report/table_paper.rst",
                         category="1. Paper tables", labels={"table": _kind, "format": "comparisons csv"}),
            csv=report(table_csv(_kind), caption="../report/table.rst", category="3. Data tables",
                       labels={"table": _kind, "format": "csv"}),
            md=table_md(_kind),
            # what the table was built from, under the data root, named by its id: a table built from
            # other evals (another config, another root) has no record here and is rebuilt
            record=table_record(_kind),
        params:
            kind=_kind,
            upstream=" ".join(UPSTREAM_SUITES) or "''",
            bases=" ".join(f"{a}={config['ablations'][a]['base']}" for a in STUDY.get("ablations", [])) or "''",
            record=record_param(_kind),
        log:
            report_log(f"table_{_kind}"),
        threads: 1
        resources:
            gpu=0,
            mem_mb=2000,
        conda:
            "../../envs/vlaforget.yaml"
        shell:
            report_shell(
                "table --kind {params.kind} --upstream-suites {params.upstream} "
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
            record=record_param("lifelong"),
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
        record=record_param("figures"),
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
