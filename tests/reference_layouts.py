"""Independent references for the attention layouts of tests/test_architectures.py.

Nothing here imports the adapters: SPEC section 2's slices S(B, l, h) are written out BY
HAND per family from the parameter names and reshapes of each transformers
implementation; gradients come from one float64 backward per PADDED sample (with its
attention mask) and the scores from explicit loops. Also a small model with transformers
4.x ViT module names (``vit.encoder.layer.i.attention.attention.query`` ...), which
transformers 5.x no longer builds for ViT itself.
"""
from __future__ import annotations

import copy
import hashlib
import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# S(B, l, h) by hand
# ----------------------------------------------------------------------------------------
def _rows(W, start, size):
    return W[start:start + size]


def spec_slice(family, P, cfg, layer, block, head, include_bias=False):
    """S(block, layer, head) of the parameter dict ``P`` (name -> tensor), flattened, in
    the order [weight rows (or columns) row-major, then bias entries]."""
    H, Hkv, dk, dv = cfg["H"], cfg["Hkv"], cfg["dk"], cfg["dv"]
    p = H // Hkv
    kv = head // p
    l = layer

    def split(q, k, v, o):
        """Separate q/k/v Linear modules (rows) and an o Linear (columns)."""
        if block == "O":
            return P[o + ".weight"][:, head * dv:(head + 1) * dv].reshape(-1)
        name, start, size = {"Q": (q, head * dk, dk), "K": (k, kv * dk, dk),
                             "V": (v, kv * dv, dv)}[block]
        part = _rows(P[name + ".weight"], start, size).reshape(-1)
        if include_bias and name + ".bias" in P:
            part = torch.cat([part, _rows(P[name + ".bias"], start, size)])
        return part

    def fused(qkv, o, view):
        """One fused Linear; ``view(tensor)`` returns {Q: [H, d, ...], K: [Hkv, d, ...],
        V: [Hkv, d, ...]} views of its weight (or bias)."""
        if block == "O":
            return P[o + ".weight"][:, head * dv:(head + 1) * dv].reshape(-1)
        idx = head if block == "Q" else kv
        part = view(P[qkv + ".weight"])[block][idx].reshape(-1)
        if include_bias and qkv + ".bias" in P:
            part = torch.cat([part, view(P[qkv + ".bias"])[block][idx].reshape(-1)])
        return part

    def interleaved(W):  # [H, 3, d, ...]: head k = [q_k, k_k, v_k]
        w = W.reshape(H, 3, dk, *W.shape[1:])
        return {"Q": w[:, 0], "K": w[:, 1], "V": w[:, 2]}

    def concat(W):  # [Q (H·dk) | K (Hkv·dk) | V (Hkv·dv)]
        q, k, v = torch.split(W, [H * dk, Hkv * dk, Hkv * dv])
        return {"Q": q.reshape(H, dk, *W.shape[1:]), "K": k.reshape(Hkv, dk, *W.shape[1:]),
                "V": v.reshape(Hkv, dv, *W.shape[1:])}

    def grouped(W):  # [Hkv, p + 2, d, ...]: group g = [q_{g·p} .. q_{g·p+p-1}, k_g, v_g]
        w = W.reshape(Hkv, p + 2, dk, *W.shape[1:])
        return {"Q": w[:, :p].reshape(H, dk, *W.shape[1:]), "K": w[:, p], "V": w[:, p + 1]}

    def mqa(W):  # [q_0 .. q_{H-1}, k, v]
        w = W.reshape(H + 2, dk, *W.shape[1:])
        return {"Q": w[:H], "K": w[H:H + 1], "V": w[H + 1:H + 2]}

    if family == "gpt2":  # Conv1D, stored [in, out]: c_attn heads along COLUMNS, c_proj ROWS
        a = f"transformer.h.{l}.attn."
        if block == "O":
            return P[a + "c_proj.weight"][head * dv:(head + 1) * dv, :].reshape(-1)
        start = {"Q": head * dk, "K": H * dk + head * dk, "V": 2 * H * dk + head * dv}[block]
        size = dv if block == "V" else dk
        part = P[a + "c_attn.weight"][:, start:start + size].T.reshape(-1)
        if include_bias:
            part = torch.cat([part, P[a + "c_attn.bias"][start:start + size]])
        return part
    if family in ("llama", "mistral", "qwen2", "gemma3"):
        a = f"model.layers.{l}.self_attn."
        return split(a + "q_proj", a + "k_proj", a + "v_proj", a + "o_proj")
    if family == "phi":
        a = f"model.layers.{l}.self_attn."
        return split(a + "q_proj", a + "k_proj", a + "v_proj", a + "dense")
    if family == "opt":
        a = f"model.decoder.layers.{l}.self_attn."
        return split(a + "q_proj", a + "k_proj", a + "v_proj", a + "out_proj")
    if family in ("bert", "bert_encoder", "minilm"):
        a = ("bert." if family == "bert" else "") + f"encoder.layer.{l}.attention."
        return split(a + "self.query", a + "self.key", a + "self.value", a + "output.dense")
    if family == "vit":
        a = f"vit.layers.{l}.attention."
        return split(a + "q_proj", a + "k_proj", a + "v_proj", a + "o_proj")
    if family in ("vit_legacy", "videomae"):
        a = ("vit" if family == "vit_legacy" else "videomae") + f".encoder.layer.{l}.attention."
        return split(a + "attention.query", a + "attention.key", a + "attention.value",
                     a + "output.dense")
    if family == "phi3":
        a = f"model.layers.{l}.self_attn."
        return fused(a + "qkv_proj", a + "o_proj", concat)
    if family == "gpt_neox":
        a = f"gpt_neox.layers.{l}.attention."
        return fused(a + "query_key_value", a + "dense", interleaved)
    if family in ("falcon", "falcon_mqa", "falcon_mha", "bloom"):
        a = f"transformer.h.{l}.self_attention."
        view = {"falcon": grouped, "falcon_mqa": mqa, "falcon_mha": interleaved,
                "bloom": interleaved}[family]
        return fused(a + "query_key_value", a + "dense", view)
    raise ValueError(family)


