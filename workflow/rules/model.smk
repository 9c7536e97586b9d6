# prepare_model: build (tiny) or convert (SmolLM2 GGUF -> safetensors) the model ONCE.
# Keyed by the model section of the config: _models/<name>-<hash>/. The data jobs build the
# tokenizer themselves from the same config (no weights) while the model converts;
# model.json and the data record the tokenizer's digest, compared where they meet.


rule prepare_model:
    input:
        run=RUN,
    output:
        manifest=f"{R}/_models/{{key}}/model.json",
        config=f"{R}/_models/{{key}}/config.prepare_model.yaml",
        record=f"{R}/_models/{{key}}/mlflow.prepare_model.json",
    params:
        slice=lambda wc: PLAN.params("prepare_model", wc),
    log:
        f"{R}/logs/prepare_model/{{key}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_model/{{key}}.tsv"
    # first among ready jobs where the data's consumers read the model too (few cores)
    priority: PLAN.model_priority
    threads: lambda wc: PLAN.resource("prepare_model", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("prepare_model", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("prepare_model", wc, "runtime"),
        gpu=lambda wc: PLAN.resource("prepare_model", wc, "gpu", 0),
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/prepare_model.py"

