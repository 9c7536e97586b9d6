# scores: the QK-OV heatmap of one analysis and split seed, plus the reference disruptors'
# scores with the same normaliser. Analysis <a>__<b> is A vs B; <a>__<b>.control is the
# negative control A vs A' (held-out A in B's place).
#
# Per pair and split seed, `chunk_scores` computes both arms and the reference scores in
# one pass over the (layer, block)s (task A's rows made once for B, A' and R; the
# reference scores once for both arms) into split<seed>/chunks/<c>/ (temporary), and
# `scores` writes each arm's heatmap.json and scores.npz from there. With the gradient
# stores (resources.collect.layer_chunks = 1, the default) there is one chunk of every
# layer, read from the stores (resources.scores sizes it). With layer chunks K > 1 (an
# execution setting) there are no stores: K chunk jobs (one GPU or node each,
# resources.collect) collect the Fisher and per-sample gradients of their contiguous
# layers (in as few forward+backward passes as resources.collect.chunk_memory_mb allows)
# and score them; `scores` joins them into the same files (byte-identical cells.csv).
# Random weights (model.source: random) are made by the chunk job itself, which then
# needs only the data; `scores` waits for the model's model.json (qkov_pipeline.plan.
# loads_prepared).
# See qkov_pipeline.stages.scores, docs/workflow.md.


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
    threads: 1
    resources:
        # reads and writes one arm's scores: no device, the scores' memory
        mem_mb=lambda wc: PLAN.resource("scores", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("scores", wc, "runtime"),
        gpu=0,
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/scores.py"


rule chunk_scores:
    # One chunk of pair <a>__<b>: both arms' and the reference scores on its layers (every
    # layer from the stores, or a layer chunk collected here); temporary, read by `scores`.
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
