"""The diagonal empirical Fisher of each task and the seed's ``FisherCollector`` (SPEC 4, 7).

``mode='ema'``: F_0 = 0, F_t = β F_{t-1} + (1-β) mean_{i in call t} C_i, Î = F_t / (1-β^t):
one update per ``collect_fisher`` call. ``mode='mean'``: Î = mean of C_i over all Fisher
samples, independent of call order. Both at full per-parameter resolution, float32
(accumulated in float64 for the mean).

Shards (separate jobs over disjoint samples of one task): each saves its Fisher as PARTIAL
SUMS and counts (``FisherCollector(fisher_partials=True)``: one float64 Σ C_i per
``collect_fisher`` call, plus the count); :meth:`FisherCollector.gather_saved` adds all
partial sums in sample order and divides by the total count, so the gathered Fisher is the
exact mean over all Fisher samples -- bitwise equal to one collector that made the same
calls in the same order. The EMA depends on the order of its updates across calls and is
not sharded (refused).
"""
from __future__ import annotations

import json
import logging
import numbers
import os
import uuid
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .._tables import ROLES
from ..architectures import QKOVConfig, QKOVIndexer
from .objectives import Objective, default_objective, sample_ids_of
from .per_sample import PerSampleGradients
from .factored import GRADIENT_FORMATS, FactorLayout
from .store import ContributionCache, GradientStore, natural_key

logger = logging.getLogger("fisher.qkov")
COLLECT_ROLES = ROLES + ("all",)   # collect_fisher's roles: the sample roles and the seed's "all"
# a task's float64 Fisher state stays on the GPU it was collected on up to this size (a
# 135M-parameter model's attention: ~0.2 GB); larger states (7B layer chunks) go to the host
DEVICE_STATE_BYTES = 2 * 2**30


DROPPED_SUMS = "this Fisher's sums were dropped when its value was made (keep_fisher_sums=False)"


