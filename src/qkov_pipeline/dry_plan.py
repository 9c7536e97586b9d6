"""What the chunk jobs of an experiment will do, before any of them runs (``qkov plan``).

The model is built on the meta device (random weights' shapes, or a local checkpoint's
config: no weight is read), placed over ``resources.collect.gpu`` cards as a job would
place it, and each chunk planned as its job would plan it (layerwise.plan_chunk): passes,
micro-batch, predicted peak memory per pass and the estimated seconds. Every sample is
taken at data.max_length tokens, the worst case.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CUDA_CONTEXT_GIB = 0.6   # what a process's CUDA context and cuBLAS take before the model


def dry_plan(exp: str | None, overrides: list[str], gpu_gib: float, threads: int = 4) -> dict:
    """The chunk jobs' plans (layerwise.plan_chunk) for ``exp`` on a GPU of ``gpu_gib``
    GiB (``resources.collect.gpu`` of them per job, the model placed over them), without
    data or memory: the model on the meta device (random weights, or a checkpoint
    folder's config: ``model.source: local``), every sample at
    data.max_length tokens (the worst case), the budget as a chunk job takes it (80% of
    the free memory after the model and a CUDA context, or resources.collect.chunk_memory_mb).
    ``exp``: a file of conf/experiment (None: the default); ``overrides``: Hydra overrides."""
    from interference.architectures import QKOVConfig, QKOVIndexer
    from interference.gradients.collect import stored_format
    from interference.models import DTYPES, build_from_config
    from interference.scores.layerwise import chunk_layers, plan_chunk

    from . import plan as qp

    exp = exp or "default"
    cfg = qp.build_plan(ROOT / "conf", ROOT / "workflow" / "schemas" / "config.schema.yaml",
                        [exp], list(overrides)).experiments[exp]
    mcfg, col = cfg["model"], cfg["resources"]["collect"]
    # random weights and checkpoint folders on the meta device (no weights read)
    model = build_from_config(mcfg, weights=False)[0]
    indexer = QKOVIndexer(model, QKOVConfig.from_model(model, include_bias=mcfg.get(
        "include_bias", False)))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_gpus = max(1, int(col.get("gpu") or 1))
    placement = None
    if n_gpus > 1:      # the model over the job's GPUs (interference.placement)
        from interference.placement import placement_summary, plan_placement

        cards = [f"cuda:{k}" for k in range(n_gpus)]
        card_free = (gpu_gib - CUDA_CONTEXT_GIB) * 2**30
        model.hf_device_map = plan_placement(model, cards, DTYPES[mcfg["dtype"]],
                                             {c: card_free for c in cards})
        placement = placement_summary(model)
        free = min(card_free - e["gib"] * 2**30 for e in placement.values())
    else:
        free = gpu_gib * 2**30 - model_bytes - CUDA_CONTEXT_GIB * 2**30
    budget = col["chunk_memory_mb"] * 2**20 if col.get("chunk_memory_mb") else 0.8 * free
    T = int(cfg["data"]["max_length"])
    sizes = [n for t in qp.pair_tasks(cfg) for n in qp._roles_of(cfg, t).values() if n]
    stored_sizes = sorted((n for t in qp.pair_tasks(cfg) for r, n in qp._roles_of(cfg, t).items()
                           if r != "fisher" and n), reverse=True)
    stored = [T] * sum(stored_sizes)
    fmt = stored_format(model, col.get("gradient_format", "dense"))
    host = 0.8 * float(col.get("mem_mb") or 0) * 2**20 or None   # the job's, as it plans
    chunks = []
    for layers in chunk_layers(indexer.layers, qp.layer_chunks(cfg)):
        plan = plan_chunk(model, indexer, layers, stored, [T] * sum(sizes), sizes,
                          cfg["fisher"]["store_dtype"], fmt, mcfg["dtype"], budget, "cuda",
                          threads, qp.MICRO_BATCH, n_tasks=len(qp.pair_tasks(cfg)),
                          score_rows=sum(stored_sizes[:2]), score_rows_all=sum(stored_sizes),
                          host_budget_bytes=host)
        chunks.append({"layers": layers, "passes": plan["passes"],
                       "micro_batch": plan["micro_batch"], "estimate_s": plan["estimate_s"],
                       "memory": plan["memory"], "rows_on_host": plan["rows_on_host"],
                       "host_rows_bytes": plan["host_rows_bytes"],
                       "score_tiles": plan["score_tiles"], "score_rows": plan["score_rows"]})
    return {"experiment": exp, "gpu_gib": gpu_gib, "model_bytes": model_bytes,
            "budget_bytes": budget, "format": fmt, "samples": sum(sizes), "tokens": T,
            "gpus_per_job": n_gpus, "placement": placement, "chunks": chunks}


def print_dry_plan(row: dict) -> None:
    """:func:`dry_plan`'s plan as text: the placement, each chunk's passes, micro-batch and
    estimated seconds, and each pass's predicted peak memory with its parts."""
    gib = 2**30
    n = row["gpus_per_job"]
    print(f"{row['experiment']} on {'a' if n == 1 else n} {row['gpu_gib']:.1f} GiB GPU"
          f"{'' if n == 1 else 's per job'}: model {row['model_bytes'] / gib:.1f} GiB, budget "
          f"per pass {row['budget_bytes'] / gib:.1f} GiB beyond it; {row['samples']} samples "
          f"of <= {row['tokens']} tokens, {row['format']} rows")
    for dev, e in (row["placement"] or {}).items():
        print(f"  {dev}: {e['blocks'][0]} .. {e['blocks'][1]} ({e['n_blocks']} blocks, "
              f"{e['gib']:.1f} GiB)")
    for c, ch in enumerate(row["chunks"]):
        print(f"chunk {c}: layers {ch['layers'][0]}-{ch['layers'][-1]} in {len(ch['passes'])} "
              f"pass(es), micro-batch {ch['micro_batch']}, about {ch['estimate_s']:.0f} s"
              + (f"; rows on the host (<= {ch['host_rows_bytes'] / gib:.1f} GiB a pass)"
                 if ch["rows_on_host"] else "")
              + (f"; scored in tiles ({ch['score_rows']} rows reserved)"
                 if ch["score_tiles"] else ""))
        for p, m in zip(ch["passes"], ch["memory"]):
            terms = ", ".join(f"{k} {m.get(k, 0) / gib:.1f}" for k in
                              ("rows", "staged", "grads", "cat", "copies", "fisher", "act",
                               "score"))
            print(f"  pass layers {p[0]}-{p[-1]}: predicted peak {m['peak'] / gib:.1f} GiB "
                  f"beyond the model (Fisher phase {m['fisher_phase'] / gib:.1f}, stored phase "
                  f"{m['stored_phase'] / gib:.1f}; {terms} GiB)")
