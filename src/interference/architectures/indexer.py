"""QKOVIndexer: (block, layer, head) -> the parameter entries that belong to it.

The indexer turns every block's head slices into gather indices over the flattened
parameters, so one gradient (or weight, or Fisher) tensor becomes a head-major array
``[n_block_heads, slice_size]`` with one ``index_select``. The concatenation over all
(layer, block) of those arrays is the *canonical vector* of length P that the gradient
store, the Fisher and the metric share.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import BLOCKS, SHARED_BLOCKS, QKOVConfig
from .generic import LayoutNotFound, discover, text_stacks
from .registry import LAYOUTS, AttentionLayout, HeadSlices, SplitLayout, weight2d
from ..placement import on_one_device

logger = logging.getLogger("fisher.qkov")

REGISTER_HINT = (
    "Register an adapter for this layout: subclass interference.architectures.AttentionLayout "
    "(or SplitLayout), set `name` and `patterns` (block -> regex over module paths with the "
    "layer id as group 1), decorate it with @register_layout, or override "
    "QKOVIndexer._build_param_patterns(). Inspect candidate names with "
    "`[n for n, _ in model.named_parameters() if 'attn' in n]`."
)


def _tried(layouts) -> str:
    return "; ".join(f"{a.name}: {a.patterns.get('Q')}" for a in layouts)


def candidate_layouts(pattern_table: dict[str, dict[str, str]] | None = None
                      ) -> list[AttentionLayout]:
    """Adapters to try: the registry, with patterns replaced or added from ``pattern_table``
    (layout name -> block -> regex). A new name becomes a split-projection adapter."""
    table = pattern_table if pattern_table is not None else {
        name: dict(a.patterns) for name, a in LAYOUTS.items()}
    return [(LAYOUTS[name] if name in LAYOUTS else SplitLayout()).with_patterns(name, pats)
            for name, pats in table.items()]


def detect_layout(model: nn.Module, layout: str | None = None,
                  pattern_table: dict[str, dict[str, str]] | None = None,
                  attention_stack: str | None = None) -> AttentionLayout:
    """Pick the adapter whose patterns match the model's modules (``layout`` forces one;
    of several, the one outside a vision / audio tower of a text model);
    when no registered adapter matches, the generic discovery (``generic.discover``, which
    maps the ``attention_stack`` of an encoder-decoder)."""
    candidates = candidate_layouts(pattern_table)
    if attention_stack is not None:
        return _generic_or_raise(model, candidates, attention_stack)
    if layout is not None and layout.startswith("generic_"):
        found = _generic_or_raise(model, candidates)
        if found.name != layout:
            raise ValueError(f"layout {layout!r} asked, but the modules read as {found.name!r}")
        return found
    if layout is not None:
        named = [a for a in candidates if a.name == layout]
        if not named:
            raise ValueError(f"unknown attention layout {layout!r}; registered: "
                             f"{sorted(a.name for a in candidates)}. {REGISTER_HINT}")
        return named[0]
    hits = [a for a in candidates if a.matches(model) and a.extra_match(model)]
    if len(hits) > 1:   # a text model with a vision / audio tower: the text stack's adapter
        first = {a.name: min(a.modules_by_layer(model, "Q").items())[1] for a in hits}
        keep = text_stacks(model, list(first.values()))
        hits = [a for a in hits if first[a.name] in keep]
    if not hits:
        return _generic_or_raise(model, candidates)
    if len(hits) > 1:
        raise ValueError(f"ambiguous attention layout: {[a.name for a in hits]} all match; "
                         f"set QKOVConfig(layout=...)")
    return hits[0]


def _generic_or_raise(model: nn.Module, candidates, attention_stack: str | None = None
                      ) -> AttentionLayout:
    """The generic adapter, or the seed's KeyError naming the family, the registered
    patterns tried, why the generic discovery failed and how to register an adapter."""
    try:
        return discover(model, attention_stack)
    except LayoutNotFound as err:
        family = getattr(getattr(model, "config", None), "model_type", None)
        raise KeyError(
            f"Could not find parameter for L0 Q: no registered attention layout matches "
            f"{type(model).__name__} (model_type {family!r}). Patterns tried: "
            f"{_tried(candidates)}. Generic discovery: {err.reason}. {REGISTER_HINT}") from None


@dataclass(frozen=True)
class Part:
    """One parameter's share of a (layer, block): ``axis`` 'rows' or 'cols' of the
    Linear-convention weight, or 'bias'; ``index`` [n_heads·size] the rows/columns taken,
    head-major; ``transposed`` for Conv1D weights stored [in, out]; ``kernel`` for a
    kernel-1 ``nn.Conv1d`` weight [out, in, 1] (its last axis is dropped)."""

    name: str
    axis: str
    index: torch.Tensor
    n_heads: int
    size: int
    transposed: bool = False
    kernel: bool = False

    def index_on(self, device: torch.device) -> torch.Tensor:
        """``index`` on ``device``, copied there once (a host-to-GPU copy per call would
        make the host wait for the GPU at every gather)."""
        if self.index.device == device:
            return self.index
        copies = self.__dict__.setdefault("_index_copies", {})   # not a dataclass field
        if device not in copies:
            copies[device] = self.index.to(device)
        return copies[device]

    @property
    def span(self) -> tuple[int, int] | None:
        """(start, length) when ``index`` is one range of rows/columns (the heads' slices
        side by side, as in most layouts), else None; found once."""
        if "_span" not in self.__dict__:                       # not a dataclass field
            k = self.index.numel()
            lo = int(self.index[0]) if k else 0
            whole = k and torch.equal(self.index, torch.arange(lo, lo + k))
            self.__dict__["_span"] = (lo, k) if whole else None
        return self.__dict__["_span"]

    def select(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """``t``'s entries ``index`` along ``dim``: a view where they are one range
        (:attr:`span`), else a copy (index_select)."""
        span = self.span
        return t.narrow(dim, *span) if span else t.index_select(dim, self.index_on(t.device))

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """[*lead, n_heads, size·fan] from ``t`` shaped [*lead, *param.shape].

        Entries are ordered (row, input) for row slices and (output, column) for column
        slices, whatever the storage; the slices are taken along the stored layout (a view
        where they are one range, else an index_select, never a transposed one, which is
        slow on GPU), then at most one permuting copy. A row slice of a Linear weight, or a
        bias, is then a view of ``t``: never write into what this returns.
        """
        n, size = self.n_heads, self.size
        if self.kernel:
            t = t.squeeze(-1)
        if self.axis == "bias":
            return self.select(t, -1).unflatten(-1, (n, size))
        lead = t.shape[:-2]
        if self.axis == "rows":
            if self.transposed:                       # stored [*, in, out]
                x = self.select(t, -1).unflatten(-1, (n, size))        # [*, in, n, size]
                return x.movedim(-3, -1).reshape(*lead, n, -1)       # [*, n, size, in]
            return self.select(t, -2).reshape(*lead, n, -1)
        if self.transposed:                           # stored [*, cols, d]
            x = self.select(t, -2).unflatten(-2, (n, size))            # [*, n, size, d]
            return x.transpose(-1, -2).reshape(*lead, n, -1)         # [*, n, d, size]
        x = self.select(t, -1).unflatten(-1, (n, size))                # [*, d, n, size]
        return x.movedim(-2, -3).reshape(*lead, n, -1)

    def add_into(self, dest: torch.Tensor, t: torch.Tensor) -> None:
        """``dest += self.take(t)`` for ``t`` shaped like the parameter (no leading dims) and
        ``dest`` [n_heads, size·fan] (a view, e.g. columns of a canonical vector's block),
        with no head-major copy of ``t``: the permutation :meth:`take` would copy is applied
        to ``dest``'s view instead (one kernel; interleaved layouts still index_select)."""
        n, size = self.n_heads, self.size
        if self.kernel:
            t = t.squeeze(-1)
        if self.axis == "bias":
            dest.add_(self.select(t, -1).unflatten(-1, (n, size)))
        elif self.axis == "rows" and self.transposed:                  # t [in, out]
            x = self.select(t, -1).unflatten(-1, (n, size))            # [in, n, size]
            dest.unflatten(-1, (size, -1)).movedim(-1, 0).add_(x)
        elif self.axis == "rows":                                      # t [out, in]
            x = self.select(t, -2).unflatten(0, (n, size))             # [n, size, in]
            dest.unflatten(-1, (size, -1)).add_(x)
        elif self.transposed:                                          # t [cols, d]
            x = self.select(t, -2).unflatten(0, (n, size))             # [n, size, d]
            dest.unflatten(-1, (-1, size)).transpose(-1, -2).add_(x)
        else:                                                          # t [d, cols]
            x = self.select(t, -1).unflatten(-1, (n, size))            # [d, n, size]
            dest.unflatten(-1, (-1, size)).movedim(0, 1).add_(x)


@dataclass(frozen=True)
class BlockEntry:
    """One (layer, block) of the canonical vector: ``offset`` into it, ``n_heads`` x ``size``."""

    layer: int
    block: str
    n_heads: int
    size: int
    offset: int
    parts: tuple   # (Part, ...)
    widths: tuple  # each part's entries per head: its columns in gather's cat; sum = size

    @property
    def numel(self) -> int:
        return self.n_heads * self.size


class QKOVIndexer:
    """Maps (block, layer, head) to slices of a model's real attention parameters.

    Args:
        model: the transformer.
        config: its QKOVConfig (``QKOVConfig.from_model(model)`` when None); a config that
            contradicts the weights' shapes raises ValueError naming both shapes.
    """

    def __init__(self, model: nn.Module, config: QKOVConfig | None = None,
                 layers: list[int] | None = None):
        self.model = model
        self.config = config or QKOVConfig.from_model(model)
        self.adapter = detect_layout(model, self.config.layout, self._build_param_patterns(),
                                     self.config.extra.get("attention_stack"))
        self.patterns = dict(self.adapter.patterns)
        self.all_layers = sorted(self.adapter.modules_by_layer(model, "Q"))
        self.layers = self.all_layers if layers is None else sorted(int(l) for l in layers)
        unknown = sorted(set(self.layers) - set(self.all_layers))
        if unknown:
            raise KeyError(f"Could not find parameter for L{unknown[0]} Q: the model's "
                           f"attention layers are {self.all_layers}")
        if len(self.all_layers) != self.config.num_layers:
            raise ValueError(f"config says num_layers={self.config.num_layers} but the model "
                             f"has {len(self.all_layers)} attention layers ({self.adapter.name})")
        self._params = dict(model.named_parameters())
        self._modules = dict(model.named_modules())
        self.entries: dict[tuple[int, str], BlockEntry] = {}
        offset = 0
        for layer in self.layers:
            for block in BLOCKS:
                entry = self._build_entry(layer, block, offset)
                self.entries[(layer, block)] = entry
                offset += entry.numel
        self.total_size = offset

    # -- extension point of the seed --------------------------------------------------
    def _build_param_patterns(self) -> dict[str, dict[str, str]]:
        r"""Layout name -> block -> regex over module paths (layer id = group 1).

        Override in a subclass to extend: a new name with q/k/v row and o column modules
        becomes a split-projection adapter, e.g.
        ``{**super()._build_param_patterns(), "mine": {"Q": r"blocks\.(\d+)\.att\.wq", ...}}``.
        """
        return {name: dict(a.patterns) for name, a in LAYOUTS.items()}

    # -- construction -----------------------------------------------------------------
    def _build_entry(self, layer: int, block: str, offset: int) -> BlockEntry:
        try:
            hs: HeadSlices = self.adapter.slices(self.model, self.config.at_layer(layer),
                                                 layer, block)
        except KeyError:
            raise KeyError(f"Could not find parameter for L{layer} {block}: pattern "
                           f"{self.patterns.get(block)!r} of layout {self.adapter.name!r} "
                           f"matched no module. {REGISTER_HINT}") from None
        module = self._modules[hs.module]
        weight = weight2d(module)
        self._check_extent(weight, hs, layer, block)
        index = torch.cat([torch.arange(s, s + hs.size) for s in hs.starts])
        n = len(hs.starts)
        parts = [Part(f"{hs.module}.weight", hs.axis, index, n, hs.size, hs.transposed,
                      kernel=weight.dim() != module.weight.dim())]
        bias = getattr(module, "bias", None)
        if self.config.include_bias and hs.axis == "rows" and bias is not None:
            parts.append(Part(f"{hs.module}.bias", "bias", index, n, hs.size))
        widths = tuple(p.take(self._params[p.name].detach()).shape[-1] for p in parts)
        return BlockEntry(layer, block, n, sum(widths), offset, tuple(parts), widths)

    def _check_extent(self, weight: torch.Tensor, hs: HeadSlices, layer: int, block: str):
        """ValueError naming expected and actual shapes when the config does not fit."""
        lin = weight.t() if hs.transposed else weight  # Linear convention [out, in]
        extent = max(hs.starts) + hs.size if hs.starts else 0
        dim = 0 if hs.axis == "rows" else 1
        if lin.shape[dim] < extent:
            kind = "rows" if dim == 0 else "columns"
            raise ValueError(
                f"L{layer} {block}: config implies {extent} {kind} ({len(hs.starts)} heads x "
                f"{hs.size}) in {hs.module}.weight, but its shape is {tuple(weight.shape)} "
                f"(Linear convention {tuple(lin.shape)}). Check num_heads / num_kv_heads / "
                f"head_dim / v_head_dim.")

    # -- use --------------------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        """Names of the parameters that hold any head slice, in model order."""
        used = {p.name for e in self.entries.values() for p in e.parts}
        return [n for n in self._params if n in used]

    def entry(self, layer: int, block: str) -> BlockEntry:
        if (layer, block) not in self.entries:
            raise KeyError(f"Could not find parameter for L{layer} {block}: layers are "
                           f"{self.layers}, blocks {BLOCKS}")
        return self.entries[(layer, block)]

    def gather(self, tensors: dict[str, torch.Tensor], layer: int, block: str) -> torch.Tensor:
        """Head-major view [n_block_heads, slice_size] of ``tensors`` (name -> tensor shaped
        like the parameter, e.g. its gradient) for one (layer, block)."""
        e = self.entry(layer, block)
        pieces = [p.take(tensors[p.name]) for p in e.parts]
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def add_gathered(self, dest: torch.Tensor, tensors: dict[str, torch.Tensor], layer: int,
                     block: str) -> None:
        """``dest += gather(tensors, layer, block).reshape(-1)`` for ``dest`` [numel] (the
        (layer, block)'s slice of a canonical vector, on the tensors' device), each part
        added through a view of ``dest``: no head-major copy, no cat."""
        e = self.entry(layer, block)
        heads = dest.view(e.n_heads, e.size)
        col = 0
        for p, width in zip(e.parts, e.widths):
            p.add_into(heads[:, col:col + width], tensors[p.name])
            col += width

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The canonical vector [P] of ``tensors`` over all (layer, block), float32, on the
        first layer's device (a model placed over several: interference.placement)."""
        return torch.cat(on_one_device([self.gather(tensors, l, b).reshape(-1).float()
                                        for (l, b) in self.entries]))

    def flatten_rows(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """[n, P] float32 from per-sample tensors (name -> [n, *param.shape]), on the first
        layer's device."""
        return torch.cat(on_one_device([self.gather(tensors, l, b).flatten(1).float()
                                        for (l, b) in self.entries]), dim=1)

    def head_param_indices(self, layer: int, block: str, head: int) -> dict[str, torch.Tensor]:
        """S(B, l, h): param name -> flat indices of the entries owned by query head ``head``
        (for K/V: by its group kv(head))."""
        e = self.entry(layer, block)
        row = self.config.kv_head(head) if block in SHARED_BLOCKS else head
        out = {}
        for p in e.parts:
            shape = self._params[p.name].shape
            out[p.name] = p.take(torch.arange(int(torch.Size(shape).numel())).view(shape))[row]
        return out

    def describe(self) -> dict:
        """JSON-able summary: layout, layers, sizes per block (for logs and store keys)."""
        return {"layout": self.adapter.name, "layers": self.layers, "total_size": self.total_size,
                "config": self.config.to_dict(),
                "blocks": {f"L{l}.{b}": [e.n_heads, e.size] for (l, b), e in self.entries.items()}}
