"""Per-sample objectives: the loss of ONE sample alone (SPEC section 3).

Like kronfluence's ``Task``, an objective is the one seam between a model family and the
engine: ``split(batch)`` turns a padded batch into per-sample inputs (padding removed),
``loss(model, sample)`` returns that sample's scalar loss. Register new ones with
``@register_objective``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

OBJECTIVES: dict[str, type["Objective"]] = {}


def register_objective(cls):
    OBJECTIVES[cls.name] = cls
    return cls


def sample_ids_of(batch: dict, task: str, n: int, start: int) -> list[str]:
    """Dataset ids of the batch's samples: ``batch['sample_ids']`` or ``'{task}:{k}'``."""
    ids = batch.get("sample_ids")
    if ids is None:
        return [f"{task}:{start + k}" for k in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"batch has {n} samples but {len(ids)} sample_ids")
    if len(set(ids)) != n:
        raise ValueError("batch['sample_ids'] contains duplicates")
    return ids


class Objective:
    """Base class. ``loss_reduction``: 'mean' | 'sum' over the sample's loss terms."""

    name = ""

    def __init__(self, loss_reduction: str = "mean", seed: int = 0):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.seed = seed

    def batch_size(self, batch: dict) -> int:
        raise NotImplementedError

    def split(self, batch: dict) -> list[dict]:
        raise NotImplementedError

    def loss(self, model: nn.Module, sample: dict) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"objective": self.name, "loss_reduction": self.loss_reduction}


@register_objective
class CausalLMObjective(Objective):
    """Cross-entropy of next-token prediction over the sample's own tokens.

    Batch: ``input_ids`` [n, T], ``attention_mask`` [n, T] (1 = real token, contiguous; left
    or right padding), optional ``labels`` [n, T] (-100 = not predicted; default: the ids).
    Each sample is run alone on its real tokens only, so its gradient cannot depend on
    the batch it came in.
    """

    name = "causal_lm"

    def batch_size(self, batch):
        return int(batch["input_ids"].shape[0])

    def split(self, batch):
        ids = torch.as_tensor(batch["input_ids"])
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [n, T], got shape {tuple(ids.shape)}")
        mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids))).bool()
        labels = torch.as_tensor(batch["labels"]) if "labels" in batch else None
        if mask.shape != ids.shape or (labels is not None and labels.shape != ids.shape):
            raise ValueError(f"input_ids {tuple(ids.shape)}, attention_mask "
                             f"{tuple(mask.shape)} and labels must have the same shape")
        samples = []
        for k in range(ids.shape[0]):
            keep = mask[k]
            lab = (labels[k] if labels is not None else ids[k].clone())
            lab = torch.where(keep, lab, torch.full_like(lab, -100))[keep]
            samples.append({"input_ids": ids[k][keep], "labels": lab})
        return samples

    def loss(self, model, sample):
        ids = sample["input_ids"].to(_device(model))[None]
        labels = sample["labels"].to(ids.device)[1:]
        logits = model(input_ids=ids).logits[0, :-1].float()
        keep = labels != -100
        n = int(keep.sum())
        if n == 0:
            raise ValueError("sample has no predicted tokens (all labels are -100 or it has "
                             "fewer than 2 tokens)")
        nll = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
        return nll / n if self.loss_reduction == "mean" else nll


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_objective(model: nn.Module, **kwargs) -> Objective:
    """The objective for a model's family: causal LM for ``*ForCausalLM``/LM-head models."""
    name = getattr(model, "qkov_objective", None)
    if name is None:
        cls_name = type(model).__name__
        if cls_name.endswith(("ForCausalLM", "LMHeadModel")):
            name = "causal_lm"
        else:
            for cand in OBJECTIVES.values():
                if getattr(cand, "accepts", None) and cand.accepts(model):
                    name = cand.name
                    break
    if name is None:
        raise ValueError(f"no per-sample objective known for {type(model).__name__}; pass "
                         f"objective=... (registered: {sorted(OBJECTIVES)})")
    return OBJECTIVES[name](**kwargs)
