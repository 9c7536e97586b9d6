"""Per-sample task losses of held-out samples, batched, and their gradient.

``sample_losses`` gives L_i for every sample of a batch, equal (to float rounding) to the
objective's loss of that sample alone (SPEC 3): causal LMs run micro-batches right-padded
with an attention mask and reduce each sample's cross-entropy over its own predicted
tokens; other objectives run sample by sample.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..gradients.objectives import CausalLMObjective, Objective


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _right_padded(samples: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) [n, T_max], right-padded; labels -100 on padding."""
    t = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), t, dtype=torch.long)
    mask = torch.zeros(len(samples), t, dtype=torch.long)
    labels = torch.full((len(samples), t), -100, dtype=torch.long)
    for k, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[k, :n], mask[k, :n], labels[k, :n] = s["input_ids"], 1, s["labels"]
    return ids.to(device), mask.to(device), labels.to(device)


def _causal_losses(model: nn.Module, samples: list[dict], reduction: str) -> torch.Tensor:
    ids, mask, labels = _right_padded(samples, _device(model))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    # rows [n * (T-1), vocab]: the (N, C, T) layout takes a spatial soft-max kernel that
    # cost half of a forward pass on an H200 (benchmarks/RESULTS.md V2)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                          torch.where(keep, target, 0).reshape(-1),
                          reduction="none").view_as(target) * keep
    total = nll.sum(1)
    return total / keep.sum(1).clamp(min=1) if reduction == "mean" else total


def _chunk_losses(model: nn.Module, objective: Objective, samples: list[dict]) -> torch.Tensor:
    """float32 [len(samples)]: one forward pass for causal LMs, else sample by sample."""
    if isinstance(objective, CausalLMObjective):
        return _causal_losses(model, samples, objective.loss_reduction)
    return torch.stack([objective.loss(model, s).float() for s in samples])


def sample_losses(model: nn.Module, objective: Objective, batch: dict,
                  micro_batch: int = 16, grad: bool = False) -> torch.Tensor:
    """float32 [n]: each sample's loss; with ``grad`` the graph is kept (for a backward)."""
    samples = objective.split(batch)
    with torch.set_grad_enabled(grad):
        return torch.cat([_chunk_losses(model, objective, samples[k:k + micro_batch])
                          for k in range(0, len(samples), micro_batch)])


def mean_loss_gradient(model: nn.Module, objective: Objective, batch: dict,
                       names: list[str], micro_batch: int = 16) -> dict[str, torch.Tensor]:
    """name -> d(mean_i L_i)/dθ for the parameters ``names`` (float32, like the parameter)."""
    params = dict(model.named_parameters())
    n = objective.batch_size(batch)
    grads = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in names}
    samples = objective.split(batch)
    for start in range(0, n, micro_batch):
        loss = _chunk_losses(model, objective, samples[start:start + micro_batch]).sum() / n
        got = torch.autograd.grad(loss, [params[name] for name in names])
        for name, g in zip(names, got):
            grads[name] += g.float()
    return grads


def block_modules(model: nn.Module, module_paths: list[str]) -> list[nn.Module]:
    """The transformer block holding each of ``module_paths`` (e.g. each layer's Q
    projection): its ancestor that is an element of an ``nn.ModuleList``."""
    modules = dict(model.named_modules())
    out = []
    for path in module_paths:
        parts = path.split(".")
        for k in range(len(parts) - 1, 0, -1):
            if parts[k].isdigit() and isinstance(modules.get(".".join(parts[:k])), nn.ModuleList):
                out.append(modules[".".join(parts[:k + 1])])
                break
        else:
            raise ValueError(f"{path}: no enclosing block in an nn.ModuleList")
    return out


class BlockCache:
    """Outputs of every transformer block for a fixed sequence of forward passes (one
    :func:`sample_losses` call), so that after changing the parameters of block l a
    repeat of those passes can skip blocks 0..l-1: their outputs cannot change.

    Use: ``with cache.recording(): sample_losses(...)`` once on the unchanged model, then
    ``with cache.skipping_below(l): sample_losses(...)`` with the same batch and micro-batch.
    """

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks
        self.outputs: list[list] = [[] for _ in blocks]

    @contextmanager
    def recording(self):
        self.outputs = [[] for _ in self.blocks]
        handles = [b.register_forward_hook(
            lambda mod, inp, out, k=k: self.outputs[k].append(_detached(out)))
            for k, b in enumerate(self.blocks)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def skipping_below(self, position: int):
        counters = [0] * position

        def cached(k):
            def forward(*args, **kwargs):
                out = self.outputs[k][counters[k]]
                counters[k] += 1
                return out
            return forward

        for k in range(position):
            self.blocks[k].forward = cached(k)
        try:
            yield self
        finally:
            for k in range(position):
                del self.blocks[k].forward


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out
