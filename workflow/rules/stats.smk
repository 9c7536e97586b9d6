# stats: permutation tests, FDR, effect sizes and bootstrap intervals per split seed;
# tables: the analysis's cells.csv over its split seeds (+ stability across seeds).


rule stats:
    input:
        run=RUN,
        heatmap=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/heatmap.json",
        scores=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/scores.npz",
    output:
        cells=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/cells.csv",
        stats=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/stats.json",
        null_top=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/null_top.npz",
        config=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/config.stats.yaml",
        record=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/mlflow.stats.json",
    params:
        slice=lambda wc: PLAN.params("stats", wc),
    log:
        f"{R}/logs/stats/{{exp}}/{{model}}/{{pair}}/split{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/stats/{{exp}}/{{model}}/{{pair}}/split{{seed}}.tsv"
    threads: lambda wc: PLAN.resource("stats", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("stats", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("stats", wc, "runtime"),
        gpu=0,
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/stats.py"


rule tables:
    input:
        run=RUN,
        cells=lambda wc: PLAN.seed_files(wc, "cells.csv"),
        stats=lambda wc: PLAN.seed_files(wc, "stats.json"),
    output:
        cells=report(f"{R}/{{exp}}/{{model}}/{{pair}}/cells.csv",
                     caption="../report/cells.rst", category="Tables",
                     subcategory="{pair}"),
        stability=f"{R}/{{exp}}/{{model}}/{{pair}}/stability.json",
        config=f"{R}/{{exp}}/{{model}}/{{pair}}/config.tables.yaml",
        record=f"{R}/{{exp}}/{{model}}/{{pair}}/mlflow.tables.json",
    params:
        slice=lambda wc: PLAN.params("tables", wc),
    log:
        f"{R}/logs/tables/{{exp}}/{{model}}/{{pair}}.log",
    benchmark:
        f"{R}/benchmarks/tables/{{exp}}/{{model}}/{{pair}}.tsv"
    threads: lambda wc: PLAN.resource("tables", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("tables", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("tables", wc, "runtime"),
        gpu=0,
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/tables.py"
