"""Collecting one task's Fisher and per-sample gradients role by role, and what a store's
manifest says about them: the library side of the workflow's collect jobs.

- :func:`make_collector`: a FisherCollector with the workflow's settings;
- :func:`collect_role`: samples [start, stop) of one role (the Fisher of mode ``mean`` summed
  one micro-batch unit per call, so shards and one job add the same sums in the same order);
- :func:`role_entry` / :func:`stored_entry`: a role's entry of store.json;
- :func:`disk_plan` / :func:`check_disk`: the store's size, refused before any work when the
  disk cannot hold it;
- :func:`take`: samples [start, stop) of a batch.
"""
from __future__ import annotations

import logging
import shutil
import time
import weakref
from pathlib import Path

import numpy as np

from ..results import size_text

logger = logging.getLogger("qkov.gradients")

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def take(batch: dict, start: int, stop: int) -> dict:
    """Samples [start, stop) of a batch: per-sample tensors and lists sliced, the rest kept."""
    import torch

    n = len(batch["sample_ids"])
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == n:
            out[key] = value[start:stop]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = list(value[start:stop])
        else:
            out[key] = value
    return out


def layer_bytes(indexer, tokens: list[int], store_dtype: str, gradient_format: str,
                model_dtype: str) -> dict[int, int]:
    """Layer -> bytes the store holds for samples of ``tokens`` (one count per sample).

    Dense rows: every head-slice value of the layer in ``store_dtype``. Factored
    (``gradient_format`` auto | factored, decided per projection and sample as
    :class:`FactorLayout` does): x [T, d_in] and δ [T, d_out] in the layout's factor dtype
    (``model_dtype``, or a bfloat16 / float16 ``store_dtype``), x counted
    once per projection (an upper bound: q/k/v_proj of LLaMA share one x), else the
    projection's full gradient in ``store_dtype``.
    """
    from .factored import DTYPES, FactorLayout, factor_dtype

    sb = DTYPES[store_dtype].itemsize
    per_layer = {layer: 0 for layer in indexer.layers}
    if gradient_format == "dense":
        for (layer, _), e in indexer.entries.items():
            per_layer[layer] += e.numel * sb * len(tokens)
        return per_layer
    layout = FactorLayout.from_indexer(indexer, gradient_format, store_dtype)
    fb = DTYPES[factor_dtype(DTYPES[model_dtype], store_dtype)].itemsize
    layer_of = {p["name"].rsplit(".", 1)[0]: int(k.split("|")[0])
                for k, parts in layout.parts_spec.items() for p in parts}
    for path, m in layout.modules.items():
        dense = sum(int(np.prod(s)) for s in m["shapes"].values()) * sb
        for T in tokens:
            factored = layout.fmt == "factored" or T * (m["d_in"] + m["d_out"]) * fb < \
                m["d_in"] * m["d_out"] * sb
            per_layer[layer_of[path]] += T * (m["d_in"] + m["d_out"]) * fb if factored else dense
    return per_layer


def disk_plan(n_params: int, n_stored: int, store_dtype: str,
              stored_bytes: int | None = None) -> dict:
    """Bytes of the final store and the peak while saving (spilled rows are moved, not
    copied). ``stored_bytes``: the rows' size when known (:func:`layer_bytes`, factored
    stores); else dense rows of ``n_params`` values in ``store_dtype``."""
    final = n_params * BYTES[store_dtype] * n_stored if stored_bytes is None else stored_bytes
    fisher = n_params * 8      # fisher.safetensors: the float64 Fisher of the task
    return {"final_bytes": int(final + fisher), "peak_bytes": int(final + fisher)}