# ----------------------------------------------------------------------------------------
# float64 per-sample gradients, one backward per padded sample
# ----------------------------------------------------------------------------------------
def _grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def mlm_chosen(seed, sample_id, ids, eligible, prob):
    """The documented masking rule, re-derived: sha256(f'{seed}\\x1f{id}') -> 63-bit seed;
    one float64 uniform per real token; chosen = eligible & (u < prob), else the eligible
    token with the smallest u."""
    digest = hashlib.sha256(f"{seed}\x1f{sample_id}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    u = torch.rand(ids.shape[0], generator=g, dtype=torch.float64)
    chosen = eligible & (u < prob)
    if not chosen.any():
        chosen[torch.where(eligible, u, torch.full_like(u, 2.0)).argmin()] = True
    return chosen


def brute_grads_any(kind, model, batch, *, seed=0, mlm_probability=0.15, special=(),
                    mask_token_id=None, dtype=torch.float64, trim=False):
    """{sample_id: {param: float64 grad}}; ``kind``: causal_lm | masked_lm | pair_cosine |
    image_classification. Text samples run PADDED with their attention mask, or, with
    ``trim``, alone on their real tokens (the objectives' definition of a sample's loss,
    which differs from the padded one for models that are not padding-invariant: Funnel's
    pooling, Nyström landmarks). ``dtype``: float32 only for families whose code cannot
    run in float64."""
    m = copy.deepcopy(model).to(dtype).eval()
    out = {}
    for k, sid in enumerate(batch["sample_ids"]):
        m.zero_grad(set_to_none=True)
        if kind == "image_classification":
            logits = m(pixel_values=batch["pixel_values"][k:k + 1].to(dtype)).logits
            loss = F.cross_entropy(logits, batch["labels"][k:k + 1])
        elif kind == "causal_lm":
            real = batch["attention_mask"][k].bool()
            ids = batch["input_ids"][k][real] if trim else batch["input_ids"][k]
            lab = (batch["labels"][k][real] if trim else batch["labels"][k])[1:]
            am = None if trim else batch["attention_mask"][k:k + 1]
            logits = m(input_ids=ids[None], attention_mask=am).logits[0, :-1]
            loss = F.cross_entropy(logits[lab != -100], lab[lab != -100])
        elif kind == "masked_lm":
            ids, mask = batch["input_ids"][k].clone(), batch["attention_mask"][k].bool()
            real = ids[mask]
            eligible = torch.ones_like(real, dtype=torch.bool)
            for t in special:
                eligible &= real != t
            chosen = torch.zeros_like(mask)
            chosen[mask] = mlm_chosen(seed, sid, real, eligible, mlm_probability)
            labels = ids.clone()
            ids[chosen] = mask_token_id
            if trim:
                ids, labels, chosen, mask = ids[mask], labels[mask], chosen[mask], mask[mask]
            logits = m(input_ids=ids[None],
                       attention_mask=None if trim else mask.long()[None]).logits[0, :len(ids)]
            loss = F.cross_entropy(logits[chosen], labels[chosen])
        elif kind == "pair_cosine":
            ids, mask, seg = (batch[key][k] for key in ("input_ids", "attention_mask",
                                                         "segment_ids"))
            T_len = ids.shape[0]
            embs = []
            for s in (0, 1):
                toks = ids[mask.bool() & (seg == s)]
                x = torch.zeros(1, T_len, dtype=torch.long)
                am = torch.zeros(1, T_len, dtype=torch.long)
                x[0, :len(toks)], am[0, :len(toks)] = toks, 1
                hid = m(input_ids=x, attention_mask=am).last_hidden_state[0]
                embs.append((hid * am[0, :, None]).sum(0) / am.sum())
            loss = 1 - torch.dot(embs[0], embs[1]) / (embs[0].norm() * embs[1].norm())
        else:
            raise ValueError(kind)
        loss.backward()
        out[sid] = {n: g.double() for n, g in _grads(m).items()}
    return out


def fisher_mean(grads_by_id):
    names = next(iter(grads_by_id.values())).keys()
    return {n: torch.stack([g[n] ** 2 for g in grads_by_id.values()]).mean(0) for n in names}


def brute_scores(family, cfg, grads_a, grads_b, fisher, block, *, epsilon=1e-10,
                 ridge_lambda=1e-8, include_bias=False):
    """M [n_a, n_b, L, H] = Σ_k C_ik / (max(Î_k, ε) + λ) · |g_jk|, by explicit loops."""
    return _loop_scores(
        lambda layer, head: lambda g: spec_slice(family, g, cfg, layer, block, head,
                                                 include_bias),
        range(cfg["L"]), cfg["H"], grads_a, grads_b, fisher, epsilon, ridge_lambda)


def _loop_scores(slicer, layers, n_heads, grads_a, grads_b, fisher, epsilon, ridge_lambda):
    """M [n_a, n_b, len(layers), n_heads] by explicit loops; ``slicer(layer, head)`` gives
    the function that cuts S(B, l, h) out of a name -> tensor dict."""
    ids_a, ids_b = list(grads_a), list(grads_b)
    out = np.zeros((len(ids_a), len(ids_b), len(layers), n_heads))
    for li, layer in enumerate(layers):
        for head in range(n_heads):
            sl = slicer(layer, head)
            D = sl(fisher).clamp_min(epsilon) + ridge_lambda
            for i, a in enumerate(ids_a):
                ga = sl(grads_a[a])
                for j, b in enumerate(ids_b):
                    out[i, j, li, head] = float((ga ** 2 / D * sl(grads_b[b]).abs()).sum())
    return out


# ----------------------------------------------------------------------------------------
# transformers 4.x ViT module names
# ----------------------------------------------------------------------------------------
class _Container(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for k, v in children.items():
            setattr(self, k, v)


class _LegacySelfAttention(nn.Module):
    """transformers 4.x ``ViTSelfAttention``: query/key/value Linear, heads contiguous rows."""

    def __init__(self, d, H):
        super().__init__()
        self.H, self.dh = H, d // H
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        n, T, _ = x.shape
        heads = lambda t: t.view(n, T, self.H, self.dh).transpose(1, 2)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(n, T, -1)
        return ctx, probs


class _LegacyLayer(nn.Module):
    def __init__(self, d, H, ff):
        super().__init__()
        self.attention = _Container(attention=_LegacySelfAttention(d, H),
                                    output=_Container(dense=nn.Linear(d, d)))
        self.layernorm_before, self.layernorm_after = nn.LayerNorm(d), nn.LayerNorm(d)
        self.intermediate = _Container(dense=nn.Linear(d, ff))
        self.output = _Container(dense=nn.Linear(ff, d))

    def forward(self, x):
        ctx, probs = self.attention.attention(self.layernorm_before(x))
        x = x + self.attention.output.dense(ctx)
        h = F.gelu(self.intermediate.dense(self.layernorm_after(x)))
        return x + self.output.dense(h), probs


class LegacyViTForImageClassification(nn.Module):
    """A ViT classifier whose parameter names are those of transformers 4.x:
    ``vit.embeddings.patch_embeddings.projection``, ``vit.encoder.layer.i.attention.
    attention.{query,key,value}``, ``vit.encoder.layer.i.attention.output.dense``, ...,
    with an HF-like ``config`` (hidden_size, num_attention_heads, num_hidden_layers)."""

    main_input_name = "pixel_values"

    def __init__(self, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                 intermediate_size=48, image_size=8, patch_size=4, num_channels=1,
                 num_labels=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(
            hidden_size=hidden_size, num_attention_heads=num_attention_heads,
            num_hidden_layers=num_hidden_layers, intermediate_size=intermediate_size,
            image_size=image_size, patch_size=patch_size, num_channels=num_channels,
            num_labels=num_labels, model_type="vit")
        d, n_patch = hidden_size, (image_size // patch_size) ** 2
        emb = _Container(patch_embeddings=_Container(
            projection=nn.Conv2d(num_channels, d, patch_size, stride=patch_size)))
        emb.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        emb.position_embeddings = nn.Parameter(torch.randn(1, n_patch + 1, d) * 0.02)
        layers = nn.ModuleList(_LegacyLayer(d, num_attention_heads, intermediate_size)
                               for _ in range(num_hidden_layers))
        self.vit = _Container(embeddings=emb, encoder=_Container(layer=layers),
                              layernorm=nn.LayerNorm(d))
        self.classifier = nn.Linear(d, num_labels)

    def forward(self, pixel_values, output_attentions=False, **_):
        e = self.vit.embeddings
        x = e.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([e.cls_token.expand(x.shape[0], -1, -1), x], 1) + e.position_embeddings
        attns = []
        for layer in self.vit.encoder.layer:
            x, probs = layer(x)
            attns.append(probs)
        logits = self.classifier(self.vit.layernorm(x)[:, 0])
        return SimpleNamespace(logits=logits, attentions=tuple(attns) if output_attentions
                               else None)


# ----------------------------------------------------------------------------------------
# any family (the coverage sweep): slices from a PROVEN indexer, everything else by hand
# ----------------------------------------------------------------------------------------
def text_batch(n, T_len, seed, prefix, vocab, pad=0):
    """Right-padded batch: sample k keeps T_len - 2·(k % 3) tokens drawn from [4, vocab)
    (capped at 97; ids 0-3 are the tiny configs' special tokens); padding id ``pad`` (the
    model's pad token: mBART finds its decoder start by it), labels -100 at padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, min(int(vocab), 97), (n, T_len), generator=g)
    mask = torch.ones(n, T_len, dtype=torch.long)
    for k in range(n):
        keep = T_len - (k % 3) * 2
        mask[k, keep:], ids[k, keep:] = 0, pad
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "sample_ids": [f"{prefix}:{k}" for k in range(n)]}


def image_batch(model, n, seed, prefix):
    """Random pixel_values of the config's size and random labels of its classes."""
    from interference.architectures.proof import default_inputs

    g = torch.Generator().manual_seed(seed)
    shape = default_inputs(model)["pixel_values"].shape[1:]
    n_labels = int(getattr(model.config, "num_labels", 2))
    return {"pixel_values": torch.randn(n, *shape, generator=g),
            "labels": torch.randint(0, n_labels, (n,), generator=g),
            "sample_ids": [f"{prefix}:{k}" for k in range(n)]}


def brute_scores_indexed(idx, grads_a, grads_b, fisher, block, *, epsilon=1e-10,
                         ridge_lambda=1e-8):
    """M [n_a, n_b, L, H] by explicit loops, S(B, l, h) from ``idx.head_param_indices``."""
    def slicer(layer, head):
        S = idx.head_param_indices(layer, block, head)
        return lambda g: torch.cat([g[n].reshape(-1)[ix] for n, ix in S.items()])

    return _loop_scores(slicer, list(idx.layers), idx.config.num_heads, grads_a, grads_b,
                        fisher, epsilon, ridge_lambda)


class NonFiniteReference(ArithmeticError):
    """The brute force's gradients (or the engine's scores) hold NaN / Inf."""


def heatmap_vs_brute(model, kind, include_bias=False, n_fisher=3, n_scored=2,
                     ref_dtype=torch.float64, trim=True):
    """Largest |engine - float64 brute force| / max |brute| over the four blocks of the
    default heatmap (qkov, pooled Fisher, ridge 1e-14) of a tiny model of any family
    (``ref_dtype`` float32: the gradients of the brute force in float32, for families
    whose code cannot run in float64; the loops stay float64). ``trim``: each text
    sample's reference gradient from its real tokens alone (``brute_grads_any``).
    NonFiniteReference when the reference or the heatmap is not finite (a NaN would
    otherwise drop out of the max)."""
    from interference.architectures import QKOVConfig, QKOVIndexer
    from interference.gradients import OBJECTIVES, FisherCollector, default_objective
    from interference.scores import QKOVInterferenceMetric

    cfg = QKOVConfig.from_model(model, include_bias=include_bias)
    if kind == "masked_lm":
        obj = OBJECTIVES["masked_lm"].for_model(model, mlm_probability=0.3)
    elif kind == "causal_lm":   # the sweep's kind, also for decoders not named *ForCausalLM
        cls = OBJECTIVES["causal_lm"]
        obj = cls.for_model(model) if hasattr(cls, "for_model") else cls()
    else:
        obj = default_objective(model)
    vocab = getattr(model.config, "vocab_size", 97)
    def make(n, seed, prefix):
        if kind == "image_classification":
            return image_batch(model, n, seed, prefix)
        pad = getattr(model.config, "pad_token_id", None)
        b = text_batch(n, 8, seed, prefix, vocab, pad if isinstance(pad, int) else 0)
        if kind == "masked_lm":
            del b["labels"]   # labels in the batch would mean "already masked by the data"
        return b

    batches = {("a", "fisher"): make(n_fisher, 1, "a:f"), ("b", "fisher"): make(n_fisher, 2, "b:f"),
               ("a", "scored"): make(n_scored, 3, "a:s"), ("b", "scored"): make(n_scored, 4, "b:s")}
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, objective=obj)
    for (task, role), b in batches.items():
        fc.collect_fisher(model, b, task=task, mode="mean", role=role)
    extra = {}
    if kind == "masked_lm":
        extra = dict(seed=obj.seed, mlm_probability=obj.mlm_probability,
                     special=tuple(obj.special_token_ids), mask_token_id=obj.mask_token_id)
    ref = {k: brute_grads_any(kind, model, b, dtype=ref_dtype, trim=trim, **extra)
           for k, b in batches.items()}
    bad = sorted({n for r in ref.values() for g in r.values() for n, t in g.items()
                  if not torch.isfinite(t).all()})
    if bad:
        raise NonFiniteReference(f"{ref_dtype} brute-force gradients are not finite: {bad[:2]}")
    Fa, Fb = fisher_mean(ref[("a", "fisher")]), fisher_mean(ref[("b", "fisher")])
    pooled = {n: (Fa[n] + Fb[n]) / 2 for n in Fa}
    heat = QKOVInterferenceMetric(cfg, fc, ridge_lambda=1e-14).compute_heatmap("a", "b")
    idx = QKOVIndexer(model, cfg)
    err = 0.0
    for block in "QKVO":
        want = brute_scores_indexed(idx, ref[("a", "scored")], ref[("b", "scored")], pooled,
                                    block, ridge_lambda=1e-14)
        got = heat[block]["scores"]
        if got.shape != want.shape:
            raise AssertionError(f"{block}: heatmap shape {got.shape} != brute {want.shape}")
        if not (np.isfinite(got).all() and np.isfinite(want).all() and np.abs(want).max() > 0):
            raise NonFiniteReference(f"{block}: heatmap or brute force not finite, or all zero")
        err = max(err, float(np.abs(got - want).max() / np.abs(want).max()))
    return err
