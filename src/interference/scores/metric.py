"""The QK-OV interference score and heatmaps (SPEC section 5).

    M^B_{ij,l,h} = Σ_{k in S(B,l,h)} C_{i,k} / (max(Î_k, ε) + λ) · |g_{j,k}|

computed per (layer, block) as one contraction over all heads and pairs,
``einsum('ahs,hs,bhs->abh', G_A², 1/D, |G_B|)`` (``contraction.contract``: a fused Triton
kernel on CUDA, a batched GEMM elsewhere).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from .._tables import BACKENDS, BLOCKS, SHARED_BLOCKS
from ..architectures import QKOVConfig
from ..device import memory_budget_mb, prefetched, resolve_device, to_device
from ..settings import MetricSettings
from ..settings import choice as _choice
from . import contraction
from .contraction import PRECISIONS, apply_op, contract, contract_sets

logger = logging.getLogger("fisher.qkov")

WEIGHT_TABLE_DEVICES = ("cuda",)   # where 1 / D is made for all (layer, block)s at once
WEIGHT_SPAN = 2 ** 24            # entries of the Fisher made float64 at a time for 1 / D
PINNED_MAX_BYTES = 2 ** 26       # scores copied to the host through pinned memory up to this


class QKOVInterferenceMetric:
    """Fisher-normalised interference between samples of two tasks, per block/layer/head.

    Args:
        config: the model's QKOVConfig.
        fisher_collector: a FisherCollector holding both tasks' Fisher and gradients.
        epsilon: floor ε of Î.
        ridge_lambda: absolute ridge λ_abs.
        ridge_lambda_rel: λ = max(λ_abs, ridge_lambda_rel · median Î over the (layer, block)).
        fisher_source: 'pooled' ((Î_A + Î_B)/2), 'a' or 'b'.
        aggregate: 'sum' over the slice, or 'mean' (divided by the slice size).
        variant: 'qkov' | 'signed' | 'symmetric' | 'fisher_weighted' (SPEC 5).
        gj_norm: 'none' or 'l2' (g_j divided by its L2 norm over all attention parameters).
        top_k: number of entries in each block's ``top_conflicts``.
        device: where contractions run (default: CUDA when available).
        backend: 'auto' (the fused Triton kernel on CUDA, else torch), 'torch' or 'triton'.
        device_memory_mb: budget of the operands on the device (task-A and task-B gradient
            rows, float32): the next (layer, block)'s rows are copied in while the current
            one is scored when two blocks' rows fit, a block is scored alone when one fits,
            larger blocks in tiles of rows that fit. 'auto' (default): 80% of the card's
            free memory now on CUDA, no limit on the CPU; None: no limit.
        precision: products in the Triton kernel: 'bf16x3' (the default) or 'tf32x3', both
            float32-accurate on the benchmarks (~7e-7; at most 2^-16 and 2^-21 relative per
            term), 'ieee' (no tensor cores) or 'tf32' (~1e-3, not for results).
    """

    def __init__(self, config: QKOVConfig, fisher_collector, epsilon: float = 1e-10,
                 ridge_lambda: float = 1e-8, ridge_lambda_rel: float = 0.0,
                 fisher_source: str = "pooled", aggregate: str = "sum", variant: str = "qkov",
                 gj_norm: str = "none", top_k: int = 100, device: str | None = None,
                 backend: str = "auto", precision: str = "bf16x3",
                 device_memory_mb: float | str | None = "auto"):
        self.config, self.fisher_collector = config, fisher_collector
        self.options = MetricSettings(epsilon, ridge_lambda, ridge_lambda_rel, fisher_source,
                                      aggregate, variant, gj_norm)
        self.top_k = int(top_k)
        self.device = torch.device(resolve_device(device))
        self.backend = _choice("backend", backend, BACKENDS)
        self.precision = _choice("precision", precision, PRECISIONS)
        self._device_memory_setting = device_memory_mb
        self.device_memory_mb = memory_budget_mb(device_memory_mb, self.device)
        self.prefetch = self.device.type == "cuda"   # overlap copies with the kernel
        self._held: dict[tuple, torch.Tensor] = {}   # (task, ids) -> rows [n, P] on the device
        self._fisher_cache = None                    # (Fisher values, their mean on the device)
        self._lambda_cache = (None, {})              # (Fisher vector, (layer, block) -> λ)
        self._weight_cache = (None, None)            # (Fisher vector, _weight_table's)
        self._cfg_check()

    def _cfg_check(self):
        ccfg = getattr(self.fisher_collector, "config", None)
        if ccfg is not None:
            for f in ("num_heads", "num_kv_heads", "head_dim", "v_head_dim", "num_layers"):
                if getattr(ccfg, f) != getattr(self.config, f):
                    raise ValueError(f"config.{f}={getattr(self.config, f)} but the collector's "
                                     f"model has {getattr(ccfg, f)}")

    # the score's settings, read-only (self.options: a frozen MetricSettings)
    epsilon = property(lambda self: self.options.epsilon)
    ridge_lambda = property(lambda self: self.options.ridge_lambda)
    ridge_lambda_rel = property(lambda self: self.options.ridge_lambda_rel)
    fisher_source = property(lambda self: self.options.fisher_source)
    aggregate = property(lambda self: self.options.aggregate)
    variant = property(lambda self: self.options.variant)
    gj_norm = property(lambda self: self.options.gj_norm)

    @property
    def left_op(self) -> str:
        """f of the contraction, applied to task A's rows (the task-A Fisher's, 'identity',
        for fisher_weighted)."""
        return {"qkov": "square", "signed": "identity", "symmetric": "abs",
                "fisher_weighted": "identity"}[self.variant]

    @property
    def right_op(self) -> str:
        """g of the contraction, applied to the disruptors' rows."""
        return "identity" if self.variant == "signed" else "abs"

    def warm_up(self, n_a: int, n_js) -> None:
        """Compile the contraction kernel for ``n_a`` task-A samples against sets of each of
        ``n_js`` samples, for every block's head count (:func:`contraction.warm_up`; nothing
        to do off CUDA), e.g. in a thread while the gradients are collected."""
        heads = [self.config.block_heads(b) for b in BLOCKS]
        contraction.warm_up(self.device, 1 if self.variant == "fisher_weighted" else n_a,
                            n_js, heads, self.left_op, self.right_op, self.backend,
                            self.precision)

    def settings(self) -> dict:
        """The score's settings as a plain dict (saved in a heatmap's meta)."""
        return self.options.to_dict()

    def compute_settings(self) -> dict:
        """How (not what) the metric computes: plain values that rebuild an equal metric
        with :meth:`settings` (``QKOVInterferenceMetric(config, collector, **settings,
        **compute_settings)``)."""
        return {"top_k": self.top_k, "device": str(self.device), "backend": self.backend,
                "precision": self.precision, "device_memory_mb": self._device_memory_setting}

    # -- inputs -----------------------------------------------------------------------
    @property
    def _store(self):
        return self.fisher_collector.gradient_manager

    def scored_ids(self, task: str) -> list[str]:
        ids = self.fisher_collector.sample_ids(task, "scored")
        if not ids:
            raise ValueError(f"task {task!r} has no scored samples: collect them with "
                             f"collect_fisher(model, batch, task={task!r}, role='scored') and "
                             f"FisherCollector(enable_cross_task_analysis=True)")
        return ids

    def fisher_tasks(self, task_a: str, task_b: str) -> tuple[str, ...]:
        return {"pooled": (task_a, task_b), "a": (task_a,), "b": (task_b,)}[self.fisher_source]

    def _fisher_vector(self, tasks: tuple[str, ...]) -> torch.Tensor:
        """The normalising Fisher [P] float32 (mean of ``tasks``' Fisher), on the device;
        made once while the tasks' Fisher values are unchanged (their tensors are the key)."""
        values = [self.fisher_collector.fisher.get(t) for t in tasks]
        cached = self._fisher_cache
        if cached is not None and len(cached[0]) == len(values) and \
                all(a is b for a, b in zip(cached[0], values)):
            return cached[1]
        vec = torch.stack(values).mean(0).to(self.device)
        self._fisher_cache = (values, vec)
        return vec

    def _slice(self, vec: torch.Tensor, layer: int, block: str) -> torch.Tensor:
        offset, n_heads, size = self._store.entries[(layer, block)]
        return vec[offset:offset + n_heads * size].view(n_heads, size)

    def _ridge(self, fisher: torch.Tensor, layer: int, block: str, f: torch.Tensor) -> float:
        """λ of one (layer, block) of the Fisher vector ``fisher``, from its slice ``f``
        (float64) where ``f`` lives; cached per Fisher vector (several uses per heatmap)."""
        if self._lambda_cache[0] is not fisher:
            self._lambda_cache = (fisher, {})
        lams = self._lambda_cache[1]
        if (layer, block) not in lams:
            lam = self.ridge_lambda
            if self.ridge_lambda_rel:
                lam = max(lam, self.ridge_lambda_rel * median(f))
            lams[(layer, block)] = lam
        return lams[(layer, block)]

    def denominator(self, fisher: torch.Tensor, layer: int, block: str):
        """D [n_block_heads, s] = max(Î, ε) + λ for one (layer, block), with λ and the share
        of parameters where λ > Î."""
        f = self._slice(fisher, layer, block).double()
        lam = self._ridge(fisher, layer, block, f)
        d = f.clamp_min(self.epsilon) + lam
        return d.float(), lam, float((f < lam).double().mean())

    def ridge_table(self, fisher: torch.Tensor, layers) -> dict:
        """'L{layer}.{block}' -> {'lambda', 'share_lambda_gt_fisher'} (one device sync)."""
        table = self._weight_table(fisher)
        if table is not None:               # λ is one number, the shares are made
            return {f"L{layer}.{block}": {"lambda": self.ridge_lambda,
                                          "share_lambda_gt_fisher": table[1][(layer, block)]}
                    for layer in layers for block in BLOCKS}
        keys, lams, shares = [], [], []
        for layer in layers:
            for block in BLOCKS:
                keys.append(f"L{layer}.{block}")
                f = self._slice(fisher, layer, block).double()
                lam = self._ridge(fisher, layer, block, f)
                lams.append(lam)
                shares.append((f < lam).double().mean())
        shares = torch.stack(shares).tolist() if shares else []
        return {k: {"lambda": lam, "share_lambda_gt_fisher": sh}
                for k, lam, sh in zip(keys, lams, shares)}

    def _check_disjoint(self, fisher_tasks, ids_by_task: dict[str, list[str]]):
        bank = self.fisher_collector.fisher
        allowed = getattr(self.fisher_collector, "_all_role_ids", set())
        fisher_ids = {s for t in fisher_tasks for s in bank.tasks[t].sample_ids}
        for task, ids in ids_by_task.items():
            bad = [s for s in ids if s in fisher_ids and (task, s) not in allowed]
            if bad:
                raise ValueError(f"scored/reference samples {bad[:5]} of task {task!r} are also "
                                 f"Fisher samples of {fisher_tasks}; the normaliser must not "
                                 f"see the samples it scores (SPEC 4)")

    def _heads(self, heads) -> list[int]:
        heads = list(range(self.config.num_heads)) if heads is None else [int(h) for h in heads]
        bad = [h for h in heads if not 0 <= h < self.config.num_heads]
        if bad or not heads:
            raise IndexError(f"heads {bad or heads} outside [0, {self.config.num_heads})")
        return heads

    def _layers(self, layers) -> list[int]:
        known = self.fisher_collector.layers
        layers = list(known) if layers is None else [int(l) for l in layers]
        for l in layers:
            if l not in known:
                raise KeyError(f"Could not find parameter for L{l} Q: the model's attention "
                               f"layers are {known[0]}..{known[-1]}")
        return layers

    # -- the contraction --------------------------------------------------------------
    def _rows(self, task, ids, layer, block) -> torch.Tensor:
        """[n, Hb, s] gradient rows on the device: a view of the resident rows when they
        are held (see _hold_rows), else a factored store rebuilds them there and a dense
        store's host rows are copied through pinned memory (non-blocking)."""
        held = self._held.get((task, tuple(ids)))
        if held is not None:
            offset, n_heads, size = self._store.entries[(layer, block)]
            return held[:, offset:offset + n_heads * size].view(len(ids), n_heads, size)
        if self._store.layout is not None:
            return self._store.block(task, ids, layer, block, device=self.device)
        return to_device(self._store.block(task, ids, layer, block), self.device)

    def _left(self, task_a, ids_a, layer, block) -> tuple[torch.Tensor, str]:
        """(left [n_a, Hb, s] or the task-A Fisher [1, Hb, s], f) on the device."""
        if self.variant == "fisher_weighted":
            left = self._slice(self.fisher_collector.fisher.get(task_a), layer, block)[None]
            return to_device(left, self.device), self.left_op
        return self._rows(task_a, ids_a, layer, block), self.left_op

    def _right(self, task_j, ids_j, layer, block):
        """(right [n_j, Hb, s], g, norms [n_j] or None) on the device."""
        right = self._rows(task_j, ids_j, layer, block)
        norms = None
        if self.gj_norm == "l2":
            norms = torch.as_tensor(self._store.grad_norms(task_j, ids_j), dtype=torch.float32
                                    ).to(self.device).clamp_min(1e-30)
        return right, self.right_op, norms

    def _weight(self, fisher, layer, block) -> torch.Tensor:
        """1 / D [Hb, s] float32 on ``fisher``'s device (the device: see _fisher_vector)."""
        table = self._weight_table(fisher)
        if table is not None:
            return self._slice(table[0], layer, block)
        f = self._slice(fisher, layer, block).double()
        return (f.clamp_min(self.epsilon) + self._ridge(fisher, layer, block, f)
                ).float().reciprocal()

    def _weight_table(self, fisher) -> tuple[torch.Tensor, dict] | None:
        """(1 / D [P] float32, (layer, block) -> share of its entries where λ > Î) of every
        (layer, block) at once, made once per Fisher vector: on CUDA, when λ is one number
        (no relative ridge) and the table and its temporaries (13 bytes an entry) take at
        most 1/16 of the device budget; else None (each (layer, block) is made where it is
        used, as on the CPU). The same values as :meth:`_weight` and :meth:`ridge_table`
        make per (layer, block), from a few launches and one sync."""
        if self._weight_cache[0] is fisher:
            return self._weight_cache[1]
        table = None
        budget = self.device_memory_mb
        if fisher.device.type in WEIGHT_TABLE_DEVICES and not self.ridge_lambda_rel and (
                budget is None or fisher.numel() * 16 <= budget * 2 ** 20 / 16):
            lam = self.ridge_lambda
            weight = torch.empty_like(fisher, dtype=torch.float32)
            below = torch.empty_like(fisher, dtype=torch.bool)
            for start in range(0, fisher.numel(), WEIGHT_SPAN):   # float64 in spans
                f = fisher[start:start + WEIGHT_SPAN].double()
                torch.lt(f, lam, out=below[start:start + WEIGHT_SPAN])
                weight[start:start + WEIGHT_SPAN] = (f.clamp_min(self.epsilon) + lam).float()
            del f
            running = below.cumsum(0)                     # running[i] = Σ below[:i + 1]
            del below
            entries = self._store.entries
            offsets = torch.as_tensor([off for off, _, _ in entries.values()],
                                      device=fisher.device)
            sizes = torch.as_tensor([n * size for _, n, size in entries.values()],
                                    device=fisher.device)
            before = torch.where(offsets > 0, running[(offsets - 1).clamp_min(0)], 0)
            counts = (running[offsets + sizes - 1] - before).tolist()   # the one sync
            table = (weight.reciprocal_(),
                     {k: c / (n * size) for (k, (_, n, size)), c in zip(entries.items(), counts)})
        self._weight_cache = (fisher, table)
        return table

    def _rows_per_tile(self, layer: int, block: str) -> int | None:
        """Gradient rows of one (layer, block) that fit the device budget together with as
        many rows of the other task (None: no budget)."""
        if self.device_memory_mb is None:
            return None
        _, n_heads, size = self._store.entries[(layer, block)]
        row_bytes = n_heads * size * 4
        return max(1, int(self.device_memory_mb * 2 ** 20 // (2 * row_bytes)))

    def _block_scores(self, task_a, ids_a, task_j, ids_j, layer, block, fisher) -> torch.Tensor:
        """[n_a, n_j, n_block_heads] float32 for one (layer, block); in tiles of rows when
        the operands exceed ``device_memory_mb``."""
        r = self._rows_per_tile(layer, block)
        weight = self._weight(fisher, layer, block)
        if r is None or len(ids_a) + len(ids_j) <= 2 * r:
            return self._tile_scores(task_a, ids_a, task_j, ids_j, layer, block, weight)
        rows = [[self._tile_scores(task_a, ids_a[a0:a0 + r], task_j, ids_j[j0:j0 + r],
                                   layer, block, weight)
                 for j0 in range(0, len(ids_j), r)] for a0 in range(0, len(ids_a), r)]
        return torch.cat([torch.cat(row, dim=1) for row in rows], dim=0)

    def _operands(self, task_a, ids_a, sets, layer, block, fisher):
        """Everything one (layer, block)'s contractions read, on the device: (left, f,
        [(right, g, norms) of each (task_j, ids_j) of ``sets``], 1/D)."""
        left, left_op = self._left(task_a, ids_a, layer, block)
        rights = [self._right(task_j, ids_j, layer, block) for task_j, ids_j in sets]
        return left, left_op, rights, self._weight(fisher, layer, block)

    def _scores_of(self, left, left_op, right, right_op, norms, weight, n_a) -> torch.Tensor:
        """[n_a, n_j, Hb] float32: M = Σ_s f(left)·(1/D)·g(right) (/ norm_j), on the device."""
        s = contract(left, right, weight, left_op, right_op, backend=self.backend,
                     precision=self.precision)
        return self._finished(s, norms, left.shape[-1], n_a)

    def _finished(self, s, norms, slice_size: int, n_a: int) -> torch.Tensor:
        """A contraction's [a, n_j, Hb] as scores: divided by the norms g_j (gj_norm), by
        the slice size (aggregate mean), one row expanded to n_a (fisher_weighted)."""
        if norms is not None:
            s = s / norms[None, :, None]
        if self.aggregate == "mean":
            s = s / slice_size
        if s.shape[0] != n_a:
            s = s.expand(n_a, -1, -1)
        return s

    def _tile_scores(self, task_a, ids_a, task_j, ids_j, layer, block, weight) -> torch.Tensor:
        """[len(ids_a), len(ids_j), n_block_heads] float32: one contraction on the device."""
        left, left_op = self._left(task_a, ids_a, layer, block)
        right, right_op, norms = self._right(task_j, ids_j, layer, block)
        return self._scores_of(left, left_op, right, right_op, norms, weight, len(ids_a))

    def _block_mean(self, task_a, ids_a, task_j, ids_j, layer, block, fisher) -> torch.Tensor:
        """mean over all (i, j) pairs of M, [n_block_heads] float64, without pairwise
        products: mean_ij Σ_s x_is w_s y_js = Σ_s (mean_i x_is) w_s (mean_j y_js).
        Rows are summed in tiles within ``device_memory_mb``."""
        r = self._rows_per_tile(layer, block) or max(len(ids_a), len(ids_j))
        x = y = 0.0
        n_x = 0
        for k in range(0, len(ids_a), r):
            left, left_op = self._left(task_a, ids_a[k:k + r], layer, block)
            x = x + apply_op(left_op, left.float()).sum(0, dtype=torch.float64)
            n_x += left.shape[0]
            if self.variant == "fisher_weighted":
                break                                   # one row: the task-A Fisher
        for k in range(0, len(ids_j), r):
            right, right_op, norms = self._right(task_j, ids_j[k:k + r], layer, block)
            g = apply_op(right_op, right.float())
            if norms is not None:
                g = g / norms[:, None, None]
            y = y + g.sum(0, dtype=torch.float64)
        m = ((x / n_x) * self._weight(fisher, layer, block).double() * (y / len(ids_j))).sum(-1)
        return m / left.shape[-1] if self.aggregate == "mean" else m

    def _head_columns(self, block: str, heads: list[int]) -> list[int]:
        return [self.config.kv_head(h) for h in heads] if block in SHARED_BLOCKS else heads

    def _hold_rows(self, wanted: list[tuple[str, list[str]]]) -> bool:
        """Copy the whole rows [n, P] of each (task, sample ids) in ``wanted`` onto the device
        once (dense stores, when they take at most half of ``device_memory_mb``), so every
        (layer, block) reads views of them; True when held."""
        store = self._store
        wanted = list(dict.fromkeys((task, tuple(ids)) for task, ids in wanted))
        n_rows = sum(len(ids) for _, ids in wanted)
        if self.device_memory_mb is None or store.layout is not None or \
                n_rows * store.size * 4 > self.device_memory_mb * 2 ** 20 / 2:
            return False
        for task, ids in wanted:
            self._held[(task, ids)] = to_device(store.columns(task, list(ids)), self.device)
        return True

    def _rows_rebuilt(self) -> bool:
        """Whether a (layer, block)'s operands are made for its one contraction, so it may
        write over them: rows a factored store rebuilds (dense stores' rows may be views of
        resident rows; the task-A Fisher of ``fisher_weighted`` is the Fisher itself)."""
        return self._store.layout is not None and self.variant != "fisher_weighted"

    def _fits_twice(self, n_rows: int, layer: int, block: str) -> bool:
        """Two (layer, block)s' operands of ``n_rows`` rows fit the device budget at once."""
        r = self._rows_per_tile(layer, block)
        return r is None or 2 * n_rows <= r

    def _fits_once(self, n_rows: int, layer: int, block: str) -> bool:
        """One (layer, block)'s operands of ``n_rows`` rows fit the device budget (else each
        disruptor set is scored on its own, in tiles of rows where needed)."""
        r = self._rows_per_tile(layer, block)
        return r is None or n_rows <= 2 * r

    def pair_scores(self, task_a: str, ids_a: list[str], task_j: str, ids_j: list[str],
                    layers=None, heads=None, fisher_tasks: tuple[str, ...] | None = None
                    ) -> dict[str, np.ndarray]:
        """Block -> M [n_a, n_j, n_layers, n_heads] (float64) of task-A samples ``ids_a`` against
        samples ``ids_j`` of ``task_j`` (scored, reference or control). ``fisher_tasks``: tasks
        whose Fisher normalises (default from ``fisher_source`` with task B = ``task_j``).

        Each (layer, block) whose operands fit the device budget twice has its rows copied
        in while the previous one is scored (``prefetch``, on CUDA); scores stay on the
        device until every layer of a block is done (one copy to the host per block)."""
        layers, heads = self._layers(layers), self._heads(heads)
        fisher_tasks = fisher_tasks or self.fisher_tasks(task_a, task_j)
        self._check_disjoint(fisher_tasks, {task_a: ids_a, task_j: ids_j})
        out = self._scores_all(task_a, ids_a, task_j, ids_j, layers, heads,
                               self._fisher_vector(fisher_tasks))
        return {b: out[b].cpu().double().numpy() for b in BLOCKS}

    def _scores_all(self, task_a, ids_a, task_j, ids_j, layers, heads, fisher
                    ) -> dict[str, torch.Tensor]:
        """:meth:`pair_scores` (float32, on the device) with checked layers, heads and
        samples and the normalising Fisher [P] on the device."""
        return self._scores_sets(task_a, ids_a, [(task_j, ids_j)], layers, heads, fisher)[0]

    def _scores_sets(self, task_a, ids_a, sets: list[tuple[str, list[str]]], layers, heads,
                     fisher) -> list[dict[str, torch.Tensor]]:
        """Per set (task_j, ids_j) of ``sets``: block -> M [n_a, n_j, n_layers, n_heads]
        float32 on the device, task-A samples ``ids_a`` against the set's samples.

        One pass over the (layer, block)s: task A's rows of each are made once (rebuilt from
        a factored store or copied in) and contracted with every set's rows in turn, so a
        set's scores are bitwise those of a call with that set alone. Where all the sets'
        rows do not fit ``device_memory_mb`` together, each set is scored on its own
        (:meth:`_block_scores`, tiles where one set does not fit either)."""
        n_rows = len(ids_a) + sum(len(ids) for _, ids in sets)
        jobs = [(block, li, layer) for block in BLOCKS for li, layer in enumerate(layers)]

        def load(job):
            block, _, layer = job
            # copied in while the previous block is scored only when both fit the budget
            return self._operands(task_a, ids_a, sets, layer, block, fisher) \
                if self._fits_twice(n_rows, layer, block) else None

        # per set one [4, n_a, n_j, n_layers, n_heads] tensor, a view of it per block
        out = [dict(zip(BLOCKS, torch.empty(len(BLOCKS), len(ids_a), len(ids_j), len(layers),
                                            len(heads), device=self.device)))
               for _, ids_j in sets]
        cols = {}                 # None: the score's heads are the columns, in order
        for b in BLOCKS:
            c = self._head_columns(b, heads)
            cols[b] = None if c == list(range(self.config.block_heads(b))) else \
                torch.as_tensor(c, device=self.device)
        wanted = ([] if self.variant == "fisher_weighted" else [(task_a, ids_a)]) + list(sets)
        try:
            held = self._hold_rows(wanted)
            # overlap only when every block fits twice (a block scored in tiles must not
            # share the budget with the next one's operands)
            overlap = self.prefetch and not held and all(
                self._fits_twice(n_rows, layer, block) for block, _, layer in jobs)
            for (block, li, layer), ops in prefetched(jobs, load, self.device, overlap):
                if ops is None and self._fits_once(n_rows, layer, block):
                    ops = self._operands(task_a, ids_a, sets, layer, block, fisher)
                raw = None
                if ops is not None:     # every set against task A's rows, f(left)·w once
                    left, left_op, rights, weight = ops
                    raw = contract_sets(left, [(r, g) for r, g, _ in rights], weight, left_op,
                                        backend=self.backend, precision=self.precision,
                                        overwrite=self._rows_rebuilt())
                    norms = [n for _, _, n in rights]
                    width = left.shape[-1]
                    del left, rights, weight    # else they outlive ops into the next block
                del ops
                for k, (task_j, ids_j) in enumerate(sets):
                    if raw is None:
                        s = self._block_scores(task_a, ids_a, task_j, ids_j, layer, block,
                                               fisher)
                    else:
                        s = self._finished(raw[k], norms[k], width, len(ids_a))
                        raw[k] = None
                    out[k][block][:, :, li, :] = s if cols[block] is None else \
                        s.index_select(2, cols[block])
                    del s
        finally:
            self._held.clear()
        return out

    # -- the seed's API ---------------------------------------------------------------
    def _sample_id(self, task, pos):
        ids = self.scored_ids(task)
        if not 0 <= pos < len(ids):
            raise IndexError(f"task {task!r} has {len(ids)} scored samples; got index {pos}")
        return ids[pos]

    def compute_block_head_score(self, task_a: str, sample_i: int, task_b: str, sample_j: int,
                                 layer: int, head: int, block: str):
        """(M^B_{ij,l,h}, diagnostics) for one cell; sample_i/j index the scored samples
        sorted by id. Diagnostics: fisher_min, contrib_norm, grad_norm, lambda, ridge_share."""
        _choice("block", block, BLOCKS)
        layer, head = self._layers([layer])[0], self._heads([head])[0]
        ia, jb = self._sample_id(task_a, sample_i), self._sample_id(task_b, sample_j)
        tasks = self.fisher_tasks(task_a, task_b)
        self._check_disjoint(tasks, {task_a: [ia], task_b: [jb]})
        fisher = self._fisher_vector(tasks)
        col = self._head_columns(block, [head])[0]
        score = float(self._block_scores(task_a, [ia], task_b, [jb], layer, block, fisher)[0, 0, col])
        _, lam, share = self.denominator(fisher, layer, block)
        ga = self._store.block(task_a, [ia], layer, block)[0, col]
        gb = self._store.block(task_b, [jb], layer, block)[0, col]
        diag = {"fisher_min": float(self._slice(fisher, layer, block)[col].min()),
                "contrib_norm": float(ga.double().square().norm()),
                "grad_norm": float(gb.double().norm()), "lambda": lam, "ridge_share": share,
                "block": block, "layer": layer, "head": head,
                "kv_head": self.config.kv_head(head) if block in SHARED_BLOCKS else None,
                "sample_a": ia, "sample_b": jb}
        logger.debug("L%d H%d %s %s x %s: %.4g %s", layer, head, block, ia, jb, score, diag)
        return score, diag

    def compute_sample_pair(self, task_a: str, sample_i: int, task_b: str, sample_j: int,
                            layer: int, head: int) -> dict[str, float]:
        """{'Q','K','V','O'} scores of one pair at (layer, head); K/V are group kv(head)'s."""
        return {b: self.compute_block_head_score(task_a, sample_i, task_b, sample_j, layer,
                                                 head, b)[0] for b in BLOCKS}

    def compute_heatmap(self, task_a: str, task_b: str, layers=None, heads=None,
                        max_samples_per_task: int | None = None) -> dict:
        """Per block: ``scores`` [n_a, n_b, n_layers, n_heads], ``layer_head_avg``
        [n_layers, n_heads], ``top_conflicts``, ``layers``, ``heads``; plus ``meta``.

        Scored samples are taken in id order, the first ``max_samples_per_task`` of each.
        Under GQA the K/V columns of one group repeat group kv(h)'s values.
        """
        layers, heads = self._layers(layers), self._heads(heads)
        ids_a = self.scored_ids(task_a)[:max_samples_per_task]
        ids_b = self.scored_ids(task_b)[:max_samples_per_task]
        check_not_shared(task_a, ids_a, task_b, ids_b)
        return self.heatmap_of(task_a, ids_a, task_b, ids_b, layers, heads,
                               self.fisher_tasks(task_a, task_b))

    def heatmap_of(self, task_a: str, ids_a: list[str], task_j: str, ids_j: list[str],
                   layers: list[int], heads: list[int], fisher_tasks: tuple[str, ...]) -> dict:
        """:meth:`compute_heatmap`'s result for given samples: task-A samples ``ids_a``
        against samples ``ids_j`` of ``task_j`` (scored, or a control split of task A),
        normalised by the Fisher of ``fisher_tasks``."""
        on_device = self.score_sets(task_a, ids_a, [(task_j, ids_j)], layers, heads,
                                    fisher_tasks)[0]
        return self.heatmap_from(on_device, task_a, ids_a, task_j, ids_j, layers, heads,
                                 fisher_tasks)

    def score_sets(self, task_a: str, ids_a: list[str], sets: list[tuple[str, list[str]]],
                   layers, heads, fisher_tasks: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
        """Per (task_j, ids_j) of ``sets``: block -> M [n_a, n_j, n_layers, n_heads] float32
        on the device, all normalised by the Fisher of ``fisher_tasks``. Task A's rows of
        each (layer, block) are made once for all sets; each set's scores equal
        :meth:`pair_scores` of that set alone, bitwise."""
        for task_j, ids_j in sets:
            self._check_disjoint(fisher_tasks, {task_a: ids_a, task_j: ids_j})
        return self._scores_sets(task_a, ids_a, sets, self._layers(layers), self._heads(heads),
                                 self._fisher_vector(tuple(fisher_tasks)))

    def heatmap_from(self, on_device: dict[str, torch.Tensor], task_a: str, ids_a: list[str],
                     task_j: str, ids_j: list[str], layers, heads,
                     fisher_tasks: tuple[str, ...]) -> dict:
        """The heatmap (:meth:`compute_heatmap`'s format) of scores made by
        :meth:`score_sets`: block -> [n_a, n_j, n_layers, n_heads] on the device."""
        layers, heads = self._layers(layers), self._heads(heads)
        fisher = self._fisher_vector(tuple(fisher_tasks))
        scores, means = _on_host(on_device)
        heatmap = {}
        for block in BLOCKS:
            heatmap[block] = {
                "scores": scores[block],
                "layer_head_avg": means[block],
                "top_conflicts": self.top_conflicts(block, on_device[block], layers, heads,
                                                     ids_a, ids_j),
                "layers": list(layers), "heads": list(heads),
            }
        ridge = self.ridge_table(fisher, layers)
        heatmap["meta"] = {
            "task_a": task_a, "task_b": task_j, "layers": list(layers), "heads": list(heads),
            "kv_head_of": [self.config.kv_head(h) for h in heads],
            "num_kv_heads": self.config.num_kv_heads, "num_heads": self.config.num_heads,
            "variant": self.variant, "sample_ids_a": ids_a, "sample_ids_b": ids_j,
            "fisher_tasks": list(fisher_tasks), "settings": self.settings(), "ridge": ridge,
            "compute": self.compute_settings(), "collector_token": self.fisher_collector.token,
            "axes": {"scores": ["sample_a", "sample_b", "layer", "head"],
                     "layer_head_avg": ["layer", "head"]},
        }
        shares = [v["share_lambda_gt_fisher"] for v in ridge.values()]
        if max(shares) > 0.5:
            warnings.warn(f"ridge λ exceeds Î on {max(shares):.0%} of the parameters of some "
                          f"(layer, block): λ dominates the denominator; lower ridge_lambda or "
                          f"use ridge_lambda_rel", stacklevel=2)
        return heatmap

    def layer_head_average(self, task_a: str, task_b: str, layers=None, heads=None,
                           max_samples_per_task: int | None = None) -> dict[str, np.ndarray]:
        """Block -> mean score over all sample pairs [n_layers, n_heads] (float64): what
        ``compute_heatmap(...)[block]['layer_head_avg']`` holds, in O(n_a + n_b) instead of
        O(n_a · n_b) work, since the mean of a bilinear form is the form of the means."""
        layers, heads = self._layers(layers), self._heads(heads)
        ids_a = self.scored_ids(task_a)[:max_samples_per_task]
        ids_b = self.scored_ids(task_b)[:max_samples_per_task]
        tasks = self.fisher_tasks(task_a, task_b)
        self._check_disjoint(tasks, {task_a: ids_a, task_b: ids_b})
        fisher = self._fisher_vector(tasks)
        out = {}
        for block in BLOCKS:
            cols = self._head_columns(block, heads)
            out[block] = np.stack([
                self._block_mean(task_a, ids_a, task_b, ids_b, layer, block, fisher)[cols]
                .cpu().numpy() for layer in layers])
        return out

    def top_conflicts(self, block: str, scores: np.ndarray, layers, heads, ids_a, ids_b
                      ) -> list[dict]:
        """The k most conflicting entries (largest; smallest for 'signed'); K/V cells of one
        GQA group are listed once, under their first selected query head."""
        cols = list(range(len(heads)))
        if block in SHARED_BLOCKS:
            seen, cols = set(), []
            for c, h in enumerate(heads):
                if self.config.kv_head(h) not in seen:
                    seen.add(self.config.kv_head(h))
                    cols.append(c)
        scores = torch.as_tensor(scores)
        sub = scores if cols == list(range(scores.shape[3])) else \
            scores.index_select(3, torch.as_tensor(cols, device=scores.device))
        top, values = _extreme(sub.reshape(-1), self.top_k, largest=self.variant != "signed")
        out = []
        where = np.unravel_index(top.numpy(), tuple(sub.shape))
        for i, j, li, c, v in zip(*(w.tolist() for w in where), values.tolist()):
            h = heads[cols[c]]
            out.append({"block": block, "layer": layers[li], "head": h,
                        "kv_head": self.config.kv_head(h) if block in SHARED_BLOCKS else None,
                        "sample_a": ids_a[i], "sample_b": ids_b[j], "score": v})
        return out


def _on_host(on_device: dict[str, torch.Tensor]
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(block -> scores float64 [n_a, n_j, L, H], block -> their mean over the pairs
    [L, H] float64) on the host, from float32 scores on any device: one float64 conversion
    and one copy for all blocks, the means taken where the scores are; on CUDA the copy
    lands in pinned memory when it takes at most PINNED_MAX_BYTES."""
    both = torch.stack([on_device[b] for b in BLOCKS]).double()
    means = both.mean((1, 2)).cpu().numpy()
    if both.is_cuda and both.numel() * 8 <= PINNED_MAX_BYTES:
        both = torch.empty(both.shape, dtype=both.dtype, pin_memory=True).copy_(both)
    both = both.cpu().numpy()
    return dict(zip(BLOCKS, both)), dict(zip(BLOCKS, means))


def check_not_shared(task_a: str, ids_a: list[str], task_b: str, ids_b: list[str]) -> None:
    """Task A's and task B's scored samples must differ: interference of a set with itself
    is not a task conflict."""
    shared = set(ids_a) & set(ids_b)
    if shared:
        raise ValueError(f"task A {task_a!r} and task B {task_b!r} share scored samples "
                         f"{sorted(shared)[:5]}: interference of a set with itself is not "
                         f"a task conflict")


def _extreme(x: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, float64 values) on the host of the k largest (``largest``) or smallest
    entries of ``x`` (1-D, any device), most extreme first, ties by index: the k-th value
    is found on the device (topk), every entry at least as extreme comes to the host and is
    sorted there."""
    k = min(int(k), x.numel())
    if k < x.numel():
        kth = torch.topk(x, k, largest=largest).values
        cand = ((x >= kth.min()) if largest else (x <= kth.max())).nonzero().flatten()
    else:
        cand = torch.arange(x.numel(), device=x.device)
    idx = cand.cpu().numpy()
    val = x[cand].double().cpu().numpy()
    order = np.lexsort((idx, -val if largest else val))[:k]
    return torch.from_numpy(idx[order]), torch.from_numpy(val[order])


def median(x: torch.Tensor, by_sort: bool | None = None) -> float:
    """``np.median`` of all entries of ``x`` (float64), computed where ``x`` lives: the
    middle entry, or the mean of the two middle entries (a + b) / 2. ``by_sort`` None: on
    the CPU by selection (kthvalue), on CUDA by a sort (kthvalue of one long slice runs in
    one thread block there; with the sort a 7B chunk's scoring took 5.7 s instead of
    tens of seconds, B2 in benchmarks/RESULTS.md)."""
    flat = x.reshape(-1)
    n = flat.numel()
    if flat.is_cuda if by_sort is None else by_sort:
        ordered = flat.sort().values
        hi, lo = ordered[n // 2], ordered[(n - 1) // 2]
    else:
        hi = flat.kthvalue(n // 2 + 1).values
        lo = hi if n % 2 else flat.kthvalue(n // 2).values
    if n % 2:
        return float(hi)
    return float((lo + hi) / 2)
