# Figures from saved results (never from gradients):
#   draw_figures           every figure and table of one analysis, and its cell explorer
#                          (figures/explorer.html: self-contained, opens offline)
#   draw_stability         analyses with two or more split seeds: stability across seeds
#   draw_ablation_summary  a sweep (two or more experiments): the variants compared, MLflow
# Targets: `snakemake figures` (all of them; add --forcerun draw_figures to redraw what is up
# to date) and `snakemake ablation_summary --config experiment='[a,b,...]'`.
# Editing the figure code (src/interference/figures, stages/figures.py) changes the `code`
# parameter, so the next run redraws the figures and nothing upstream.

FIGURES_CODE = qp.code_digest()


rule draw_figures:
    input:
        run=RUN,
        heatmap=lambda wc: PLAN.seed_files(wc, "heatmap.json")[0],
        cells=f"{R}/{{exp}}/{{model}}/{{pair}}/cells.csv",
        stats=lambda wc: PLAN.seed_files(wc, "stats.json"),
        null_top=lambda wc: PLAN.seed_files(wc, "null_top.npz")[0],
        data=lambda wc: [f"{R}/_data/{k}/manifest.json" for k in PLAN.analysis_data(
            wc.exp, wc.model, wc.pair, PLAN.analysis(wc.exp, wc.model, wc.pair)["seeds"][0]).values()],
        control=PLAN.control_cells,           # for the explorer: the control's value of a cell
        validation=PLAN.validation_cells,     # for the explorer: measured effects, if validated
    output:
        manifest=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/figures.json",
        heatmap_q=qp.figure_report(R, "heatmap_Q.png", "heatmap_Q", ("Heatmaps", "Q heatmap")),
        heatmap_k=qp.figure_report(R, "heatmap_K.png", "heatmap_K", ("Heatmaps", "K heatmap")),
        heatmap_v=qp.figure_report(R, "heatmap_V.png", "heatmap_V", ("Heatmaps", "V heatmap")),
        heatmap_o=qp.figure_report(R, "heatmap_O.png", "heatmap_O", ("Heatmaps", "O heatmap")),
        panel=qp.figure_report(R, "heatmap_panel.png", "panel", ("Heatmaps", "Q, K, V, O panel")),
        blocks=qp.figure_report(R, "block_comparison.png", "blocks",
                                ("Block comparison", "mean per block")),
        top=qp.figure_report(R, "top_conflicts.csv", "top",
                             ("Top conflicts", "top conflicting cells")),
        top_tex=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/top_conflicts.tex",
        forensics=qp.figure_report(R, "forensics.png", "forensics",
                                   ("Sample-pair forensics", "most conflicting sample pairs")),
        pvalues=qp.figure_report(R, "pvalue_histogram.png", "pvalues",
                                 ("Diagnostics", "p-value histogram")),
        null_top=qp.figure_report(R, "null_top.png", "null_top",
                                  ("Diagnostics", "permutation null of the top cells")),
        explorer=qp.figure_report(R, "explorer.html", "explorer",
                                  ("Cell explorer", "click a cell: statistics, pairs, texts")),
        config=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/config.draw_figures.yaml",
        record=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/mlflow.draw_figures.json",
    params:
        slice=lambda wc: PLAN.params("draw_figures", wc),
        code=FIGURES_CODE,
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


rule draw_stability:
    input:
        run=RUN,
        stats=lambda wc: PLAN.seed_files(wc, "stats.json"),
        seed_cells=lambda wc: PLAN.seed_files(wc, "cells.csv"),
    output:
        png=report(f"{R}/{{exp}}/{{model}}/{{pair}}/figures/stability.png",
                   caption="../report/stability.rst", category="Stability across split seeds",
                   subcategory="{exp} / {pair}", labels={"figure": "stability", "model": "{model}"}),
        pdf=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/stability.pdf",
        cells=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/stability_cells.csv",
        pairs=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/stability_pairs.csv",
        config=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/config.draw_stability.yaml",
        record=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/mlflow.draw_stability.json",
    params:
        slice=lambda wc: PLAN.params("draw_figures", wc),
        code=FIGURES_CODE,
    log:
        f"{R}/logs/stability/{{exp}}/{{model}}/{{pair}}.log",
    benchmark:
        f"{R}/benchmarks/stability/{{exp}}/{{model}}/{{pair}}.tsv"
    threads: lambda wc: PLAN.resource("draw_figures", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("draw_figures", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("draw_figures", wc, "runtime"),
        gpu=0,
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/figures.py"


if SWEEP:

    rule draw_ablation_summary:
        # Local: it also writes the sweep's MLflow runs (one writer, like `track`).
        localrule: True
        input:
            run=RUN,
            cells=SWEEP["cells"],
            stats=SWEEP["stats"],
            validation=SWEEP["validation"],
        output:
            manifest=f"{SWEEP['dir']}/ablation.json",
            md=report(f"{SWEEP['dir']}/ablation.md", caption="../report/ablation_table.rst",
                      category="Ablation summary", subcategory=SWEEP["name"],
                      labels={"figure": "table", "analysis": "all"}),
            figures=[report(f"{SWEEP['dir']}/{p}/ablation_summary.png",
                            caption="../report/ablation.rst", category="Ablation summary",
                            subcategory=SWEEP["name"],
                            labels={"figure": "ablation summary", "analysis": p})
                     for p in SWEEP["pairs"]],
            config=f"{SWEEP['dir']}/config.draw_ablation_summary.yaml",
            record=f"{SWEEP['dir']}/mlflow.draw_ablation_summary.json",
        params:
            slice=SWEEP["slice"],
            code=FIGURES_CODE,
            variants=", ".join(SWEEP["variants"]),
        log:
            f"{R}/logs/ablation_summary/{SWEEP['name']}.log",
        benchmark:
            f"{R}/benchmarks/ablation_summary/{SWEEP['name']}.tsv"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
            gpu=0,
        conda:
            "../envs/qkov.yaml"
        script:
            "../scripts/ablation_summary.py"


rule ablation_summary:
    # Target: the sweep's ablation summary (and everything it needs).
    input:
        f"{SWEEP['dir']}/ablation.json" if SWEEP else (lambda wc: qp.no_sweep()),


rule figures:
    # Target: every figure of the planned experiments (and the sweep's ablation summary).
    input:
        [f"{R}/{e}/{m}/{p}/figures/{f}" for (e, m, p) in PLAN.analyses
         for f in ("figures.json", "explorer.html")],
        qp.stability_files(PLAN),
        [f"{SWEEP['dir']}/ablation.json"] if SWEEP else [],
