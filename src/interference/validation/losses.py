"""Per-sample task losses of held-out samples, batched, and their gradient.

``sample_losses`` gives L_i for every sample of a batch, equal (to float rounding) to the
objective's loss of that sample alone (SPEC 3): causal LMs run micro-batches right-padded
with an attention mask and reduce each sample's cross-entropy over its own predicted
tokens; other objectives run sample by sample.
"""
from __future__ import annotations

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
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    nll = F.cross_entropy(logits.transpose(1, 2), torch.where(keep, target, 0),
                          reduction="none") * keep
    total = nll.sum(1)
    return total / keep.sum(1).clamp(min=1) if reduction == "mean" else total


def sample_losses(model: nn.Module, objective: Objective, batch: dict,
                  micro_batch: int = 16, grad: bool = False) -> torch.Tensor:
    """float32 [n]: each sample's loss; with ``grad`` the graph is kept (for a backward)."""
    samples = objective.split(batch)
    out = []
    with torch.set_grad_enabled(grad):
        for start in range(0, len(samples), micro_batch):
            part = samples[start:start + micro_batch]
            if isinstance(objective, CausalLMObjective):
                out.append(_causal_losses(model, part, objective.loss_reduction))
            else:
                out.append(torch.stack([objective.loss(model, s).float() for s in part]))
    return torch.cat(out)


def mean_loss_gradient(model: nn.Module, objective: Objective, batch: dict,
                       names: list[str], micro_batch: int = 16) -> dict[str, torch.Tensor]:
    """name -> d(mean_i L_i)/dθ for the parameters ``names`` (float32, like the parameter)."""
    params = dict(model.named_parameters())
    n = objective.batch_size(batch)
    grads = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in names}
    samples = objective.split(batch)
    for start in range(0, n, micro_batch):
        chunk = samples[start:start + micro_batch]
        if isinstance(objective, CausalLMObjective):
            loss = _causal_losses(model, chunk, objective.loss_reduction).sum() / n
        else:
            loss = torch.stack([objective.loss(model, s).float() for s in chunk]).sum() / n
        got = torch.autograd.grad(loss, [params[name] for name in names])
        for name, g in zip(names, got):
            grads[name] += g.float()
    return grads
