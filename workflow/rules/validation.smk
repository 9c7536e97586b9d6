# Counterfactual validation of the map (validation.enabled; conf/validation/):
#   prepare_eval     held-out `eval` samples of a task, drawn after every other role of the
#                    same split (disjoint from all of them): _eval/<task>-<hash>/
#   validate         per-cell counterfactuals, predictive validity of the map against
#                    baselines, freeze-the-top-k fine-tuning arms: <analysis>/split<seed>/validation/
#   draw_validation  its figures: <analysis>/figures/validation_*.{pdf,png}
# See qkov_pipeline.stages.validate and interference.validation.


rule prepare_eval:
    input:
        run=RUN,
        data=lambda wc: f"{R}/_data/{PLAN.evals[wc.key]['data_key']}/manifest.json",
    output:
        manifest=f"{R}/_eval/{{key}}/manifest.json",
        tensors=f"{R}/_eval/{{key}}/tensors.safetensors",
        config=f"{R}/_eval/{{key}}/config.prepare_eval.yaml",
        record=f"{R}/_eval/{{key}}/mlflow.prepare_eval.json",
    params:
        slice=lambda wc: PLAN.params("prepare_eval", wc),
    log:
        f"{R}/logs/prepare_eval/{{key}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_eval/{{key}}.tsv"
    threads: lambda wc: PLAN.resource("prepare_eval", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("prepare_eval", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("prepare_eval", wc, "runtime"),
        gpu=0,
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/prepare_eval.py"


rule validate:
    input:
        unpack(lambda wc: PLAN.validation_inputs(wc)),
        run=RUN,
    output:
        cells=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/validation/validation_cells.csv",
        validity=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/validation/validity.csv",
        precision=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/validation/precision.csv",
        arms=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/validation/arms.csv",
        comparison=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/validation/comparison.csv",
        json=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/validation/validation.json",
        config=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/validation/config.validate.yaml",
        record=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/validation/mlflow.validate.json",
    params:
        slice=lambda wc: PLAN.params("validate", wc),
    log:
        f"{R}/logs/validate/{{exp}}/{{model}}/{{pair}}/split{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/validate/{{exp}}/{{model}}/{{pair}}/split{{seed}}.tsv"
    threads: lambda wc: PLAN.resource("validate", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("validate", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("validate", wc, "runtime"),
        gpu=lambda wc: PLAN.resource("validate", wc, "gpu", 0),
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/validate.py"


rule draw_validation:
    input:
        run=RUN,
        json=lambda wc: PLAN.seed_files(wc, "validation/validation.json")[0],
        cells=lambda wc: PLAN.seed_files(wc, "validation/validation_cells.csv")[0],
        validity=lambda wc: PLAN.seed_files(wc, "validation/validity.csv")[0],
        precision=lambda wc: PLAN.seed_files(wc, "validation/precision.csv")[0],
        arms=lambda wc: PLAN.seed_files(wc, "validation/arms.csv")[0],
        comparison=lambda wc: PLAN.seed_files(wc, "validation/comparison.csv")[0],
    output:
        scatter=qp.figure_report(R, "validation_scatter.png", "validation_scatter",
                                 ("Counterfactual validation", "score vs measured harm")),
        scatter_pdf=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/validation_scatter.pdf",
        precision=qp.figure_report(R, "validation_precision.png", "validation_precision",
                                   ("Counterfactual validation", "precision@k")),
        precision_pdf=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/validation_precision.pdf",
        arms=qp.figure_report(R, "validation_intervention.png", "validation_intervention",
                              ("Counterfactual validation", "forgetting vs learning; "
                                                            "each arm minus random")),
        arms_pdf=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/validation_intervention.pdf",
        config=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/config.draw_validation.yaml",
        record=f"{R}/{{exp}}/{{model}}/{{pair}}/figures/mlflow.draw_validation.json",
    params:
        slice=lambda wc: PLAN.params("draw_validation", wc),
        code=FIGURES_CODE,
    log:
        f"{R}/logs/draw_validation/{{exp}}/{{model}}/{{pair}}.log",
    benchmark:
        f"{R}/benchmarks/draw_validation/{{exp}}/{{model}}/{{pair}}.tsv"
    threads: lambda wc: PLAN.resource("draw_validation", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("draw_validation", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("draw_validation", wc, "runtime"),
        gpu=0,
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/draw_validation.py"


rule validation:
    # Target: the validation of every planned analysis whose validation is on.
    input:
        [f for e in PLAN.experiments for f in
         PLAN.validation_files(e, "validation_scatter.png", figures=True)],
