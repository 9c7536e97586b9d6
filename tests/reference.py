"""Independent float64 references for the engine: one backward per sample on the padded
sample with its mask, SPEC section 2 slices written out per family, and explicit loops."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F


def brute_grads(model, batch):
    """{sample_id: {param_name: float64 grad}} with one backward per (padded) sample."""
    m = copy.deepcopy(model).double().eval()
    out = {}
    for k, sid in enumerate(batch["sample_ids"]):
        m.zero_grad(set_to_none=True)
        ids = batch["input_ids"][k:k + 1]
        mask = batch["attention_mask"][k:k + 1]
        logits = m(input_ids=ids, attention_mask=mask).logits[0, :-1]
        lab = batch["labels"][k, 1:]
        keep = lab != -100
        F.cross_entropy(logits[keep], lab[keep]).backward()
        out[sid] = {n: p.grad.detach().clone() for n, p in m.named_parameters()
                    if p.grad is not None}
    return out


def spec_slice(family, grads, cfg, layer, block, head, include_bias=False):
    """S(B, l, h) of a family's parameter dict, flattened (SPEC section 2, by hand)."""
    H, dk, dv = cfg["H"], cfg["dk"], cfg["dv"]
    kv = head // (H // cfg["Hkv"])
    if family == "gpt2":
        pre = f"transformer.h.{layer}.attn."
        W = grads[pre + "c_attn.weight"]          # Conv1D [d, 3·H·dk]: heads along columns
        b = grads[pre + "c_attn.bias"]
        col = {"Q": head * dk, "K": H * dk + head * dk, "V": 2 * H * dk + head * dv}
        if block == "O":                          # Conv1D c_proj [H·dv, d]: heads along ROWS
            return grads[pre + "c_proj.weight"][head * dv:(head + 1) * dv, :].reshape(-1)
        size = dv if block == "V" else dk
        part = W[:, col[block]:col[block] + size].T.reshape(-1)
        if include_bias:
            part = torch.cat([part, b[col[block]:col[block] + size]])
        return part
    if family == "llama":
        pre = f"model.layers.{layer}.self_attn."
        if block == "O":
            return grads[pre + "o_proj.weight"][:, head * dv:(head + 1) * dv].reshape(-1)
        name, row, size = {"Q": ("q_proj", head * dk, dk), "K": ("k_proj", kv * dk, dk),
                           "V": ("v_proj", kv * dv, dv)}[block]
        part = grads[pre + name + ".weight"][row:row + size].reshape(-1)
        if include_bias:
            part = torch.cat([part, grads[pre + name + ".bias"][row:row + size]])
        return part
    raise ValueError(family)


def brute_scores(family, cfg, grads_a, grads_b, fisher, block, layers, heads, *,
                 epsilon=1e-10, ridge_lambda=1e-8, ridge_lambda_rel=0.0, variant="qkov",
                 aggregate="sum", gj_norm="none", fisher_a=None, include_bias=False):
    """M [n_a, n_b, n_layers, n_heads] by explicit loops over every pair, layer and head."""
    ids_a, ids_b = list(grads_a), list(grads_b)
    out = np.zeros((len(ids_a), len(ids_b), len(layers), len(heads)))
    sl = lambda g, l, h: spec_slice(family, g, cfg, l, block, h, include_bias)
    n_block = cfg["H"] if block in ("Q", "O") else cfg["Hkv"]
    group = cfg["H"] // cfg["Hkv"]
    for li, layer in enumerate(layers):
        whole = torch.cat([sl(fisher, layer, h if block in ("Q", "O") else h * group)
                           for h in range(n_block)])
        lam = max(ridge_lambda, ridge_lambda_rel * float(np.median(whole.numpy())))
        for hi, head in enumerate(heads):
            I = sl(fisher, layer, head)
            D = I.clamp_min(epsilon) + lam
            for i, a in enumerate(ids_a):
                ga = sl(grads_a[a], layer, head)
                for j, b in enumerate(ids_b):
                    gb = sl(grads_b[b], layer, head)
                    if gj_norm == "l2":
                        gb = gb / torch.sqrt(sum((v ** 2).sum() for v in _attn(family, grads_b[b], cfg, include_bias)))
                    if variant == "qkov":
                        v = (ga ** 2 / D * gb.abs()).sum()
                    elif variant == "signed":
                        v = (ga * gb / D).sum()
                    elif variant == "symmetric":
                        v = (ga.abs() * gb.abs() / D).sum()
                    else:
                        v = (sl(fisher_a, layer, head) / D * gb.abs()).sum()
                    if aggregate == "mean":
                        v = v / I.numel()
                    out[i, j, li, hi] = float(v)
    return out


def _attn(family, g, cfg, include_bias):
    """All distinct head slices of one sample's gradient (the attention parameters)."""
    group = cfg["H"] // cfg["Hkv"]
    for layer in range(cfg["L"]):
        for block in "QKVO":
            heads = range(cfg["H"]) if block in "QO" else range(0, cfg["H"], group)
            for h in heads:
                yield spec_slice(family, g, cfg, layer, block, h, include_bias)


def fisher_mean(grads_by_id):
    """Elementwise mean of g ⊙ g over samples, per parameter."""
    names = next(iter(grads_by_id.values())).keys()
    return {n: torch.stack([g[n] ** 2 for g in grads_by_id.values()]).mean(0) for n in names}