def check_disk(where: Path, plan: dict, safety: float) -> None:
    """Refuse (RuntimeError, before any work) a store whose peak size exceeds ``safety`` x
    the free disk at ``where``."""
    free = shutil.disk_usage(where).free
    peak, kept = size_text(plan["peak_bytes"]), size_text(plan["final_bytes"])
    logger.info("gradient store: %s on disk (peak %s while saving); %s free at %s",
                kept, peak, size_text(free), where)
    if plan["peak_bytes"] > safety * free:
        raise RuntimeError(
            f"not enough disk for the gradient store at {where}: it needs up to "
            f"{peak} while saving ({kept} kept) but {size_text(free)} are free (workflow.disk_safety={safety}). Free space, point "
            "workflow.results at a bigger disk, use resources.collect.gradient_format=auto "
            "(factored rows where smaller), fisher.store_dtype=bfloat16 (half the size of "
            "dense rows), resources.collect.gradient_stores=false (nothing stored) or fewer "
            "scored/reference/control samples")


# Sustained FLOP rates of a collection (:func:`pass_flops_per_token` over the wall time of
# everything it does), measured, not peak (benchmarks/results/estimate_s26/calibrate.py):
# "cpu" per thread, float32 (a 2-core Intel Xeon with AMX, the default run's collect jobs:
# 78 and 81 GFLOP/s per thread, session 26; an AMD EPYC ran about 1.5x slower in session
# 19); bfloat16 on a GPU from B2 through the workflow, LLaMA-2-7B shape, collect and score
# (H200, 2 passes: 143-202 TFLOP/s since session 17; H100, 4 passes: 209-249). float32 on a
# GPU: assumed, not measured.
RATE_FLOPS = {"cpu": 80e9, "cuda/float32": 40e12, "cuda/bfloat16": 200e12,
              "cuda/float16": 200e12}
# Bytes per second at which a plan keeping its factored rows on the host moves them: each
# pass's rows to the host as they are collected and each layer's back to the card to be
# scored, both counted. Measured once (B2 on one H100, session 25: 125 GiB of rows, 30 s
# beyond the estimate of its 6 passes; benchmarks/results/estimate_s26/host_copy.py).
HOST_COPY_BYTES_S = 9e9
# Fixed cost of one micro-batch beyond its FLOPs (kernel launches of a whole forward and
# backward, the per-sample rows' gather and cat, Python), assumed, seconds: it prices the
# choice between fewer passes and smaller micro-batches (:func:`estimate`).
MICRO_BATCH_S = {"cpu": 0.005, "cuda": 0.03}


def pass_flops_per_token(model, indexer, layers: list[int]) -> float:
    """FLOPs per token of one forward + backward that collects the attention gradients of
    ``layers`` (an estimate):
      forward   2 per entry of every matrix that multiplies (the input and position
                embeddings are lookups, not products; an output projection tied to the input
                embedding multiplies);
      backward  2 per entry of the output projection and of the blocks from min(layers) up:
                activation gradients only, the weights being frozen (decoder layers taken
                as equal in size);
      per-sample weight gradients: 2 per attention entry of ``layers`` (each sample's
                Σ_t δ_t x_tᵀ from x and δ; the Fisher's squares and the norms are memory
                passes, not counted)."""
    matrices, n_head, n_layers, attention_of = _flop_counts(model, indexer)
    above = (n_layers - min(layers)) / n_layers
    attention = sum(attention_of.get(l, 0) for l in set(layers))
    return 2.0 * matrices + 2.0 * (n_head + above * (matrices - n_head)) + 2.0 * attention


# What a planner asks of one indexer for each of the hundreds of passes it prices (LLaMA-2-
# 70B's dry plan: 3,594 pass memories, 580 pass FLOPs), computed once: indexer -> {key: value}
_PLANNING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _planning(indexer) -> dict:
    return _PLANNING.setdefault(indexer, {})


def _param_shapes(indexer) -> dict:
    """{parameter name: torch.Size} of the indexer's model."""
    cache = _planning(indexer)
    if "shapes" not in cache:
        cache["shapes"] = {n: p.shape for n, p in indexer.model.named_parameters()}
    return cache["shapes"]


