# scores: the QK-OV heatmap of one analysis and split seed, plus the reference disruptors'
# scores with the same normaliser. Analysis <a>__<b> is A vs B; <a>__<b>.control is the
# negative control A vs A' (held-out A in B's place).
#
# Layer chunks (resources.collect.layer_chunks = K > 1, an execution setting): no gradient
# stores. K `chunk_scores` jobs per pair and split seed (one GPU or node each) collect the
# Fisher and per-sample gradients of their contiguous layers (in as few forward+backward
# passes as resources.collect.chunk_memory_mb allows) and score both arms on them into
# split<seed>/chunks/<c>/ (temporary); `scores` joins them into the same heatmap.json and
# scores.npz (byte-identical cells.csv). See qkov_pipeline.stages.scores, docs/workflow.md.


rule scores:
    input:
        unpack(lambda wc: PLAN.scores_inputs(wc)),
        run=RUN,
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


rule chunk_scores:
    # One layer chunk of pair <a>__<b> (only planned when resources.collect.layer_chunks > 1):
    # both arms' scores on its layers; temporary, joined by `scores`.
    input:
        unpack(lambda wc: PLAN.chunk_inputs(wc)),
        run=RUN,
    output:
        part=temp(directory(f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/chunks/{{chunk}}")),
        config=temp(f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/chunks/config.chunk_scores.{{chunk}}.yaml"),
        record=temp(f"{R}/{{exp}}/{{model}}/{{pair}}/split{{seed}}/chunks/mlflow.chunk_scores.{{chunk}}.json"),
    params:
        slice=lambda wc: PLAN.params("chunk_scores", wc),
    wildcard_constraints:
        pair=r"[A-Za-z0-9_]+__[A-Za-z0-9_]+",
        chunk=r"\d+",
    log:
        f"{R}/logs/chunk_scores/{{exp}}/{{model}}/{{pair}}/split{{seed}}/chunk{{chunk}}.log",
    benchmark:
        f"{R}/benchmarks/chunk_scores/{{exp}}/{{model}}/{{pair}}/split{{seed}}/chunk{{chunk}}.tsv"
    threads: lambda wc: PLAN.resource("chunk_scores", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("chunk_scores", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("chunk_scores", wc, "runtime"),
        gpu=lambda wc: PLAN.resource("chunk_scores", wc, "gpu", 0),
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/chunk_scores.py"
