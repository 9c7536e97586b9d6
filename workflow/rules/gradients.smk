# collect: one task's Fisher (fisher samples) and per-sample gradients (scored, reference,
# control samples). Keyed by model + data + fisher settings, NOT by metric or statistics
# settings: _stores/<task>-<hash>/, so metric- and statistics-only ablations reuse it.
# workflow.temp_stores: true marks the gradients temporary.
#
# Shards (resources.collect.shards = N > 1, an execution setting): N `collect_shard` jobs
# (one GPU or node each) collect contiguous groups of 8-sample units into
# _stores/<key>/shards/<i>/ (temporary), then `collect` gathers them into the same outputs
# as one job would write (row files hard-linked, Fisher = sum of partial sums / count;
# bitwise equal to the unsharded store). See qkov_pipeline.stages.gradients, docs/slurm.md.
qp.check_plan(PLAN)   # fisher.mode=ema cannot be sharded: refuse before any job


rule collect:
    input:
        run=RUN,
        model=lambda wc: f"{R}/_models/{PLAN.stores[wc.key]['model_key']}/model.json",
        data=lambda wc: f"{R}/_data/{PLAN.stores[wc.key]['data_key']}/manifest.json",
        shards=lambda wc: qp.shard_files(PLAN, wc, "shard.json"),
        shard_grads=lambda wc: qp.shard_files(PLAN, wc, "grads"),
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
    threads: lambda wc: qp.resource(PLAN, wc, "threads", gathered=1)
    resources:
        mem_mb=lambda wc: PLAN.resource("collect", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("collect", wc, "runtime"),
        gpu=lambda wc: qp.resource(PLAN, wc, "gpu", gathered=0),
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/collect.py"


rule collect_shard:
    # One shard of a store (only planned when resources.collect.shards > 1); its files are
    # temporary: `collect` gathers them into the store.
    input:
        run=RUN,
        model=lambda wc: f"{R}/_models/{PLAN.stores[wc.key]['model_key']}/model.json",
        data=lambda wc: f"{R}/_data/{PLAN.stores[wc.key]['data_key']}/manifest.json",
    output:
        grads=temp(directory(f"{R}/_stores/{{key}}/shards/{{shard}}/grads")),
        manifest=temp(f"{R}/_stores/{{key}}/shards/{{shard}}/shard.json"),
        config=temp(f"{R}/_stores/{{key}}/shards/{{shard}}/config.collect_shard.yaml"),
        record=temp(f"{R}/_stores/{{key}}/shards/{{shard}}/mlflow.collect_shard.json"),
    params:
        slice=lambda wc: PLAN.params("collect", wc),
    wildcard_constraints:
        shard=r"\d+",
    log:
        f"{R}/logs/collect_shard/{{key}}/shard{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/collect_shard/{{key}}/shard{{shard}}.tsv"
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