def _flop_counts(model, indexer) -> tuple[int, int, int, dict[int, int]]:
    """(entries of the matrices that multiply, of the output projection, decoder layers,
    {layer: attention entries}) of ``model``, counted once per indexer."""
    cache = _planning(indexer)
    if "flops" not in cache:
        from torch import nn

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") \
            else None
        head_w = getattr(head, "weight", None)
        lookups = {id(m.weight) for m in model.modules()
                   if isinstance(m, nn.Embedding) and m.weight is not head_w}
        matrices = sum(p.numel() for p in model.parameters()
                       if p.dim() >= 2 and id(p) not in lookups)
        attention_of: dict[int, int] = {}
        for (l, _), e in indexer.entries.items():
            attention_of[l] = attention_of.get(l, 0) + e.numel
        cache["flops"] = (matrices, head_w.numel() if head_w is not None else 0,
                          _dims(model)["n_layers"], attention_of)
    return cache["flops"]


def estimate(flops_per_token: list[float], tokens: list[int], device: str, model_dtype: str,
             threads: int, micro_batches: int = 0) -> float:
    """Seconds of gradient collection, roughly: for each pass (``flops_per_token``, one
    entry per pass: :func:`pass_flops_per_token`), its FLOPs over ``tokens`` at
    :data:`RATE_FLOPS` (per thread on the CPU), plus :data:`MICRO_BATCH_S` for each of its
    ``micro_batches`` micro-batches."""
    cpu = device.startswith("cpu")
    rate = RATE_FLOPS["cpu"] * max(1, threads) if cpu else RATE_FLOPS[f"cuda/{model_dtype}"]
    fixed = MICRO_BATCH_S["cpu" if cpu else "cuda"] * micro_batches
    n_tokens = float(sum(tokens))
    return sum(f * n_tokens / rate + fixed for f in flops_per_token)


def stored_format(model, gradient_format: str) -> str:
    """The format a collector with ``gradient_format`` stores for ``model``: factored rows
    need the hooks engine (causal LMs); other models keep dense rows."""
    from .objectives import default_objective
    from .per_sample import PerSampleGradients

    if gradient_format == "dense":
        return "dense"
    engine = PerSampleGradients.choose_engine(model, default_objective(model), "auto")
    return gradient_format if engine == "hooks" else "dense"


def collection_estimate(model, indexer, batches: dict, store_dtype: str, gradient_format: str,
                        gradient_memory_mb: float, device: str, threads: int,
                        micro_batch: int = 8) -> dict:
    """What collecting ``batches`` (role -> batch; 'fisher' rows are not stored) will take,
    before any work: ``rows_bytes`` (the stored gradients, :func:`layer_bytes`),
    ``disk`` (:func:`disk_plan`), ``memory_bytes`` (model + rows held within
    ``gradient_memory_mb`` + the float64 Fisher + one ``micro_batch``'s activations of the
    longest sample, :func:`activation_bytes`) and ``seconds`` (:func:`estimate`)."""
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    stored = [int(t) for role, b in batches.items() if role != "fisher"
              for t in b["attention_mask"].sum(1).tolist()]
    every = [int(t) for b in batches.values() for t in b["attention_mask"].sum(1).tolist()]
    fmt = stored_format(model, gradient_format)
    rows = sum(layer_bytes(indexer, stored, store_dtype, fmt, dtype).values())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fisher = 8 * indexer.total_size
    act = activation_bytes(model, indexer.layers, micro_batch, max(every)) if every else 0
    memory = model_bytes + min(rows, gradient_memory_mb * 2**20) + fisher + act
    flops = pass_flops_per_token(model, indexer, indexer.layers)
    return {"format": fmt, "rows_bytes": int(rows), "model_bytes": int(model_bytes),
            "fisher_bytes": int(fisher), "activation_bytes": int(act),
            "memory_bytes": int(memory),
            "disk": disk_plan(indexer.total_size, len(stored), store_dtype, rows),
            "seconds": estimate([flops], every, device, dtype, threads)}


