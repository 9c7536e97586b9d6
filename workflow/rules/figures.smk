# draw_figures: every figure and table of one analysis from saved results (no gradients).
# `snakemake figures` redraws them all.


rule draw_figures:
    input:
        heatmap=lambda wc: PLAN.seed_files(wc, "heatmap.json")[0],
        cells=f"{R}/{{exp}}/{{model}}/{{pair}}/cells.csv",
        stats=lambda wc: PLAN.seed_files(wc, "stats.json"),
        seed_cells=lambda wc: PLAN.seed_files(wc, "cells.csv"),
        data=lambda wc: [f"{R}/_data/{k}/manifest.json" for k in PLAN.analysis_data(
            wc.exp, wc.model, wc.pair, PLAN.analysis(wc.exp, wc.model, wc.pair)["seeds"][0]).values()],
    output:
        manifest=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/figures.json",
        heatmap_q=report(f"{R}/{{exp}}/{{model}}/{{pair}}/figures/heatmap_Q.png",
                         caption="../report/heatmap.rst", category="Heatmaps",
                         subcategory="{pair}"),
        panel=report(f"{R}/{{exp}}/{{model}}/{{pair}}/figures/heatmap_panel.png",
                     caption="../report/panel.rst", category="Heatmaps", subcategory="{pair}"),
        blocks=report(f"{R}/{{exp}}/{{model}}/{{pair}}/figures/block_comparison.png",
                      caption="../report/blocks.rst", category="Block comparison",
                      subcategory="{pair}"),
        pvalues=report(f"{R}/{{exp}}/{{model}}/{{pair}}/figures/pvalue_histogram.png",
                       caption="../report/pvalues.rst", category="Diagnostics",
                       subcategory="{pair}"),
        config=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/config.draw_figures.yaml",
        record=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/mlflow.draw_figures.json",
    params:
        slice=lambda wc: PLAN.params("draw_figures", wc),
    log:
        f"{R}/logs/figures/{{exp}}/{{model}}/{{pair}}.log",
    benchmark:
        f"{R}/benchmarks/figures/{{exp}}/{{model}}/{{pair}}.tsv"
    threads: lambda wc: PLAN.resource("draw_figures", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("draw_figures", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("draw_figures", wc, "runtime"),
        gpu=0,
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/figures.py"


rule figures:
    # Target: the figures of every analysis of the planned experiments.
    input:
        [f"{R}/{e}/{m}/{p}/figures/figures.json" for (e, m, p) in PLAN.analyses],
