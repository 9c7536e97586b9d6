"""One layer chunk of a model as a job: its memory budget and its plan (the library side of
rule ``chunk_scores``; qkov_pipeline.stages.chunks reads the inputs and writes the
outputs). The join of the chunks' saved heatmaps, rule ``scores``, is .join.
"""
from __future__ import annotations

import logging

from ..architectures import QKOVConfig, QKOVIndexer
from ..gradients.collect import stored_format
from ..results import size_text
from .layerwise import chunk_layers, plan_chunk

logger = logging.getLogger("qkov.scores")


CPU_PASS_MB = 1024     # a CPU chunk pass's budget when neither setting gives one


def memory_budget(chunk_memory_mb: float | None, gradient_memory_mb: float,
                  device: str) -> float:
    """Bytes one pass may peak at beyond the model (stored rows, a micro-batch's per-sample
    gradients and their copy, the Fisher's float64 sums, activations: collect.pass_memory):
    ``chunk_memory_mb``, else the automatic device budget after the model
    (``device.memory_budget_mb``: 80% of the GPU's free memory; 20% left for the CUDA
    context, cuBLAS workspaces, the scoring and the estimate's error), else
    ``gradient_memory_mb`` on the CPU (``CPU_PASS_MB`` when that is 0, the default:
    records then stream to disk in store runs, but a chunk's pass holds its rows)."""
    if chunk_memory_mb:
        return float(chunk_memory_mb) * 2**20
    if device.startswith("cuda"):
        from ..device import memory_budget_mb

        return memory_budget_mb("auto", device) * 2**20
    return float(gradient_memory_mb or CPU_PASS_MB) * 2**20


def plan_chunk_job(model, batches: dict, index: int, n_chunks: int, *, include_bias: bool,
                   store_dtype: str, gradient_format: str, model_dtype: str, budget: float,
                   device: str, threads: int, micro_batch: int,
                   attention_stack: str | None = None, host_budget: float | None = None
                   ) -> dict:
    """Chunk ``index`` of ``n_chunks``: its layers, passes, micro-batch and estimate (peak
    memory per pass in bytes, seconds; layerwise.plan_chunk), logged before any collection.
    ``batches``: task -> role -> batch. Refuses (ValueError) a chunk index past the model's
    layers and a chunk whose single layer does not fit ``budget`` at micro-batch 1.
    ``attention_stack``: the stack an encoder-decoder maps (QKOVConfig.from_model).
    ``host_budget``: host bytes a pass's factored rows may take where keeping them there
    (not on the GPU) is estimated faster, their copies included (layerwise.plan_chunk)."""
    qcfg = QKOVConfig.from_model(model, include_bias=include_bias,
                                 attention_stack=attention_stack)
    indexer = QKOVIndexer(model, qcfg)
    chunks = chunk_layers(indexer.layers, n_chunks)
    if index >= len(chunks):
        raise ValueError(f"chunk {index}: the model has {len(indexer.layers)} attention "
                         f"layers, so only {len(chunks)} chunks (layer_chunks={n_chunks})")
    tokens = {(t, r): [int(x) for x in b["attention_mask"].sum(1).tolist()]
              for t, by_role in batches.items() for r, b in by_role.items()}
    stored_sizes = sorted((len(v) for (_, r), v in tokens.items() if r != "fisher"),
                          reverse=True)
    plan = plan_chunk(model, indexer, chunks[index],
                      [x for (_, r), v in tokens.items() if r != "fisher" for x in v],
                      [x for v in tokens.values() for x in v], [len(v) for v in tokens.values()],
                      store_dtype, stored_format(model, gradient_format), model_dtype, budget,
                      device, threads, micro_batch, n_tasks=len(batches),
                      score_rows=sum(stored_sizes[:2]),     # the largest arm, at most
                      score_rows_all=sum(stored_sizes),     # task A and every set at once
                      host_budget_bytes=host_budget)
    # float64 sums per task on the host; on a GPU they are dropped once the values are made
    # (keep_fisher_sums=False), never copied to the host
    fisher_bytes = 0 if str(device).startswith("cuda") else 8 * len(batches) * sum(
        e.numel for (l, _), e in indexer.entries.items() if l in chunks[index])
    mem = plan["memory"][0]
    logger.info("chunk %d of %d: layers %s in %d pass(es) of <= %d layers, micro-batch %d; "
                "peak beyond the model <= %s per pass (budget %s; rows %s, per-sample "
                "gradients %s, Fisher sums %s, activations %s, scoring %s); host Fisher %s; "
                "about %.1f s of forward+backward", index, len(chunks), chunks[index],
                len(plan["passes"]), max(len(p) for p in plan["passes"]), plan["micro_batch"],
                size_text(max(plan["peaks"])), size_text(budget), size_text(plan["rows_bytes"]),
                size_text(mem["grads"] + mem["cat"]), size_text(mem["fisher"]),
                size_text(mem["act"]), size_text(mem["score"]), size_text(fisher_bytes),
                plan["estimate_s"])
    if plan["rows_on_host"] or plan["score_tiles"]:
        logger.info("chunk %d: %s", index, "; ".join(filter(None, [
            plan["rows_on_host"] and f"rows kept on the host (<= "
            f"{size_text(plan['host_rows_bytes'])} a pass), one layer's copied to the device "
            "while it is scored",
            plan["score_tiles"] and f"each (layer, block) scored in tiles of rows (operands "
            f"of {plan['score_rows']} rows reserved)"])))
    if plan["micro_batch"] != micro_batch:
        logger.warning("chunk %d: micro-batch %d instead of %d to fit the budget: the Fisher "
                       "is summed in other units, so cells.csv may differ from the stores' "
                       "run in the last digits", index, plan["micro_batch"], micro_batch)
    return dict(plan, index=index, n_chunks=len(chunks), layers=chunks[index],
                qkov_config=qcfg, fisher_bytes=fisher_bytes, budget_bytes=budget)


def operand_budget_mb(plan: dict) -> float:
    """The scoring operands' device budget (QKOVInterferenceMetric's ``device_memory_mb``)
    that keeps every pass of a chunk plan within its budget: the least, over the passes, of
    the budget less the pass's rows and what scoring holds besides the operands (the
    Fisher values and the pooled Fisher: ``score_fixed``; with rows on the host, the
    staged copies of the layer being scored). The planner made each pass fit one (layer,
    block)'s operands of the rows it reserved (``score_rows``: the largest arm's, or a
    tile's), so this is at least those; the one pass over every disruptor set
    (score_arms) runs where it fits, else set by set."""
    room = min(plan["budget_bytes"] - m["rows"] - m.get("staged", 0) - m["score_fixed"]
               for m in plan["memory"])
    return max(room, 0) / 2**20


def peak_device_bytes(device: str) -> int | None:
    """The most memory PyTorch allocated on a CUDA ``device`` so far (None on the CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(torch.device(device)))
