# scores: the QK-OV heatmap of one analysis and split seed, plus the reference disruptors'
# scores with the same normaliser. Analysis <a>__<b> is A vs B; <a>__<b>.control is the
# negative control A vs A' (held-out A in B's place).


rule scores:
    input:
        grads=lambda wc: [f"{R}/_stores/{k}/grads" for k in
                          PLAN.analysis_stores(wc.exp, wc.model, wc.pair, wc.seed).values()],
        manifests=lambda wc: [f"{R}/_stores/{k}/store.json" for k in
                              PLAN.analysis_stores(wc.exp, wc.model, wc.pair, wc.seed).values()],
    output:
        heatmap=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/heatmap.json",
        scores=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/scores.npz",
        config=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/config.scores.yaml",
        record=f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/mlflow.scores.json",
    params:
        slice=lambda wc: PLAN.params("scores", wc),
    log:
        f"{R}/logs/scores/{{exp}}/{{model}}/{{pair}}/split{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/scores/{{exp}}/{{model}}/{{pair}}/split{{seed}}.tsv"
    threads: lambda wc: PLAN.resource("scores", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("scores", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("scores", wc, "runtime"),
        gpu=lambda wc: PLAN.resource("scores", wc, "gpu", 0),
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/scores.py"
