# collect: one task's Fisher (fisher samples) and per-sample gradients (scored, reference,
# control samples). Keyed by model + data + fisher settings, NOT by metric or statistics
# settings: _stores/<task>-<hash>/, so metric- and statistics-only ablations reuse it.
# workflow.temp_stores: true marks the gradients temporary.


rule collect:
    input:
        model=lambda wc: f"{R}/_models/{PLAN.stores[wc.key]['model_key']}/model.json",
        data=lambda wc: f"{R}/_data/{PLAN.stores[wc.key]['data_key']}/manifest.json",
    output:
        grads=(temp(directory(f"{R}/_stores/{{key}}/grads")) if PLAN.temp_stores()
               else directory(f"{R}/_stores/{{key}}/grads")),
        manifest=f"{R}/_stores/{{key}}/store.json",
        config=f"{R}/_stores/{{key}}/config.collect.yaml",
        record=f"{R}/_stores/{{key}}/mlflow.collect.json",
    params:
        slice=lambda wc: PLAN.params("collect", wc),
    log:
        f"{R}/logs/collect/{{key}}.log",
    benchmark:
        f"{R}/benchmarks/collect/{{key}}.tsv"
    threads: lambda wc: PLAN.resource("collect", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("collect", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("collect", wc, "runtime"),
        gpu=lambda wc: PLAN.resource("collect", wc, "gpu", 0),
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/collect.py"


rule stores:
    # Target: every gradient store of the planned experiments (no scoring).
    input:
        lambda wc: [f"{R}/_stores/{k}/store.json" for k in PLAN.stores],