def available_memory() -> int | None:
    """Bytes of host memory available now (Linux MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(est: dict, available: int | None, loaded: bool = True) -> None:
    """Refuse (RuntimeError, before any work) a CPU collection whose host memory (rows held
    within gradient_memory_mb + the float64 Fisher + a micro-batch's activations, plus the
    model unless ``loaded``) exceeds ``available`` bytes (None: not checked)."""
    need = est["memory_bytes"] - (est["model_bytes"] if loaded else 0)
    if available is not None and need > available:
        raise RuntimeError(
            f"not enough memory to collect: it needs about {size_text(need)} more (gradient rows "
            f"held in memory, the float64 Fisher of {size_text(est['fisher_bytes'])} and a "
            f"micro-batch's activations, {size_text(est['activation_bytes'])}) but "
            f"{size_text(available)} are available. Lower resources.collect.gradient_memory_mb "
            "(rows beyond it go to disk) or use resources.collect.gradient_stores=false "
            "(each layer's rows only while it is scored)")


def log_estimate(task: str, est: dict) -> None:
    act = est["activation_bytes"]
    logger.info("%s: estimate before collecting: %s of %s gradient rows (disk %s), memory "
                "about %s (model %s, rows held %s, Fisher %s, activations %s), about %.1f s of "
                "forward+backward", task, size_text(est["rows_bytes"]), est["format"],
                size_text(est["disk"]["final_bytes"]), size_text(est["memory_bytes"]),
                size_text(est["model_bytes"]),
                size_text(est["memory_bytes"] - est["model_bytes"] - est["fisher_bytes"] - act),
                size_text(est["fisher_bytes"]), size_text(act), est["seconds"])


def engine_micro_batch(setting, unit: int) -> int:
    """Samples per batched forward+backward of the gradient engine, from
    ``resources.collect.micro_batch``: a whole divisor of ``unit`` (the samples of one
    :func:`collect_role` call: one Fisher sum, one shard unit). A smaller micro-batch
    holds fewer activations; it changes the per-sample gradients only by float rounding,
    like the thread count. On the default CPU run it did not lower the collect job's peak
    (glibc's heap keeps what the activations free: benchmarks/RESULTS.md, session 7)."""
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1 or unit % setting:
        raise ValueError(f"resources.collect.micro_batch must be a whole divisor of {unit} "
                         f"(the samples summed per Fisher unit), got {setting!r}")
    return setting


def make_collector(f: dict, ex: dict, qcfg, spill: Path, partials: bool, micro_batch: int,
                   layers: list[int] | None = None, store_device="cpu",
                   keep_fisher_sums: bool = True):
    """A FisherCollector for the fisher settings ``f`` and the collect rule's execution
    settings ``ex`` (gradient_memory_mb, gradient_format), spilling to ``spill``;
    ``layers``: only these (layer chunks), rows kept on ``store_device``;
    ``keep_fisher_sums`` False for a chunk that scores and never saves its Fisher."""
    from .fisher import FisherCollector

    return FisherCollector(
        enable_cross_task_analysis=True,
        gradient_memory_mb=float(ex.get("gradient_memory_mb", 1024)),
        ema_decay=f["ema_decay"], store_dtype=f["store_dtype"], spill_dir=spill, config=qcfg,
        loss_reduction=f["loss_reduction"], progress=False, micro_batch=micro_batch,
        fisher_partials=partials, gradient_format=ex.get("gradient_format", "dense"),
        layers=layers, store_device=store_device, keep_fisher_sums=keep_fisher_sums)


def collect_role(collector, model, batch: dict, task: str, role: str, mode: str,
                 start: int, stop: int, micro_batch: int) -> dict:
    """Samples [start, stop) of one role, one micro-batch unit per call (the engine's own
    micro-batches, so the same numbers), under one progress bar counting the role's samples
    (rate, ETA). The Fisher (mode mean) is summed one unit per call, so shards (whole units)
    and one job add the same sums in the same order; mode ema takes one call (one update).
    Returns n, per-sample losses (batch order), sample ids, seconds."""
    from tqdm.auto import tqdm

    t = time.time()
    calls = [(a, min(a + micro_batch, stop)) for a in range(start, stop, micro_batch)]
    if role == "fisher" and mode != "mean":
        calls = [(start, stop)]
    losses, ids = [], []
    with tqdm(total=stop - start, desc=f"{task} ({role})", unit="sample") as bar:
        for a, b in calls:
            res = collector.collect_fisher(model, take(batch, a, b), task=task, mode=mode,
                                           role=role)
            losses += res["losses"]
            ids += list(res["sample_ids"])
            bar.update(b - a)
    return {"n": stop - start, "losses": losses, "sample_ids": ids, "seconds": time.time() - t}


def role_entry(batch: dict, losses: list[float], ids: list[str], seconds: float) -> dict:
    n = len(ids)
    return {"n": n, "mean_loss": sum(losses) / n, "seconds": seconds,
            "seconds_per_sample": seconds / n, "sample_ids": list(ids),
            "mean_tokens": float(batch["attention_mask"].sum(1).float().mean())}


def stored_entry(store, task: str, role: str) -> dict:
    import numpy as np

    ids = store.ids(task, role)
    norms = [float(x) for x in store.grad_norms(task, ids)]
    return {"grad_norms": norms, "mean_grad_norm": float(np.mean(norms)),
            "losses": [store.losses[(task, i)] for i in ids]}


def check_shards(task: str, shards: list[dict], dirs: list, ids_by_role: dict[str, list]) -> None:
    """The shard manifests (sorted by index) form shards 0..n-1 of one plan, one store folder
    each, and together hold every sample of every role once, in the data's order."""
    if [m["index"] for m in shards] != list(range(len(shards))) or \
            any(m["n_shards"] != len(shards) for m in shards) or len(dirs) != len(shards):
        raise ValueError(f"{task}: the shard manifests do not form shards 0..{len(shards) - 1} "
                         f"of one plan: {[(m['index'], m['n_shards']) for m in shards]}")
    for role, ids in ids_by_role.items():
        got = [i for m in shards for i in m["roles"].get(role, {}).get("sample_ids", [])]
        if got != [str(i) for i in ids]:
            raise ValueError(f"{task}/{role}: the shards collected {len(got)} samples, not the "
                             f"data's {len(ids)} in order")


# ------------------------------------------------------------------ memory of one layer pass


def _dims(model) -> dict:
    """Width h, MLP width, layers, vocabulary, heads and attention kind of a decoder."""
    c = model.config
    h = getattr(c, "hidden_size", None) or c.n_embd
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h
    return {"h": int(h), "inter": int(inter),
            "n_layers": int(getattr(c, "num_hidden_layers", None) or c.n_layer),
            "vocab": int(c.vocab_size),
            "heads": int(getattr(c, "num_attention_heads", None) or c.n_head),
            "eager": getattr(c, "_attn_implementation", "eager") == "eager"}


def activation_bytes(model, layers: list[int], micro_batch: int, max_tokens: int) -> int:
    """Bytes saved for the backward of one micro-batch (``micro_batch`` samples padded to
    ``max_tokens``) when gradients start at ``min(layers)``: per token and block from there
    up, 12 h-wide and 4 MLP-wide values in the model dtype plus two float32 norm inputs
    (eager attention: + 2 x heads x T probabilities), and for the loss: where the logits are
    the output projection's (objectives.plain_lm_head) one block of rows' float32 logits
    and an h-wide gradient per token (objectives.head_token_nll), else the logits and their
    gradient (model dtype; objectives.token_nll). An estimate."""
    from .objectives import block_rows, plain_lm_head

    d, b = _dims(model), next(model.parameters()).element_size()
    per_token = b * (12 * d["h"] + 4 * d["inter"]) + 8 * d["h"]
    if d["eager"]:
        per_token += 2 * b * d["heads"] * max_tokens
    tokens = micro_batch * max_tokens
    above = d["n_layers"] - min(layers)
    if plain_lm_head(model) is None:
        loss = tokens * 2 * d["vocab"] * b
    else:
        cuda = next(model.parameters()).is_cuda
        loss = min(tokens, block_rows(d["vocab"], cuda)) * d["vocab"] * 4 + tokens * d["h"] * b
    return int(tokens * above * per_token + loss)


def pass_memory(indexer, layers: list[int], rows_bytes: int, micro_batch: int,
                max_tokens: int, gradient_format: str = "dense", store_dtype: str = "float32",
                n_tasks: int = 1, score_rows: int = 0, staged_bytes: int = 0) -> dict:
    """Peak bytes of one pass over ``layers`` (beyond the model), micro-batch ``micro_batch``,
    the Fisher samples of every task collected before any stored row (layerwise._collect),
    then the pass's (layer, block)s scored.

    With P = the pass's attention parameters (canonical entries), P1 = the largest
    projection's weight, Pb = the largest (layer, block) entry and m = ``micro_batch``
    (bytes), ``gradient_format`` the stored format (:func:`stored_format`):
      rows   = ``rows_bytes``: the pass's stored rows of every sample (:func:`layer_bytes`);
      act    = :func:`activation_bytes` (freed as the backward runs);
      values = 4 P ``n_tasks``: each task's float32 Fisher, made on the device when its
               sums are folded (TaskFisher.flush) and held there from the stored roles on;
      score  = values + 4 P + max(4 P ``n_tasks``, 4 ``score_rows`` Pb): the pooled
               Fisher, and either its transient stack of the tasks' or one (layer,
               block)'s operands of the largest arm (``score_rows`` rows; the metric tiles
               within its own budget beyond that); ``score_fixed`` = values + 4 P, what
               scoring holds besides the operands (scores.chunks.operand_budget_mb);
    dense rows (every per-sample gradient formed, then flattened into rows [m, P]):
      grads  = 4 m P: the hooks' float32 per-sample weight gradients [m, *param];
      copies = 4 m (P_c + P_1): ``flatten_rows``'s head-major pieces that are copies
               (P_c: parameters of those blocks; index_select copies them all), held until
               the cat, and one piece's permuting intermediate (P_1: the largest block);
      cat    = 4 m P: the [m, P] float32 rows (``grads`` stays live while they are used;
               on a device of per_sample.LAG_DEVICES a micro-batch's rows live through
               the next one's forward and backward, before its ``grads`` exist: act + grads);
      fisher = 24 P: a Fisher micro-batch's float64 running Σ g², one sample's float64
               copy and its square;
      store  = 4 P: the store's copy of one sample's row;
      peak = max(fisher phase: max(act + grads, grads + copies + cat, grads + cat + fisher),
                 stored phase: rows + values + max(act + grads, grads + copies + cat,
                                                   grads + cat + store), rows + score);
    factored rows (x and δ kept; each projection's per-sample gradients formed one at a
    time and reduced at once: per_sample._HookCapture):
      grads  = 4 m (P1 + P_d): one projection's per-sample gradients and those of the
               projections a ``max_tokens`` sample keeps dense (P_d);
      fisher = 8 P (``n_tasks`` + 2): the float64 sums of every task held on the device
               until the stored roles (TaskFisher.pending), a micro-batch's per-parameter
               Σ g² and their head-major copy, plus 4 m P1 + 8 P1 while one projection's
               squares are formed;
      norms  = 12 m P1: a stored micro-batch's per-sample norms (the covered values'
               copy and its float64 cast);
      staged = ``staged_bytes``: with the rows kept on the host (``rows_bytes`` 0), the
               device copies of one layer's factors while its blocks are rebuilt and
               scored (layerwise.plan_chunk: twice the layer's rows);
      peak = max(fisher + max(act, 4 m P1 + 8 P1), rows + values + act + grads + norms,
                 rows + staged + score).
    """
    mine = [(l, b) for (l, b) in indexer.entries if l in layers]
    P = sum(indexer.entries[k].numel for k in mine)
    Pb = max(indexer.entries[k].numel for k in mine)
    m = int(micro_batch)
    act = activation_bytes(indexer.model, layers, m, max_tokens)
    values = 4 * P * int(n_tasks)
    score = values + 4 * P + max(values, 4 * int(score_rows) * Pb)
    if gradient_format != "dense":
        out = _factored_pass(indexer, mine, P, m, int(rows_bytes), act, values, score,
                             gradient_format, store_dtype, max_tokens, n_tasks,
                             int(staged_bytes))
        return dict(out, score_fixed=values + 4 * P)
    Pc = sum(indexer.entries[k].numel for k in mine if not _gathered_view(indexer, *k))
    out = {"rows": int(rows_bytes), "grads": 4 * m * P, "cat": 4 * m * P,
           "copies": 4 * m * (Pc + Pb) if Pc else 0, "fisher": 24 * P, "store": 4 * P,
           "act": act, "values": values, "score": score, "score_fixed": values + 4 * P}
    g, c = out["grads"], out["cat"]
    base = max(out["act"] + g, g + out["copies"] + c)
    out["fisher_phase"] = max(base, g + c + out["fisher"])
    out["stored_phase"] = out["rows"] + values + max(base, g + c + out["store"])
    out["transient"] = out["stored_phase"] - out["rows"]
    out["peak"] = max(out["fisher_phase"], out["stored_phase"], out["rows"] + score)
    return out


def _factored_pass(indexer, mine, P: int, m: int, rows: int, act: int, values: int, score: int,
                   gradient_format: str, store_dtype: str, max_tokens: int,
                   n_tasks: int, staged: int = 0) -> dict:
    """:func:`pass_memory` of a factored store (see there)."""
    from .factored import FactorLayout

    shapes = _param_shapes(indexer)
    names = {p.name for k in mine for p in indexer.entries[k].parts}
    P1 = max(shapes[n].numel() for n in names if n.endswith("weight"))
    # one layout per indexer and format (B2: 66 layouts of 32 layers took 4.4 s of a chunk
    # job's 7 s plan)
    built = _planning(indexer)
    key = ("layout", gradient_format, store_dtype)
    if key not in built:
        built[key] = FactorLayout.from_indexer(indexer, gradient_format, store_dtype)
    layout = built[key]
    dense = sum(shapes[n].numel() for n in names
                if n.rsplit(".", 1)[0] in layout.modules and
                not layout.factored(n.rsplit(".", 1)[0], max_tokens))
    out = {"rows": rows, "grads": 4 * m * (P1 + dense), "cat": 0, "copies": 0,
           "fisher": 8 * P * (int(n_tasks) + 2), "store": 0, "norms": 12 * m * P1,
           "act": act, "values": values, "score": score, "staged": staged}
    out["fisher_phase"] = out["fisher"] + max(act, 4 * m * P1 + 8 * P1)
    out["stored_phase"] = rows + values + act + out["grads"] + out["norms"]
    out["transient"] = out["stored_phase"] - rows
    out["peak"] = max(out["fisher_phase"], out["stored_phase"], rows + staged + score)
    return out


def _gathered_view(indexer, layer: int, block: str) -> bool:
    """Whether ``flatten_rows``'s piece of (layer, block) is a view of the per-sample
    gradients (no copy), decided on meta tensors (no memory)."""
    import torch

    shapes = _param_shapes(indexer)
    names = [p.name for p in indexer.entry(layer, block).parts]
    fake = {n: torch.empty((1, *shapes[n]), device="meta") for n in names}
    piece = indexer.gather(fake, layer, block).flatten(1)
    return any(piece._base is t for t in fake.values())


def gathered_entries(shards: list[dict], batches: dict, store, task: str,
                     roles: list[str]) -> dict[str, dict]:
    """role -> the store.json entry of a task gathered from its shards' records (losses,
    ids and seconds in shard order; stored roles' norms from the gathered ``store``)."""
    out = {}
    for role in roles:
        parts = [m["roles"][role] for m in shards if role in m["roles"]]
        out[role] = role_entry(batches[role], [x for p in parts for x in p["losses"]],
                               [i for p in parts for i in p["sample_ids"]],
                               sum(p["seconds"] for p in parts))
        if role != "fisher":
            out[role].update(stored_entry(store, task, role))
    return out


def shard_summaries(shards: list[dict]) -> list[dict]:
    """Per shard (in index order): where and how long it ran, and its samples per role."""
    keys = ("index", "device", "device_info", "threads", "seconds_collect", "seconds_total",
            "started", "finished", "ranges")
    return [{**{k: m[k] for k in keys}, "n": {r: v["n"] for r, v in m["roles"].items()}}
            for m in sorted(shards, key=lambda m: m["index"])]
