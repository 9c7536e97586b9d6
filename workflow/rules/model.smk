# prepare_model: build (tiny) or convert (SmolLM2 GGUF -> safetensors) the model ONCE.
# prepare_tokenizer: its tokenizer, from the same config without the weights (the data are
# tokenised while the model converts; model.json and the data record the tokenizer's digest).
# Keyed by the model section of the config: _models/<name>-<hash>/.


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
    threads: lambda wc: PLAN.resource("prepare_model", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("prepare_model", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("prepare_model", wc, "runtime"),
        gpu=lambda wc: PLAN.resource("prepare_model", wc, "gpu", 0),
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/prepare_model.py"


rule prepare_tokenizer:
    input:
        run=RUN,
    output:
        manifest=f"{R}/_models/{{key}}/tokenizer/manifest.json",
        config=f"{R}/_models/{{key}}/config.prepare_tokenizer.yaml",
        record=f"{R}/_models/{{key}}/mlflow.prepare_tokenizer.json",
    params:
        slice=lambda wc: PLAN.params("prepare_tokenizer", wc),
    log:
        f"{R}/logs/prepare_tokenizer/{{key}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_tokenizer/{{key}}.tsv"
    threads: lambda wc: PLAN.resource("prepare_tokenizer", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("prepare_tokenizer", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("prepare_tokenizer", wc, "runtime"),
        gpu=lambda wc: PLAN.resource("prepare_tokenizer", wc, "gpu", 0),
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/prepare_tokenizer.py"
