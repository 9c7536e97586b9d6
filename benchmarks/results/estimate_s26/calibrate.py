"""The collection time estimate (interference.gradients.collect.estimate) against measured
runs, before and after session 26's FLOP model (pass_flops_per_token) and rates.

    PYTHONPATH=src python benchmarks/results/estimate_s26/calibrate.py [RESULTS_DIR]

CPU: the collect jobs of a default run (RESULTS_DIR: its results/ folder; token counts from
the prepared data, seconds from the stores' roles). GPU: the chunk jobs of B2 through the
workflow recorded in benchmarks/results (b2.jsonl: passes, the old estimate and the
measured collect+score seconds); their token counts are recovered exactly from the old
estimate, which was 6 x parameters x tokens x passes / 150 TFLOP/s + 0.03 s per
micro-batch and pass. Models on the meta device (no weights)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src"))

from interference.architectures import QKOVConfig, QKOVIndexer  # noqa: E402
from interference.gradients.collect import (MICRO_BATCH_S, RATE_FLOPS, estimate,  # noqa: E402
                                            pass_flops_per_token)
from interference.models import build_from_config  # noqa: E402
from qkov_pipeline import plan as qp  # noqa: E402

OLD_RATE = {"cpu": 13e9, "cuda/bfloat16": 150e12}


def experiment(name: str, overrides=()):
    cfg = qp.build_plan(ROOT / "conf", ROOT / "workflow" / "schemas" / "config.schema.yaml",
                        [name], list(overrides)).experiments[name]
    model = build_from_config(cfg["model"], weights=False)[0]
    return cfg, model, QKOVIndexer(model, QKOVConfig.from_model(model))


def b2_tokens(chunk: dict, n_params: int, sizes: list[int]) -> tuple[float, int]:
    """(tokens, micro-batches per pass) of a B2 chunk job, recovered exactly from its old
    estimate: 6 x parameters x tokens / 150 TFLOP/s + 0.03 s per micro-batch, per pass."""
    n_micro = sum(-(-k // chunk["micro_batch"]) for k in sizes)
    per_pass = chunk["estimate_s"] / len(chunk["passes"]) - MICRO_BATCH_S["cuda"] * n_micro
    return per_pass * OLD_RATE["cuda/bfloat16"] / (6 * n_params), n_micro


def cpu_rows(results: Path):
    from safetensors.torch import load_file

    cfg, model, idx = experiment("default")
    n = sum(p.numel() for p in model.parameters())
    flops = pass_flops_per_token(model, idx, idx.layers)
    for store in sorted((results / "_stores").glob("*/store.json")):
        s = json.loads(store.read_text())
        data = next((results / "_data").glob(f"{s['task']}-*/tensors.safetensors"))
        t = load_file(str(data))
        tokens = [int(x) for k, v in t.items() if k.endswith("attention_mask")
                  for x in v.sum(1).tolist()]
        took = sum(r["seconds"] for r in s["roles"].values())
        old = 6 * n * sum(tokens) / (OLD_RATE["cpu"] * s["threads"])
        assert abs(old - s["estimate"]["seconds"]) < 1e-6 * old, "not the old estimate"
        new = estimate([flops], tokens, "cpu", "float32", s["threads"])
        yield (f"cpu {s['task']} ({s['threads']} threads)", 1, old, new, took,
               flops * sum(tokens) / took / s["threads"])


def gpu_rows():
    cfg, model, idx = experiment("b2_7b")
    n = sum(p.numel() for p in model.parameters())
    sizes = [k for t in qp.pair_tasks(cfg) for k in qp._roles_of(cfg, t).values() if k]
    seen = set()
    for f in sorted((ROOT / "benchmarks" / "results").rglob("b2*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("experiment") != "b2_7b" or not d.get("chunks") or d["gpus"] != 1:
                continue
            for c in d["chunks"]:
                passes = c["passes"]
                if len(c["layers"] if "layers" in c else sum(passes, [])) != 32:
                    continue
                n_tokens, n_micro = b2_tokens(c, n, sizes)
                key = (d["device_name"][:11], len(passes), round(c["seconds_collect_and_score"], 1))
                if key in seen:
                    continue
                seen.add(key)
                flops = [pass_flops_per_token(model, idx, p) for p in passes]
                new = estimate(flops, [n_tokens], "cuda:0", "bfloat16", 1, n_micro)
                took = c["seconds_collect_and_score"]
                rate = sum(flops) * n_tokens / max(took - MICRO_BATCH_S["cuda"] * n_micro
                                                   * len(passes), 1e-9)
                yield (f"{d['device_name'][:11]} {f.relative_to(ROOT / 'benchmarks' / 'results').parent}",
                       len(passes), c["estimate_s"], new, took, rate)


def main():
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    rows = list(cpu_rows(results)) if results else []
    rows += list(gpu_rows())
    print(f"rates now: {RATE_FLOPS}")
    print(f"{'run':48s} {'passes':>6s} {'old est':>8s} {'new est':>8s} {'measured':>8s} "
          f"{'old/meas':>8s} {'new/meas':>8s} {'rate':>10s}")
    for name, k, old, new, took, rate in rows:
        print(f"{name:48s} {k:6d} {old:8.1f} {new:8.1f} {took:8.1f} {old / took:8.2f} "
              f"{new / took:8.2f} {rate / 1e9:7.1f} GF/s")


if __name__ == "__main__":
    main()