class TaskFisher:
    """Running Fisher of one task. ``value()`` -> float32 [P]."""

    def __init__(self, size: int, mode: str, ema_decay: float, keep_partials: bool = False,
                 defer: bool | None = None, keep_sums: bool = True):
        if mode not in ("ema", "mean"):
            raise ValueError(f"mode must be 'ema' or 'mean', got {mode!r}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if keep_partials and mode != "mean":
            raise ValueError(f"Fisher mode {mode!r} cannot be sharded: the EMA depends on the "
                             "order of its updates across calls, so partial EMAs of separate "
                             "jobs do not combine into the EMA of one run. Use mode='mean' "
                             "(exact and order-free) or collect the task in one job")
        self.mode, self.beta = mode, float(ema_decay)
        self.size = int(size)
        self._state: torch.Tensor | None = None     # made when first needed (``state``)
        self.dropped = False                        # sums dropped by flush (keep_sums False)
        self._value: torch.Tensor | None = None    # value() cache, cleared by update()
        self.pending: torch.Tensor | None = None   # GPU-side Σ C_i not yet in state (flush)
        self.flushed_count = 0                      # samples folded into state
        self.defer = defer      # None: pend GPU sums of a host state (update); True/False: force
        # False: a flush that makes Î from the pending sums drops them instead of copying
        # them to the host (state None: no later update, no save); see FisherCollector
        self.keep_sums = keep_sums
        self.steps = 0          # EMA updates (calls)
        self.count = 0          # samples seen
        self.sample_ids: list[str] = []
        # shards: one (Σ_i C_i float64 [P], n) per update, in call order
        self.keep_partials = keep_partials
        self.partials: list[tuple[torch.Tensor, int]] = []

    @property
    def state(self) -> torch.Tensor | None:
        """The running float64 state [P] (mode 'mean': Σ C_i; 'ema': the EMA), None once
        its sums were dropped. Made as host zeros when first needed, so a layer chunk on a
        GPU that drops its sums never makes it (for 19 LLaMA-7B layers 10 GB per task,
        whose zeroing cost seconds of page faults; B2 in benchmarks/RESULTS.md)."""
        if self._state is None and not self.dropped:
            self._state = torch.zeros(self.size, dtype=torch.float64)
        return self._state

    @state.setter
    def state(self, value: torch.Tensor | None) -> None:
        self._state, self.dropped = value, value is None

    def _device(self) -> torch.device:
        """Where the state lives (the host until it is placed elsewhere)."""
        return self._state.device if self._state is not None else torch.device("cpu")

    def update(self, batch_sum: torch.Tensor, n: int, ids: list[str]):
        """Fold in one call's batch: ``batch_sum`` = Σ_i C_i [P] (float64) over ``n`` samples.

        Where the sums live: a state of at most ``DEVICE_STATE_BYTES`` moves to the GPU of
        the first batch and stays there (scoring reads it there). A larger one stays on
        the host, and in mode 'mean' (no partials) a GPU's batch sums are added up on the
        GPU first and folded into it by :meth:`flush` (one copy instead of one per call;
        the collector flushes when it turns to stored roles; after a flush, later sums go
        straight to the host). The sums are added in the same order either way (0 + a = a
        exactly), so the values do not depend on where they were added."""
        if self.dropped:
            raise ValueError(f"{DROPPED_SUMS}: it takes no more samples")
        if self.count == 0 and batch_sum.device != self._device() and \
                self.size * 8 <= DEVICE_STATE_BYTES:     # no samples yet: zeros made there
            self._state = torch.zeros(self.size, dtype=torch.float64, device=batch_sum.device)
        self._value = None
        elsewhere = batch_sum.device != self._device() if self.defer is None else self.defer
        deferred = self.mode == "mean" and not self.keep_partials and elsewhere and \
            self.flushed_count == 0
        if deferred or self.pending is not None:
            self.pending = batch_sum if self.pending is None else self.pending.add_(batch_sum)
        elif self.mode == "ema":
            batch_sum = batch_sum.to(self.state.device)
            self.state.mul_(self.beta).add_(batch_sum / n, alpha=1.0 - self.beta)
        else:
            batch_sum = batch_sum.to(self.state.device)
            self.state.add_(batch_sum)
            if self.keep_partials:
                self.partials.append((batch_sum.detach().to("cpu", torch.float64).clone(), n))
        self._counted(n, ids)

    def sink(self, device: torch.device) -> torch.Tensor | None:
        """The state itself, for a call's Σ_i C_i computed on ``device`` to be added into it
        entry by entry (then :meth:`added`), where :meth:`update` would add them the same
        way: mode 'mean', no partials, nothing pending, the state and ``device`` on the
        host. Else None. Saves the call's [P] float64 total (0.21 GB for SmolLM2-135M's
        attention weights, a fresh mapping on top of the job's heap)."""
        if self.mode == "mean" and not self.keep_partials and self.pending is None and \
                not self.dropped and self._device().type == "cpu" and \
                torch.device(device).type == "cpu":
            return self.state
        return None

    def added(self, n: int, ids: list[str]) -> None:
        """Count a call's ``n`` samples whose Σ_i C_i went into :meth:`sink`."""
        self._value = None
        self._counted(n, ids)

    def _counted(self, n: int, ids: list[str]) -> None:
        self.steps += 1
        self.count += n
        if self.pending is None:
            self.flushed_count = self.count
        self.sample_ids.extend(ids)

    def flush(self) -> None:
        """Fold the GPU-side pending sum into the host state (see :meth:`update`). When the
        pending sum is the whole state (mode 'mean'), Î is computed from it on the GPU first
        and stays there (``value()``'s cache: the same float64 division and float32
        rounding as on the host, so the same bits), and scoring reads it without a host
        round trip."""
        if self.pending is not None:
            if self.flushed_count == 0:
                self._value = (self.pending / self.count).float()
                # 0 + a = a; or dropped: 8.6 GB per task and 16 LLaMA-7B layers took 4.5 s
                # to reach the host (B2 in benchmarks/RESULTS.md)
                self.state = self.pending.to(self._device()) if self.keep_sums else None
            else:
                self.state.add_(self.pending.to(self.state.device))
            self.pending = None
            self.flushed_count = self.count

    def value(self) -> torch.Tensor:
        """Î float32 [P] on the state's device (computed once per update)."""
        if self.count == 0:
            raise ValueError("Fisher has no samples")
        self.flush()
        if self._value is None:
            scale = (1.0 - self.beta ** self.steps) if self.mode == "ema" else self.count
            self._value = (self.state / scale).float()
        return self._value


class FisherBank:
    """Fisher of every task; ``get(task)`` -> float32 [P]. ``collector``: backlink."""

    def __init__(self, collector):
        self.collector = collector
        self.tasks: dict[str, TaskFisher] = {}

    def get(self, task: str) -> torch.Tensor:
        if task not in self.tasks:
            raise KeyError(f"no Fisher collected for task {task!r}; call "
                           f"collect_fisher(model, batch, task={task!r}, role='fisher')")
        return self.tasks[task].value()

    def __contains__(self, task):
        return task in self.tasks


class FisherCollector:
    """Collects, per task, the Fisher and the per-sample gradients of attention weights.

    Args:
        enable_cross_task_analysis: keep per-sample gradients (the seed's required flag;
            without it only the Fisher is kept).
        gradient_memory_mb: budget of the collector's own gradient buffers; the rest spills
            to ``spill_dir`` (a temporary folder by default). Never dropped. 'auto'
            (default): half of the card's free memory when the store is on CUDA (measured
            when the first batch arrives), 100 MB on the CPU.
        ema_decay: β of the EMA Fisher.
        store_dtype: storage of g_i: 'float32' | 'bfloat16' | 'float16'.
        config: QKOVConfig (default: from the first model seen).
        objective: per-sample loss (default: from the model's family).
        loss_reduction: 'mean' | 'sum' for the default objective.
        progress: tqdm bars over samples.
        engine: per-sample gradient engine 'auto' | 'loop' | 'hooks' (see per_sample.py).
        micro_batch: samples per batched forward of the 'hooks' engine; 'auto' (default):
            8 on the CPU; on CUDA the largest of :data:`AUTO_MICRO_BATCHES` whose dense
            rows, per-sample gradients and their copies (12 bytes x m x P,
            collect.pass_memory) take at most a quarter of the card's free memory (a GPU
            runs small micro-batches at a fraction of its speed: B6 in
            benchmarks/RESULTS.md), at least 8.
        layers: collect only these layers (default all); see ``layerwise.py``.
        store_device: where in-budget gradients live: 'auto' (default: the model's device,
            so gradients collected on a GPU stay there for scoring), 'cpu', or 'cuda'
            (``gradient_memory_mb`` is then a GPU budget).
        fisher_partials: keep each ``collect_fisher`` call's Fisher sum and count, and save
            them (``save_task``), so that shards of one task collected in separate jobs
            can be combined exactly (``gather_saved``). Mode 'mean' only.
        gradient_format: how the store keeps g_i: 'dense' (rows [P]), 'factored' (per
            sample the inputs x and output gradients δ of every attention projection, in
            the model's dtype; rows are rebuilt when scored, see ``factored.py``) or 'auto'
            (factored for each projection where that is smaller: T·(d_in + d_out) values
            against d_in·d_out). Factored needs the 'hooks' engine; with the 'loop' engine
            'auto' is dense. Fisher and grad norms come from the collection-time g_i in
            every format (on a GPU a wide projection's norms from the Gram matrices of its
            x and δ, without forming g: ``per_sample.GRAM_NORM_DEVICES``).
        keep_fisher_sums: keep each task's float64 Fisher sums once its value Î is made
            (default). False drops the GPU-held sums of mode 'mean' when the collector
            turns to stored roles, instead of copying them to the host: the layer chunks
            of a large model, which score and never save or extend the Fisher
            (``layerwise.py``); such a Fisher then takes no more samples and is not saved.
    """

    def __init__(self, enable_cross_task_analysis: bool = False,
                 gradient_memory_mb: float | str = "auto",
                 ema_decay: float = 0.99, store_dtype: str = "float32", spill_dir=None,
                 config: QKOVConfig | None = None, objective: Objective | None = None,
                 loss_reduction: str = "mean", progress: bool = False, engine: str = "auto",
                 micro_batch: int | str = "auto", layers: list[int] | None = None,
                 store_device="auto",
                 fisher_partials: bool = False, gradient_format: str = "dense",
                 keep_fisher_sums: bool = True):
        if gradient_format not in GRADIENT_FORMATS:
            raise ValueError(f"gradient_format must be one of {GRADIENT_FORMATS}, got "
                             f"{gradient_format!r}")
        if micro_batch != "auto" and not (isinstance(micro_batch, numbers.Integral) and
                                          micro_batch >= 1):
            raise ValueError(f"micro_batch must be an integer >= 1 or 'auto', got "
                             f"{micro_batch!r}")
        self.gradient_format = gradient_format
        self.enable_cross_task_analysis = enable_cross_task_analysis
        self.gradient_memory_mb = gradient_memory_mb
        self.ema_decay, self.store_dtype, self.spill_dir = ema_decay, store_dtype, spill_dir
        self.config, self.objective = config, objective
        self.loss_reduction, self.progress = loss_reduction, progress
        self.engine, self.micro_batch = engine, micro_batch
        self.only_layers, self.store_device = layers, store_device
        self.fisher_partials = fisher_partials
        self.keep_fisher_sums = bool(keep_fisher_sums)
        self.token = uuid.uuid4().hex
        self.fisher = FisherBank(self)
        self.indexer: QKOVIndexer | None = None
        self._store: GradientStore | None = None
        self._model_id = None
        self._covered = None
        self._counters: dict[str, int] = {}
        self._all_role_ids: set[tuple[str, str]] = set()

    # -- the seed's accessors ---------------------------------------------------------
    @property
    def gradient_manager(self) -> GradientStore:
        """The gradient store (an empty one before the first ``collect_fisher``)."""
        return self._store if self._store is not None else _EmptyStore(self)

    @property
    def contribution_cache(self) -> ContributionCache:
        """(task, sample_id) -> C_i = g_i ⊙ g_i, derived on access from the stored g_i."""
        return ContributionCache(self.gradient_manager, self)

    def sample_ids(self, task: str, role: str) -> list[str]:
        """Sorted dataset ids of (task, role); role 'fisher' lists the Fisher samples."""
        if role == "fisher":
            tf = self.fisher.tasks.get(task)
            return sorted(tf.sample_ids, key=natural_key) if tf else []
        return self._store.ids(task, role) if self._store else []

    # -- collection -------------------------------------------------------------------
    def _bind(self, model: nn.Module):
        if self.indexer is None:
            self.config = self.config or QKOVConfig.from_model(model)
            self.indexer = QKOVIndexer(model, self.config, self.only_layers)
            self.objective = self.objective or default_objective(
                model, loss_reduction=self.loss_reduction)
            self._model_id = id(model)
            entries = {k: (e.offset, e.n_heads, e.size) for k, e in self.indexer.entries.items()}
            engine = PerSampleGradients.choose_engine(model, self.objective, self.engine)
            fmt = self.gradient_format
            if fmt == "factored" and engine != "hooks":
                raise ValueError(f"gradient_format='factored' needs the 'hooks' engine "
                                 f"(causal LMs); engine here is {engine!r}: use 'dense' or "
                                 "'auto'")
            layout = None
            if fmt != "dense" and engine == "hooks":
                layout = FactorLayout.from_indexer(self.indexer, fmt, self.store_dtype)
            device, budget = _store_placement(model, self.store_device,
                                              self.gradient_memory_mb)
            self._store = GradientStore(self.indexer.total_size, entries, budget,
                                        self.store_dtype, self.spill_dir, collector=self,
                                        device=device, layout=layout)
        elif id(model) != self._model_id:
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            mine = {n: tuple(p.shape) for n, p in self.indexer.model.named_parameters()}
            if shapes != mine:
                raise ValueError("collect_fisher got a model with other parameters than the "
                                 "one this collector was built for; use a new FisherCollector")

    def collect_fisher(self, model: nn.Module, batch: dict, task: str, mode: str = "ema",
                       role: str = "all") -> dict:
        """Per-sample gradients of one batch of ``task``.

        role: 'fisher' (update the Fisher only), 'scored' / 'reference' / 'control' (store
        g_i only), 'all' (the seed's flow: both; warns that Fisher and scored overlap).
        mode: 'ema' (one EMA update with this call's mean C_i) or 'mean'.
        Returns {'n_samples', 'mean_loss', 'sample_ids', 'losses'} (losses: per sample, in
        batch order).
        """
        if role not in COLLECT_ROLES:
            raise ValueError(f"role must be one of {COLLECT_ROLES}, got {role!r}")
        if not task:
            raise ValueError("task name must be a non-empty string")
        if role not in ("fisher", "all") and not self.enable_cross_task_analysis:
            raise ValueError(f"role={role!r} keeps per-sample gradients, which this collector "
                             "does not: make it with FisherCollector("
                             "enable_cross_task_analysis=True)")
        self._bind(model)
        n = self.objective.batch_size(batch)
        if n == 0:
            raise ValueError(f"task {task!r}: the batch has no samples")
        ids = sample_ids_of(batch, task, n, self._counters.get(task, 0))
        self._counters[task] = self._counters.get(task, 0) + n
        self._check_roles(task, ids, role)
        tf = self.fisher.tasks.get(task)
        if role in ("fisher", "all"):
            if tf is None:
                tf = self.fisher.tasks[task] = TaskFisher(
                    self.indexer.total_size, mode, self.ema_decay, self.fisher_partials,
                    keep_sums=self.keep_fisher_sums)
            elif tf.mode != mode:
                raise ValueError(f"task {task!r} Fisher is in mode {tf.mode!r}, got {mode!r}")
        keep = role != "fisher" and self.enable_cross_task_analysis
        if role != "fisher":          # Fisher sums held on a GPU go to the host before rows
            for other in self.fisher.tasks.values():
                other.flush()
        if role == "all":
            warnings.warn(
                f"task {task!r}: role='all' uses the same samples for the Fisher and as scored "
                f"samples, so the normaliser has seen what it scores (SPEC 4). Split them: "
                f"collect_fisher(..., role='fisher') on one batch and role='scored' (and "
                f"'reference') on disjoint batches.", stacklevel=2)
            self._all_role_ids.update((task, s) for s in ids)
        wants_fisher = role in ("fisher", "all")
        layout = self._store.layout if keep else None
        engine = PerSampleGradients(model, self.indexer, self.objective, self.progress,
                                    desc=f"{task} ({role})", engine=self.engine,
                                    micro_batch=self._micro_batch(model),
                                    factors=layout is not None,
                                    rows=layout is None or wants_fisher,
                                    dense_for=layout and (lambda p, t: not layout.factored(p, t)),
                                    covered=self._coverage() if layout is not None else None)
        stored_as = "scored" if role == "all" else role
        if keep:
            self._store.reserve(task, stored_as, n)
        total = into = None
        losses = []
        if role == "fisher" and engine.engine == "hooks":   # sums only: no per-sample rows
            if n <= engine.micro_batch:    # one micro-batch: its sums straight into the state
                into = tf.sink(next(model.parameters()).device)
            for total, batch_losses, _ in engine.square_sums(batch, ids, into=into):
                losses += batch_losses
        for g in engine(batch, ids) if total is None else ():
            losses.append(g.loss)
            if wants_fisher:
                sq = g.vector.double().square()
                total = sq if total is None else total.add_(sq)
            if keep:
                self._store.add(task, stored_as, g.sample_id,
                                g.vector, g.loss, g.n_tokens, factors=g.factors, norm=g.norm)
            del g   # its x and δ are views of a whole micro-batch's: not into the next forward
        if into is not None:
            tf.added(n, ids)
        elif wants_fisher:
            tf.update(total, n, ids)
        logger.debug("collected %d samples of %s (%s), mean loss %.4f", n, task, role,
                     sum(losses) / n)
        return {"n_samples": n, "mean_loss": sum(losses) / n, "sample_ids": ids,
                "losses": losses}

    def _micro_batch(self, model: nn.Module) -> int:
        """The micro-batch this collector's engine runs (``micro_batch``, 'auto' resolved
        once, at the first batch)."""
        if self.micro_batch == "auto":
            self.micro_batch = auto_micro_batch(next(model.parameters()).device,
                                                self.indexer.total_size)
        return int(self.micro_batch)

    def _coverage(self) -> dict:
        """:func:`per_sample._coverage` of the indexer, computed once."""
        if self._covered is None:
            from .per_sample import _coverage
            self._covered = _coverage(self.indexer)
        return self._covered

    def _check_roles(self, task: str, ids: list[str], role: str):
        """Fisher, scored and reference samples must be disjoint by dataset id (SPEC 4)."""
        if role == "all":
            return
        taken = {}
        tf = self.fisher.tasks.get(task)
        if tf:
            taken.update({s: "fisher" for s in tf.sample_ids})
        if self._store:
            for r in self._store.roles(task):
                taken.update({s: r for s in self._store.ids(task, r)})
        clash = [s for s in ids if s in taken]
        if clash:
            raise ValueError(f"task {task!r}: samples {clash[:5]} are already collected as "
                             f"{taken[clash[0]]!r}; Fisher, scored and reference samples must "
                             f"be disjoint by dataset id (SPEC 4)")

    # -- persistence (used by the workflow) -------------------------------------------
    def save_task(self, task: str, directory: str | os.PathLike, meta: dict | None = None,
                  partial: bool = False):
        """Write task's gradients (store format) and Fisher (safetensors) under ``directory``.

        ``partial=True`` (a shard): the task may have no Fisher samples here (an empty
        Fisher, count 0, is written) and the Fisher's partial sums are saved with it.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(meta or {}, indexer=self.indexer.describe(), task=task)
        self._store.save(directory, meta=meta, tasks=[task])
        tf = self.fisher.tasks.get(task)
        if tf is None and partial:
            tf = TaskFisher(self.indexer.total_size, "mean", self.ema_decay)
        elif tf is None:
            tf = self.fisher.tasks[task]      # KeyError, as before
        _save_fisher(directory / "fisher.safetensors", tf, with_partials=partial)

    @classmethod
    def from_saved(cls, directories, memory_mb: float = 0.0, **kwargs) -> "FisherCollector":
        """A collector over saved task folders (no model needed: scoring only)."""
        self = cls(enable_cross_task_analysis=True, gradient_memory_mb=memory_mb, **kwargs)
        described = None
        for d in directories:
            d = Path(d)
            store = GradientStore.open(d, memory_mb, collector=self)
            desc = store.meta["indexer"]
            if described is None:
                described = desc
                self.config = QKOVConfig(**desc["config"])
                self._store = store
                self.gradient_format = store.gradient_format
                self._layers = desc["layers"]
            else:
                if desc != described:
                    raise ValueError(f"{d} was collected with another model or config than "
                                     f"{directories[0]}")
                self._store.merge(store)
            md = _fisher_metadata(d / "fisher.safetensors")
            tensors = _read_fisher_file(d / "fisher.safetensors", load_file)
            tf = TaskFisher(store.size, md["mode"], float(md["beta"]))
            tf.state, tf.steps, tf.count = tensors["state"], int(md["steps"]), int(md["count"])
            tf.sample_ids = json.loads(md["sample_ids"])
            self.fisher.tasks[store.meta["task"]] = tf
        return self

    @staticmethod
    def gather_saved(directories, directory: str | os.PathLike, meta: dict | None = None,
                     link: bool = True):
        """Combine the saved shards of ONE task (``save_task(..., partial=True)`` in
        separate jobs, disjoint samples, in sample order) into one saved task folder.

        Gradients: :meth:`GradientStore.gather` (row files hard-linked, not copied).
        Fisher: Σ of every shard's partial sums in order / total count -- the exact mean
        over all Fisher samples (a shard saved without partial sums contributes its sum
        as one partial). Mode 'ema' is refused. Returns the gathered folder's Path.
        """
        directories = [Path(d) for d in directories]
        if not directories:
            raise ValueError("gather_saved needs at least one shard folder")
        tasks, described, parts = set(), None, []
        state, count, steps, ids, beta = None, 0, 0, [], None
        for d in directories:
            index = json.loads((d / "index.json").read_text())
            tasks.add(index["meta"].get("task"))
            desc = index["meta"].get("indexer")
            if described is None:
                described = desc
            elif desc != described:
                raise ValueError(f"{d} was collected with another model or config than "
                                 f"{directories[0]}")
            md = _fisher_metadata(d / "fisher.safetensors")
            with safe_open(str(d / "fisher.safetensors"), "pt") as sf:
                if md["mode"] != "mean":
                    raise ValueError(
                        f"{d}: Fisher mode {md['mode']!r} cannot be sharded: the EMA depends "
                        "on the order of its updates, so partial EMAs of separate jobs do "
                        "not combine into the EMA of one run. Use fisher.mode=mean (exact, "
                        "order-free) or one shard")
                beta = beta if beta is not None else md["beta"]
                counts = json.loads(md.get("partial_counts") or "null")
                if counts is None:            # no partial sums saved: the sum is one part
                    counts = [int(md["count"])] if int(md["count"]) else []
                    tensors = [sf.get_tensor("state")] if counts else []
                else:
                    tensors = [sf.get_tensor(f"partial.{k}") for k in range(len(counts))]
                if sum(counts) != int(md["count"]):
                    raise ValueError(f"{d}: partial counts {counts} do not add up to the "
                                     f"Fisher's count {md['count']}")
                if state is None:
                    state = torch.zeros(sf.get_slice("state").get_shape()[0],
                                        dtype=torch.float64)
                for t in tensors:            # in sample order, as one collector would
                    state.add_(t.to(torch.float64))
                count += int(md["count"])
                steps += int(md["steps"])
                ids += json.loads(md["sample_ids"])
                parts.append({"folder": str(d), "count": int(md["count"]),
                              "partials": len(counts)})
        if len(tasks) != 1:
            raise ValueError(f"the shards hold different tasks {sorted(map(str, tasks))}; "
                             "gather the shards of one task")
        if len(set(ids)) != len(ids):
            raise ValueError("the shards' Fisher samples overlap; shards must be disjoint")
        tf = TaskFisher(int(state.numel()), "mean", float(beta))
        tf.state, tf.count, tf.steps, tf.sample_ids = state, count, steps, ids
        task = next(iter(tasks))
        first_meta = json.loads((directories[0] / "index.json").read_text())["meta"]
        gathered_meta = dict(first_meta if meta is None else dict(
            meta, indexer=described, task=task), shards=parts)

        def add_fisher(tmp: Path):
            _save_fisher(tmp / "fisher.safetensors", tf, with_partials=False)

        GradientStore.gather(directories, directory, meta=gathered_meta, link=link,
                             before_publish=add_fisher)
        return Path(directory)

    @property
    def layers(self) -> list[int]:
        """Real layer ids of the attention stack."""
        if self.indexer is not None:
            return self.indexer.layers
        return list(getattr(self, "_layers", []))


STORE_SHARE = 0.5       # share of a card's free memory that gradient_memory_mb='auto' takes
CPU_STORE_MB = 100.0    # gradient_memory_mb='auto' for a store in host memory


AUTO_MICRO_BATCHES = (32, 16, 8)


def auto_micro_batch(device: torch.device, n_params: int) -> int:
    """FisherCollector's ``micro_batch='auto'`` on ``device`` for ``n_params`` attention
    parameters (see there)."""
    from ..device import free_memory_mb

    free = free_memory_mb(device)
    if free is None:
        return AUTO_MICRO_BATCHES[-1]
    fits = [m for m in AUTO_MICRO_BATCHES if 12 * m * n_params <= 0.25 * free * 2**20]
    return max(fits, default=AUTO_MICRO_BATCHES[-1])


def _store_placement(model: nn.Module, store_device, memory_mb) -> tuple[torch.device, float]:
    """(device, budget in MB) of a collector's gradient store: ``store_device`` 'auto' is
    the model's device; ``memory_mb`` 'auto' is STORE_SHARE of that card's free memory now,
    or CPU_STORE_MB in host memory."""
    from ..device import free_memory_mb, resolve_device

    if store_device in (None, "auto"):
        device = next(model.parameters()).device
    else:
        device = torch.device(resolve_device(store_device, "store_device"))
    if isinstance(memory_mb, str) and memory_mb == "auto":
        free = free_memory_mb(device)
        return device, CPU_STORE_MB if free is None else STORE_SHARE * free
    try:
        return device, float(memory_mb)
    except (TypeError, ValueError):
        raise ValueError(f"gradient_memory_mb must be a number of MB or 'auto', got "
                         f"{memory_mb!r}") from None


def _save_fisher(path: Path, tf: TaskFisher, with_partials: bool = False) -> None:
    """fisher.safetensors: the running state (mean mode: Σ C_i, float64) + count, mode, ids;
    with_partials: also each update's partial sum (``partial.<k>``, counts in metadata)."""
    path = Path(path)
    tf.flush()
    if tf.state is None:
        raise ValueError(f"{DROPPED_SUMS}: there is nothing to save")
    tensors = {"state": tf.state.cpu().contiguous()}
    metadata = {"mode": tf.mode, "beta": repr(tf.beta), "steps": str(tf.steps),
                "count": str(tf.count), "sample_ids": json.dumps(tf.sample_ids)}
    if with_partials:
        if tf.mode != "mean":
            raise ValueError(f"Fisher mode {tf.mode!r} cannot be saved as partial sums "
                             "(shards): use mode='mean'")
        if tf.count and not tf.partials:
            raise ValueError("this Fisher kept no partial sums; build the collector with "
                             "fisher_partials=True to save a shard")
        for k, (t, _) in enumerate(tf.partials):
            tensors[f"partial.{k}"] = t.contiguous()
        metadata["partial_counts"] = json.dumps([n for _, n in tf.partials])
    tmp = path.parent / f".{path.name}.tmp"
    # one metadata key holding sorted JSON: safetensors writes several keys in a
    # per-process hash order, so equal Fisher states would differ in their bytes
    save_file(tensors, str(tmp), metadata={"qkov": json.dumps(metadata, sort_keys=True)})
    os.replace(tmp, path)


def _fisher_metadata(path: Path) -> dict[str, str]:
    """The metadata written by :func:`_save_fisher` (also the older one-key-per-field form)."""
    md = _read_fisher_file(path, lambda p: safe_open(p, "pt").metadata()) or {}
    return json.loads(md["qkov"]) if "qkov" in md else md


def _read_fisher_file(path: Path, read):
    """``read(str(path))``; a missing, truncated or damaged file raises IntegrityError
    naming it and the fix, never safetensors' own error."""
    from ..results import IntegrityError

    try:
        return read(str(path))
    except Exception as err:
        raise IntegrityError(
            f"{path}: cannot read the Fisher ({type(err).__name__}: {str(err)[:200]}); the "
            "file is truncated or damaged: rebuild it: snakemake --forcerun collect") from None


class _EmptyStore:
    """Stand-in store before anything is collected: empty, and says how to fill it."""

    def __init__(self, collector):
        self.collector, self.shards, self.memory_mb = collector, {}, collector.gradient_memory_mb

    def ids(self, task, role):
        return []

    def roles(self, task):
        return []

    def get_memory_usage(self) -> dict:
        return {"ram_mb": 0.0, "disk_mb": 0.0, "budget_mb": self.memory_mb, "n_samples": 0,
                "n_on_disk": 0}

    def __getattr__(self, name):
        raise ValueError(f"no gradients collected yet (gradient_manager.{name}): call "
                         f"collect_fisher(model, batch, task=...) with "
                         f"FisherCollector(enable_cross_task_analysis=True) first")
