# prepare_data: one task's records -> disjoint roles (fisher / scored / reference / control,
# seeded by the split seed, dataset ids kept) -> tokens. Keyed by model + task + split +
# sizes + tokens: _data/<task>-<hash>/. Tokenised by the model's tokenizer, which the job
# builds from the model config: the data wait for no other job.


rule prepare_data:
    input:
        run=RUN,
    output:
        manifest=f"{R}/_data/{{key}}/manifest.json",
        tensors=f"{R}/_data/{{key}}/tensors.safetensors",
        config=f"{R}/_data/{{key}}/config.prepare_data.yaml",
        record=f"{R}/_data/{{key}}/mlflow.prepare_data.json",
    params:
        slice=lambda wc: PLAN.params("prepare_data", wc),
    log:
        f"{R}/logs/prepare_data/{{key}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_data/{{key}}.tsv"
    threads: lambda wc: PLAN.resource("prepare_data", wc, "threads")
    resources:
        mem_mb=lambda wc: PLAN.resource("prepare_data", wc, "mem_mb"),
        runtime=lambda wc: PLAN.resource("prepare_data", wc, "runtime"),
        gpu=lambda wc: PLAN.resource("prepare_data", wc, "gpu", 0),
    conda:
        "../envs/qkov.yaml"
    script:
        "../scripts/prepare_data.py"
