"""The distinct cells of a map as parameters of the model: read them, step them, freeze them.

A cell c = (block, layer, head) is one distinct parameter set S(c) (SPEC sections 2 and 6):
Q and O per query head, K and V per key/value head (``head`` is then the kv head). Cell
names follow the statistics' grammar: ``Q/L3/H5``, ``K/L3/KV1``.

:class:`CellParams` holds, per cell, the flat indices of S(c) in each parameter it touches,
in the order of the canonical vector (``QKOVIndexer.gather``). So a vector ``[size]`` in
that order (a row of the gradient store, a step) can be read from or added to the model's
real weights, and nothing outside S(c) is touched.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..architectures import QKOVIndexer
from .._tables import BLOCKS, SHARED_BLOCKS

KV_BLOCKS = SHARED_BLOCKS


@dataclass(frozen=True, order=True)
class Cell:
    """One distinct cell: ``head`` is the query head for Q/O, the kv head for K/V."""

    block: str
    layer: int
    head: int

    @property
    def name(self) -> str:
        tag = "KV" if self.block in KV_BLOCKS else "H"
        return f"{self.block}/L{self.layer}/{tag}{self.head}"


def distinct_cells(indexer: QKOVIndexer) -> list[Cell]:
    """Every distinct cell of the indexer's layers, ordered block (Q, K, V, O), layer, head:
    the order of the statistics' cells table."""
    return [Cell(block, layer, h) for block in BLOCKS for layer in indexer.layers
            for h in range(indexer.config.block_heads(block))]


class CellParams:
    """Read, shift and freeze the parameters of cells of ``model``.

    Args:
        model: the model whose attention weights the indexer describes.
        indexer: ``QKOVIndexer(model, config)``.
    """

    def __init__(self, model: nn.Module, indexer: QKOVIndexer):
        self.model, self.indexer = model, indexer
        self.params = dict(model.named_parameters())
        self._index: dict[Cell, list[tuple[str, torch.Tensor]]] = {}

    def parts(self, cell: Cell) -> list[tuple[str, torch.Tensor]]:
        """[(parameter name, flat indices [n_k])] of S(c), in canonical order."""
        if cell not in self._index:
            cfg = self.indexer.config
            query_head = cell.head * cfg.group_size if cell.block in KV_BLOCKS else cell.head
            idx = self.indexer.head_param_indices(cell.layer, cell.block, query_head)
            device = self.params[next(iter(idx))].device
            self._index[cell] = [(name, i.reshape(-1).to(device)) for name, i in idx.items()]
        return self._index[cell]

    def size(self, cell: Cell) -> int:
        """|S(c)|: the number of parameters of the cell."""
        return sum(int(i.numel()) for _, i in self.parts(cell))

    def read(self, cell: Cell, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """float32 [size]: ``tensors`` (name -> tensor shaped like the parameter, e.g. its
        gradient; default: the parameters themselves) at S(c), in canonical order."""
        tensors = tensors if tensors is not None else self.params
        return torch.cat([tensors[n].detach().reshape(-1)[i.to(tensors[n].device)].float()
                          for n, i in self.parts(cell)])

    def save(self, cells) -> dict:
        """Exact copies of the cells' values (for :meth:`restore`)."""
        return {c: [self.params[n].detach().reshape(-1)[i].clone() for n, i in self.parts(c)]
                for c in cells}

    @torch.no_grad()
    def restore(self, saved: dict) -> None:
        """Put back values from :meth:`save`, bitwise."""
        for cell, values in saved.items():
            for (name, idx), v in zip(self.parts(cell), values):
                self.params[name].view(-1).index_copy_(0, idx, v)

    @torch.no_grad()
    def add(self, cell: Cell, delta: torch.Tensor) -> None:
        """θ_c += delta (float32 [size], canonical order), in the parameter's dtype."""
        if delta.numel() != self.size(cell):
            raise ValueError(f"{cell.name}: step has {delta.numel()} entries, the cell "
                             f"{self.size(cell)}")
        start = 0
        for name, idx in self.parts(cell):
            p = self.params[name]
            piece = delta[start:start + idx.numel()].to(p.device)
            flat = p.view(-1)
            flat.index_copy_(0, idx, (flat[idx].float() + piece).to(p.dtype))
            start += idx.numel()

    @contextmanager
    def shifted(self, cell: Cell, delta: torch.Tensor):
        """Within the block, θ_c + delta; afterwards the original values, bitwise."""
        saved = self.save([cell])
        try:
            self.add(cell, delta)
            yield
        finally:
            self.restore(saved)

    def merged(self, cells) -> dict[str, torch.Tensor]:
        """name -> flat indices [n] of every entry of ``cells`` in that parameter (one
        index tensor per parameter, so freezing k cells costs one kernel per parameter,
        not one per cell)."""
        pieces: dict[str, list[torch.Tensor]] = {}
        for cell in cells:
            for name, idx in self.parts(cell):
                pieces.setdefault(name, []).append(idx)
        return {name: torch.cat(p) for name, p in pieces.items()}

    @torch.no_grad()
    def zero_grads(self, cells) -> None:
        """Zero the gradient entries of ``cells`` (parameters without .grad are skipped);
        ``cells`` may also be a :meth:`merged` index."""
        index = cells if isinstance(cells, dict) else self.merged(cells)
        for name, idx in index.items():
            g = self.params[name].grad
            if g is not None:
                g.view(-1).index_fill_(0, idx, 0.0)
