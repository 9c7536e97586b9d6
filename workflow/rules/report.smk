# summary: the experiment's run summary (json + markdown); track: MLflow bookkeeping (local).
# The HTML report (`snakemake --report report.html`) shows every output wrapped in report()
# (here and in figures.smk) with its caption from workflow/report/*.rst.


rule summary:
    input:
        run=RUN,
        cells=lambda wc: PLAN.experiment_files(wc.exp, "cells.csv"),
        stats=lambda wc: PLAN.experiment_files(wc.exp, "stats.json", per_seed=True),
        figures=lambda wc: PLAN.experiment_files(wc.exp, "figures/figures.json"),
        stores=lambda wc: [f"{R}/_stores/{k}/store.json"
                           for k in PLAN.experiment_jobs(wc.exp)["stores"]],
        validation=lambda wc: PLAN.validation_files(wc.exp, "validation.json"),
        validation_figures=lambda wc: PLAN.validation_files(wc.exp, "validation_scatter.png",
                                                            figures=True),
    output:
        json=f"{R}/{{exp}}/summary.json",
        md=report(f"{R}/{{exp}}/summary.md", caption="../report/summary.rst",
                  category="Summary", subcategory="{exp}", labels={"table": "run summary"}),
        config=f"{R}/{{exp}}/config.summary.yaml",
        record=f"{R}/{{exp}}/mlflow.summary.json",
    params:
        slice=lambda wc: PLAN.params("summary", wc),
    log:
        f"{R}/logs/summary/{{exp}}.log",
    benchmark:
        f"{R}/benchmarks/summary/{{exp}}.tsv"
    threads: lambda wc: PLAN.resource("summary", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("summary", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("summary", wc, "runtime"),
        gpu=0,
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/summary.py"


rule track:
    # Logs every job record still pending (deferred mode: all of them) and the summary on
    # the workflow run's MLflow parent run. Local: one writer, on the submitting host.
    localrule: True
    input:
        run=RUN,
        records=lambda wc: PLAN.records(wc.exp)
        + qp.stability_files(PLAN, wc.exp, "mlflow.draw_stability.json"),
        summary=f"{R}/{{exp}}/summary.json",
        md=f"{R}/{{exp}}/summary.md",
    output:
        tracking=f"{R}/{{exp}}/tracking.json",
    params:
        slice=lambda wc: PLAN.params("track", wc),
    log:
        f"{R}/logs/track/{{exp}}.log",
    benchmark:
        f"{R}/benchmarks/track/{{exp}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/track.py"
