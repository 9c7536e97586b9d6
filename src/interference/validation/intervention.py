"""The intervention a practitioner would make with the map: freeze cells, fine-tune on B.

Arms, each a fresh fine-tuning of the same starting model on task B (AdamW):

- ``none``: nothing frozen;
- ``top``: the k cells the map ranks first frozen; ``bottom``: the k it ranks last;
- ``random``: k random cells with the same number of cells per block as ``top`` (so the
  same number of frozen parameters, exactly), ``n_random`` draws; draw r is the same set
  for every seed. Each block's cells are drawn from that block's cells in (layer, head)
  order, so the draws depend on the ranking only through top's count per block.

Freezing is exact: the frozen entries' gradients are zeroed before every optimizer step
and their values put back bitwise after it (AdamW's weight decay would move them
otherwise). Every arm and seed sees the same sequence of B batches for a given seed.
Forgetting = L_A(after) - L_A(before) on task A's eval samples; learning = L_B(before) -
L_B(after) on task B's eval samples.

:func:`compare_arms` asks whether freezing the map's top-k forgets less than freezing
random k: the difference of mean forgetting (top minus random, negative = the map helps),
a percentile bootstrap interval over (seed, draw) pairs, and the permutation p-value
p = (1 + #{r : F̄_random(r) <= F̄_top}) / (1 + n_random), F̄ averaged over seeds: under the
null that the top-k set is no better than a matched random set, F̄_top is exchangeable
with the draws (resolution 1 / (1 + n_random)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .cells import Cell, CellParams
from .ensemble import finetune_stacked, stackable
from .losses import sample_losses

TRAINABLE = ("attention", "all")


@dataclass(frozen=True)
class FinetuneSettings:
    """One fine-tuning run on task B.

    Attributes:
        steps: optimizer steps.
        lr: AdamW learning rate.
        batch_size: samples per step (drawn without replacement, reshuffled each epoch).
        weight_decay: AdamW's decoupled weight decay.
        trainable: 'attention' (the parameters the map covers; the rest fixed) or 'all'.
    """

    steps: int = 50
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    trainable: str = "attention"

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable={self.trainable!r} is not one of {TRAINABLE}")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("steps and batch_size must be >= 1 and lr > 0")


def _subset(batch: dict, idx: list[int]) -> dict:
    return {k: v[idx] for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out, pool = [], []
    for _ in range(steps):
        if len(pool) < batch_size:
            pool += torch.randperm(n, generator=gen).tolist()
        out.append(pool[:batch_size])
        pool = pool[batch_size:]
    return out


def trainable_names(model, params: CellParams, settings: FinetuneSettings) -> list[str]:
    """The parameters the fine-tuning updates: the attention weights or all."""
    if settings.trainable == "attention":
        return params.indexer.param_names
    return [n for n, _ in model.named_parameters()]


def finetune(model, objective, train: dict, params: CellParams, frozen: list[Cell],
             settings: FinetuneSettings, seed: int, micro_batch: int = 16) -> list[float]:
    """Fine-tune ``model`` in place on ``train`` with ``frozen`` cells fixed; returns the
    training loss per step."""
    names = trainable_names(model, params, settings)
    trainable = [params.params[n] for n in names]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in set(names))
    opt = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    index = params.merged(frozen)                          # name -> flat indices
    kept = {name: params.params[name].detach().view(-1)[i].clone() for name, i in index.items()}
    n = objective.batch_size(train)
    losses = []
    try:
        for idx in _order(n, settings.steps, settings.batch_size, seed):
            opt.zero_grad(set_to_none=False)
            loss = sample_losses(model, objective, _subset(train, idx), micro_batch,
                                 grad=True).mean()
            loss.backward()
            params.zero_grads(index)
            opt.step()
            with torch.no_grad():                          # bitwise back (weight decay)
                for name, i in index.items():
                    params.params[name].view(-1).index_copy_(0, i, kept[name])
            losses.append(float(loss.detach()))
    finally:
        for n_, p in model.named_parameters():
            p.requires_grad_(flags[n_])
            p.grad = None
    return losses


def matched_random(ranked: list[Cell], k: int, all_cells: list[Cell],
                   rng: np.random.Generator) -> list[Cell]:
    """k random cells with as many cells per block as the first k of ``ranked``, drawn
    from ``all_cells`` in its own order (so a draw depends on the map only through those
    counts when ``all_cells`` is in a fixed order)."""
    need: dict[str, int] = {}
    for c in ranked[:k]:
        need[c.block] = need.get(c.block, 0) + 1
    out = []
    for block, m in sorted(need.items()):
        pool = [c for c in all_cells if c.block == block]
        out += [pool[i] for i in sorted(rng.choice(len(pool), size=m, replace=False))]
    return out


def arm_sets(ranked: list[Cell], fractions, n_random: int, seed: int
             ) -> list[tuple[str, float, int, list[Cell]]]:
    """[(arm, fraction, draw, frozen cells)] for every arm of the design (module docstring)."""
    out = [("none", 0.0, 0, [])]
    pool = sorted(ranked)              # block, layer, head: draws independent of the ranking
    for f in fractions:
        k = max(1, math.ceil(f * len(ranked)))
        out.append(("top", f, 0, ranked[:k]))
        out.append(("bottom", f, 0, ranked[-k:]))
        rng = np.random.default_rng([seed, int(round(f * 1e6))])
        out += [("random", f, r, matched_random(ranked, k, pool, rng))
                for r in range(n_random)]
    return out


def _row(name, f, draw, seed, frozen, params, before, after) -> dict:
    return {"arm": name, "fraction": f, "k": len(frozen), "draw": draw, "seed": seed,
            "n_frozen_params": sum(params.size(c) for c in frozen),
            "frozen": ";".join(c.name for c in frozen),
            "loss_a_before": before[0], "loss_a_after": after[0],
            "loss_b_before": before[1], "loss_b_after": after[1],
            "forgetting": after[0] - before[0], "learning": before[1] - after[1]}


def run_arms(model, objective, train_b: dict, eval_a: dict, eval_b: dict,
             params: CellParams, ranked: list[Cell], settings: FinetuneSettings,
             fractions=(0.05, 0.1, 0.2), n_random: int = 20, seeds=(0, 1, 2),
             micro_batch: int = 16, progress: bool = True, runs_per_pass: int = 1
             ) -> pd.DataFrame:
    """Every arm x seed: one row with arm, fraction, k, draw, seed, n_frozen_params,
    frozen (cell names), loss_a/b before and after, forgetting, learning.

    ``runs_per_pass`` > 1 fine-tunes that many runs at once (:mod:`.ensemble`; attention
    weights of Linear / Conv1D modules of causal LMs, else one run at a time)."""
    names = trainable_names(model, params, settings)
    start = {n: params.params[n].detach().clone() for n in names}

    def losses() -> tuple[float, float]:
        return (float(sample_losses(model, objective, eval_a, micro_batch).mean()),
                float(sample_losses(model, objective, eval_b, micro_batch).mean()))

    before = losses()
    arms = arm_sets(ranked, fractions, n_random, seeds[0] if seeds else 0)
    jobs = [(arm, s) for arm in arms for s in seeds]
    together = runs_per_pass > 1 and settings.trainable == "attention" and \
        stackable(model, objective, names)
    size = runs_per_pass if together else 1
    n = objective.batch_size(train_b)
    rows = []
    bar = tqdm(total=len(jobs), desc="intervention arms", disable=not progress, mininterval=5)
    for g in range(0, len(jobs), size):
        group = jobs[g:g + size]
        if together:
            final = finetune_stacked(
                model, objective, train_b, params, [arm[3] for arm, _ in group],
                [_order(n, settings.steps, settings.batch_size, s) for _, s in group],
                names, settings)
        for r, ((name, f, draw, frozen), seed) in enumerate(group):
            with torch.no_grad():
                for p in names:
                    params.params[p].copy_(final[p][r] if together else start[p])
            if not together:
                finetune(model, objective, train_b, params, frozen, settings, seed, micro_batch)
            rows.append(_row(name, f, draw, seed, frozen, params, before, losses()))
            bar.update()
        with torch.no_grad():
            for p, v in start.items():
                params.params[p].copy_(v)
    bar.close()
    return pd.DataFrame(rows)


def compare_arms(arms: pd.DataFrame, versus: str = "top", n_bootstrap: int = 2000,
                 seed: int = 0, ci_level: float = 0.95) -> pd.DataFrame:
    """Per fraction: ``versus`` (top or bottom) against the matched random draws (module
    docstring). Columns: arm, fraction, k, forgetting (mean over seeds), random_forgetting,
    diff (versus minus random; < 0: versus forgets less), diff_low / diff_high (two-way
    percentile bootstrap: seeds resampled for both arms alike, draws resampled), p_value
    (one-sided permutation p: versus forgets less), learning, random_learning, n_random,
    n_seeds."""
    rows = []
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - ci_level) / 2, 1 - (1 - ci_level) / 2
    for f, grp in arms[arms["arm"].isin([versus, "random"])].groupby("fraction"):
        mine = grp[grp["arm"] == versus].groupby("seed")["forgetting"].mean()
        rand = grp[grp["arm"] == "random"].pivot_table(index="seed", columns="draw",
                                                       values="forgetting")
        if mine.empty or rand.empty:
            continue
        seeds = [s for s in mine.index if s in rand.index]
        top = mine.loc[seeds].to_numpy()                    # [n_seeds]
        draws = rand.loc[seeds].to_numpy()                  # [n_seeds, n_random]
        si = rng.integers(0, len(seeds), size=(n_bootstrap, len(seeds)))
        ri = rng.integers(0, draws.shape[1], size=(n_bootstrap, draws.shape[1]))
        boots = top[si].mean(1) - np.stack([draws[np.ix_(s, r)].mean()
                                            for s, r in zip(si, ri)])
        f_top, f_draws = float(top.mean()), draws.mean(0)
        lrn = grp.groupby("arm")["learning"].mean()
        rows.append({"arm": versus, "fraction": f,
                     "k": int(grp.loc[grp["arm"] == versus, "k"].iloc[0]),
                     "forgetting": f_top, "random_forgetting": float(f_draws.mean()),
                     "diff": f_top - float(f_draws.mean()),
                     "diff_low": float(np.quantile(boots, lo_q)),
                     "diff_high": float(np.quantile(boots, hi_q)),
                     "p_value": (1 + int((f_draws <= f_top).sum())) / (1 + len(f_draws)),
                     "learning": float(lrn[versus]), "random_learning": float(lrn["random"]),
                     "n_random": len(f_draws), "n_seeds": len(seeds)})
    return pd.DataFrame(rows)
