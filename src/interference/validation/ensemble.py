"""Several fine-tuning runs in one batched pass: the trainable attention weights stacked.

The arms of :mod:`.intervention` differ only in which cells they freeze and in the order of
B's batches (the seed); with ``trainable='attention'`` they share every other weight. So R
runs can share one forward+backward per step: each run's attention weights become slice r
of a stacked tensor ``[R, *weight.shape]``, and the rows of run r in the batch
``[R * batch_size, T]`` are multiplied by slice r only (one ``bmm`` per projection). Each
run's loss is the mean over its own rows and the step minimises their sum, so the gradient
at slice r is run r's gradient; AdamW is elementwise, so one optimiser over the stacked
tensors is R independent ones. The arithmetic per run is that of a run alone, to float
rounding (padding and matmul shapes differ); a GPU, launch-bound at batch 8, does R runs in
about the time of one (benchmarks/RESULTS.md V2).

Frozen entries are exact: their gradient is set to zero before each step and their value
put back from the starting weights after it (``torch.where``), as in
:func:`.intervention.finetune`.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..gradients.objectives import CausalLMObjective
from .cells import Cell, CellParams
from .losses import _chunk_losses


def _kind(module: nn.Module) -> str | None:
    """'linear' (weight [out, in]), 'conv1d' (transformers' Conv1D, weight [in, out])."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    return None


def stackable(model: nn.Module, objective, names: list[str]) -> bool:
    """True when every parameter in ``names`` is the weight of a Linear / Conv1D module and
    the objective runs a batch in one forward pass (causal LMs)."""
    if not isinstance(objective, CausalLMObjective):
        return False
    modules = dict(model.named_modules())
    for name in names:
        path, _, leaf = name.rpartition(".")
        if leaf != "weight" or _kind(modules.get(path)) is None:
            return False
    return True


class StackedWeights:
    """R copies of the parameters ``names``, slice r used by the r-th block of batch rows.

    Attributes:
        weights: name -> leaf tensor [R, *param.shape] (float, the parameter's dtype).
    """

    def __init__(self, model: nn.Module, names: list[str], n_runs: int):
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        self.n_runs = n_runs
        self.modules = {n: modules[n.rpartition(".")[0]] for n in names}
        self.weights = {n: params[n].detach().unsqueeze(0).repeat(n_runs, *[1] * params[n].dim())
                        .requires_grad_() for n in names}

    def _forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        module, w = self.modules[name], self.weights[name]
        rows = x.reshape(self.n_runs, -1, x.shape[-1])                 # [R, b*T, in]
        y = torch.bmm(rows, w.transpose(1, 2) if _kind(module) == "linear" else w)
        if module.bias is not None:
            y = y + module.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @contextmanager
    def routed(self):
        """Within the block the modules multiply by their stacked weights."""
        for name, module in self.modules.items():
            module.forward = lambda x, name=name: self._forward(name, x)
        try:
            yield self
        finally:
            for module in self.modules.values():
                del module.forward


def finetune_stacked(model, objective, train: dict, params: CellParams,
                     frozen_sets: list[list[Cell]], orders: list[list[list[int]]],
                     names: list[str], settings) -> dict[str, torch.Tensor]:
    """Fine-tune R = len(frozen_sets) runs at once; run r freezes ``frozen_sets[r]`` and
    reads the batches ``orders[r]`` (indices into ``train``, one list per step). Returns
    name -> [R, *shape] final weights (detached); the model itself is unchanged."""
    n_runs = len(frozen_sets)
    stack = StackedWeights(model, names, n_runs)
    start = {n: params.params[n].detach().reshape(1, -1) for n in names}
    frozen = {n: torch.zeros(n_runs, start[n].shape[1], dtype=torch.bool, device=start[n].device)
              for n in names}
    for r, cells in enumerate(frozen_sets):
        for name, idx in params.merged(cells).items():
            frozen[name][r, idx] = True
    opt = torch.optim.AdamW(list(stack.weights.values()), lr=settings.lr,
                            weight_decay=settings.weight_decay)
    samples = objective.split(train)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with stack.routed():
            for step in range(settings.steps):
                opt.zero_grad(set_to_none=False)
                rows = [samples[i] for order in orders for i in order[step]]
                losses = _chunk_losses(model, objective, rows).view(n_runs, -1)
                losses.mean(1).sum().backward()
                with torch.no_grad():
                    for n, w in stack.weights.items():
                        w.grad.view(n_runs, -1).masked_fill_(frozen[n], 0.0)
                opt.step()
                with torch.no_grad():
                    for n, w in stack.weights.items():
                        flat = w.view(n_runs, -1)
                        flat.copy_(torch.where(frozen[n], start[n], flat))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return {n: w.detach() for n, w in stack.weights.items()}
