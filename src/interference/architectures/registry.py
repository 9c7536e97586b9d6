"""Attention layouts: one small adapter per way of storing Q, K, V and O (SPEC section 2).

An adapter says, for one layer and one block, which module holds the block and where
each head's rows (Q/K/V) or columns (O) sit, in the Linear convention (weight [out, in]).
Conv1D modules (GPT-2) store the transpose; the adapter marks them and the indexer
transposes. Adding a layout = writing one adapter and decorating it with
``@register_layout``.

Registered adapters (detected from module paths; Falcon's three also from its config flags):

================== ============================================ ==============================
name               modules (layer id = N)                       head h owns (Linear rows/cols)
================== ============================================ ==============================
llama              layers.N.self_attn.{q,k,v,o}_proj             q/k/v rows, o columns
                   (LLaMA, Mistral, Qwen2, Gemma 3)
opt                layers.N.self_attn.{q,k,v,out}_proj           same
phi                layers.N.self_attn.{q,k,v}_proj + .dense      same
bert               encoder.layer.N.attention.self.{query,key,   same
                   value} + attention.output.dense
vit                layer(s).N.attention.{q,k,v,o}_proj           same (transformers 5.x ViT,
                                                                DeiT, Dinov2, ViTMAE)
vit_legacy         encoder.layer.N.attention.attention.{query,   same (transformers 4.x ViT;
                   key,value} + attention.output.dense          5.x VideoMAE, YOLOS, DPT)
gpt2               h.N.attn.c_attn / c_proj (Conv1D)             [Q | K | V] cols of c_attn,
                                                                rows of c_proj (stored)
phi3               layers.N.self_attn.qkv_proj + o_proj          rows [Q | K | V], GQA sizes
gpt_neox           layers.N.attention.query_key_value + dense    rows [H, (q, k, v), d]
falcon_grouped     h.N.self_attention.query_key_value + dense    rows [H_kv, (q x p, k, v), d]
                   (new_decoder_architecture)
falcon_mqa         same modules (multi_query)                    rows [q_0..q_{H-1}, k, v]
falcon_interleaved same modules (neither flag; also BLOOM)       rows [H, (q, k, v), d]
gpt_bigcode        h.N.attn.c_attn / c_proj (Linear)             multi_query: rows [Q | k | v];
                                                                else [H, (q, k, v), d]
codegen            h.N.attn.qkv_proj + out_proj (module has      4 partitions of [q | v | k]
                   ``mp_num``)
================== ============================================ ==============================

Models no adapter matches are read by ``generic.discover`` (module names + config); any
layout is trusted only after ``proof.prove_layout`` (run on first contact by
``interference.models.describe``).

Every adapter checks the module's weight against the shape the QKOVConfig implies and
raises ValueError naming both shapes when they differ.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from .config import BLOCKS, QKOVConfig, geometry_from_hf_config

LAYOUTS: dict[str, "AttentionLayout"] = {}


def register_layout(cls):
    """Class decorator: instantiate the adapter and register it under ``cls.name``."""
    adapter = cls()
    LAYOUTS[adapter.name] = adapter
    return cls


@dataclass(frozen=True)
class HeadSlices:
    """Where the heads of one block live inside one module.

    ``axis='rows'``: head k owns rows [starts[k], starts[k] + size) of the Linear-convention
    weight [out, in] (and the same entries of the bias). ``axis='cols'``: head k owns
    columns [starts[k], starts[k] + size) of the weight (no bias: the O bias is shared).
    ``transposed``: the stored weight is [in, out] (Conv1D).
    """

    module: str
    axis: str
    starts: tuple[int, ...]
    size: int
    transposed: bool = False


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def weight2d(module: nn.Module):
    """The module's weight as stored in 2-D: [out, in] (Linear), [in, out] (Conv1D), and
    an ``nn.Conv1d`` of kernel 1 (SqueezeBERT, channels first) [out, in/groups, 1] as the
    view [out, in/groups]."""
    w = module.weight
    return w[..., 0] if isinstance(module, nn.Conv1d) else w


def _first_module_is(model: nn.Module, adapter: "AttentionLayout", block: str, test) -> bool:
    """``test(module)`` for the first layer's ``block`` module (False when none)."""
    found = adapter.modules_by_layer(model, block)
    return bool(found) and bool(test(model.get_submodule(found[min(found)])))


def _fit_split_geometry(g: dict, modules: dict[str, nn.Module]) -> dict:
    """Separate q/k/v/o modules: where the config's head_dim, v_head_dim or KV heads
    contradict the weights (a config field the module code does not read), take them from
    the weights' rows with the config's number of query heads; where the modules' input
    widths differ from the config's hidden size, hidden_dim becomes None (each weight's
    width is its own). The proof then checks."""
    shape = {b: tuple(weight2d(m).shape)[::-1 if _is_conv1d(m) else 1] for b, m in
             modules.items()}   # Linear convention [out, in]
    rows = {b: s[0] for b, s in shape.items() if b != "O"}
    o_cols = shape["O"][1]
    widths = {s[1] for b, s in shape.items() if b != "O"} | {shape["O"][0]}
    if widths != {g["hidden_dim"]}:   # MobileBERT: q/k read the bottleneck, v the stream
        g = {**g, "hidden_dim": None}   # each weight's own width is then checked
    h, kv, dk = g["num_heads"], g["num_kv_heads"], g["head_dim"]
    dv = g.get("v_head_dim", dk)
    if dk is not None and (rows["Q"], rows["K"], rows["V"], o_cols) == (
            h * dk, kv * dk, kv * dv, h * dv):
        return g
    if rows["Q"] % h or o_cols % h:
        return g
    dk, dv = rows["Q"] // h, o_cols // h
    if rows["K"] % dk or rows["V"] != rows["K"] // dk * dv:
        return g
    return {**g, "head_dim": dk, "v_head_dim": dv, "num_kv_heads": rows["K"] // dk}


def _split_patterns(prefix: str, q: str, k: str, v: str, o: str, o_prefix: str | None = None
                    ) -> dict[str, str]:
    """Block -> regex for modules ``<prefix>.<name>`` (``prefix`` captures the layer id)."""
    op = prefix if o_prefix is None else o_prefix
    return {"Q": rf"{prefix}\.{q}", "K": rf"{prefix}\.{k}", "V": rf"{prefix}\.{v}",
            "O": rf"{op}\.{o}"}


class AttentionLayout:
    """Base adapter. Subclasses set ``name`` and ``patterns`` and implement ``_slices``.

    ``patterns[block]``: a regex over module paths with one group capturing the layer id.
    ``_slices`` returns the head slices and ``extent``, the number of rows (Q/K/V) or
    columns (O) the whole module must have under the config; ``slices`` checks it.
    """

    name: str = ""
    patterns: dict[str, str] = {}
    fit_geometry = True   # separate q/k/v/o: read head_dim & co from the weights if need be

    def with_patterns(self, name: str, patterns: dict[str, str]) -> "AttentionLayout":
        """A copy of this adapter under ``name`` with other module patterns."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.name, clone.patterns = name, dict(patterns)
        return clone

    # -- discovery -------------------------------------------------------------------
    def _scan(self, model: nn.Module, block: str) -> tuple[dict[int, str], set[int]]:
        rx = re.compile(self.patterns[block])
        found, clashes = {}, set()
        for path, module in model.named_modules():
            m = rx.fullmatch(path)
            if m and getattr(module, "weight", None) is not None:
                layer = int(m.group(1))
                if layer in found:
                    clashes.add(layer)
                found.setdefault(layer, path)
        return found, clashes

    def modules_by_layer(self, model: nn.Module, block: str) -> dict[int, str]:
        """Map layer id -> module path for ``block`` (empty when the pattern matches nothing)."""
        return self._scan(model, block)[0]

    def matches(self, model: nn.Module) -> bool:
        """True when every block's pattern finds the same non-empty set of layers, one
        module per layer (two stacks with the same layer ids, e.g. an encoder and a decoder
        or a vision tower, do not match: their heads would be mixed)."""
        scans = [self._scan(model, b) for b in BLOCKS]
        layer_sets = [set(found) for found, _ in scans]
        if any(clashes for _, clashes in scans):
            return False
        return bool(layer_sets[0]) and all(s == layer_sets[0] for s in layer_sets)

    def extra_match(self, model: nn.Module) -> bool:
        """Further checks beyond module names (e.g. Falcon's variant flags)."""
        return True

    # -- geometry --------------------------------------------------------------------
    def geometry(self, model: nn.Module) -> dict:
        return geometry_from_hf_config(model.config)

    def config_from_model(self, model: nn.Module, include_bias: bool = False) -> QKOVConfig:
        g = self.geometry(model)
        layers = self.modules_by_layer(model, "Q")
        fused = len({self.modules_by_layer(model, b)[min(layers)] for b in ("Q", "K", "V")}) == 1
        first = dict(model.named_modules())[layers[min(layers)]]
        extra = {}
        if not fused and self.fit_geometry:
            g, extra = self._fit_layers(model, g, sorted(layers))
        return QKOVConfig(
            num_layers=len(layers), num_heads=g["num_heads"], head_dim=g["head_dim"],
            v_head_dim=g.get("v_head_dim", g["head_dim"]), hidden_dim=g["hidden_dim"],
            fused_qkv=fused, fused_qkv_transposed=fused and _is_conv1d(first),
            num_kv_heads=g["num_kv_heads"], layout=self.name, include_bias=include_bias,
            extra=extra)

    def _fit_layers(self, model: nn.Module, g: dict, layers: list[int]) -> tuple[dict, dict]:
        """(geometry of the first layer, extra) with ``_fit_split_geometry`` per layer;
        layers whose d_k / d_v differ go to extra['layer_head_dims']; KV heads or widths
        that differ between layers raise ValueError (one KV grouping per model)."""
        paths = {b: self.modules_by_layer(model, b) for b in BLOCKS}
        fits = {l: _fit_split_geometry(g, {b: model.get_submodule(paths[b][l])
                                           for b in BLOCKS}) for l in layers}
        base = fits[layers[0]]
        dims = lambda f: [f["head_dim"], f.get("v_head_dim", f["head_dim"])]
        other = {str(l): dims(f) for l, f in fits.items() if dims(f) != dims(base)}
        same = lambda f: (f["num_heads"], f["num_kv_heads"], f["hidden_dim"])
        if any(same(f) != same(base) for f in fits.values()):
            raise ValueError(f"layout {self.name!r}: KV heads or widths differ between layers "
                             f"({ {l: same(f) for l, f in fits.items()} }): one KV grouping "
                             "per model is supported")
        return base, ({"layer_head_dims": other} if other else {})

    # -- slicing ---------------------------------------------------------------------
    def _path(self, model: nn.Module, layer: int, block: str) -> str:
        path = self.modules_by_layer(model, block).get(layer)
        if path is None:
            raise KeyError(block)
        return path

    def slices(self, model: nn.Module, config: QKOVConfig, layer: int, block: str
               ) -> HeadSlices:
        """The head slices of (layer, block), checked against the module's weight shape."""
        hs, extent = self._slices(model, config, layer, block)
        module = model.get_submodule(hs.module)
        shape = tuple(weight2d(module).shape)
        lin = shape[::-1] if hs.transposed else shape  # Linear convention [out, in]
        width = config.hidden_dim
        if hs.axis == "rows":
            want = (extent, width if width is not None else lin[1])
        else:
            want = (width if width is not None else lin[0], extent)
        if len(lin) != 2 or tuple(lin) != want:
            stored = want[::-1] if hs.transposed else want
            raise ValueError(
                f"L{layer} {block}: the config (num_heads={config.num_heads}, "
                f"num_kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, "
                f"v_head_dim={config.v_head_dim}, hidden_dim={config.hidden_dim}) implies "
                f"{hs.module}.weight of shape {stored} (layout {self.name!r}), but the "
                f"weight's shape is {shape}. Check num_heads / num_kv_heads / head_dim / "
                f"v_head_dim / hidden_dim, or use QKOVConfig.from_model(model).")
        return hs

    def _slices(self, model: nn.Module, config: QKOVConfig, layer: int, block: str
                ) -> tuple[HeadSlices, int]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Split projections: one module per block.
# ---------------------------------------------------------------------------------------
class SplitLayout(AttentionLayout):
    """q/k/v rows per head (K/V with H_kv heads), o columns per query head."""

    def _slices(self, model, config, layer, block):
        path = self._path(model, layer, block)
        if block == "O":
            n, size, axis = config.num_heads, config.v_head_dim, "cols"
        else:
            n = config.block_heads(block)
            size = config.v_head_dim if block == "V" else config.head_dim
            axis = "rows"
        return HeadSlices(path, axis, tuple(k * size for k in range(n)), size), n * size


_ANY = r"(?:.*\.)?"


@register_layout
class LlamaLayout(SplitLayout):
    """LLaMA, Mistral, Qwen2 (q/k/v biases), Gemma 3 (``head_dim`` != d/H; the per-head
    q/k norms hold no head slice): ``layers.N.self_attn.{q,k,v,o}_proj``."""

    name = "llama"
    patterns = _split_patterns(_ANY + r"layers\.(\d+)\.self_attn", "q_proj", "k_proj",
                               "v_proj", "o_proj")

    def extra_match(self, model):
        return not _q_gated(model, self)   # a gated q_proj is GatedQueryLayout's


def _q_gated(model: nn.Module, adapter: "AttentionLayout") -> bool:
    """True when the first layer's q_proj has twice the rows of o_proj's input (a query
    and an output gate per head, Qwen3-Next / Qwen3.5)."""
    found = adapter.modules_by_layer(model, "Q")
    if not found:
        return False
    layer = min(found)
    q = model.get_submodule(found[layer])
    o = model.get_submodule(adapter.modules_by_layer(model, "O").get(layer, found[layer]))
    return q.weight.shape[0] == 2 * o.weight.shape[1]


@register_layout
class GatedQueryLayout(SplitLayout):
    """Qwen3-Next, Qwen3.5: ``layers.N.self_attn.{q,k,v,o}_proj`` where q_proj holds, per
    head h, rows [2h·d_k, (2h+1)·d_k) of query and then d_k rows of an output gate
    (sigmoid(gate) scales head h's context). Head h's Q slice is its query rows; the gate
    rows are in no block (like q_norm weights). Told from LLaMA by q_proj's 2·H·d_k rows."""

    name = "llama_gated_q"
    patterns = LlamaLayout.patterns
    fit_geometry = False

    def extra_match(self, model):
        return _q_gated(model, self)

    def _slices(self, model, config, layer, block):
        if block != "Q":
            return super()._slices(model, config, layer, block)
        d, h = config.head_dim, config.num_heads
        return (HeadSlices(self._path(model, layer, "Q"), "rows",
                           tuple(2 * k * d for k in range(h)), d), 2 * h * d)


@register_layout
class OPTLayout(SplitLayout):
    """OPT: ``layers.N.self_attn.{q,k,v,out}_proj`` with biases."""

    name = "opt"
    patterns = _split_patterns(_ANY + r"layers\.(\d+)\.self_attn", "q_proj", "k_proj",
                               "v_proj", "out_proj")


@register_layout
class PhiLayout(SplitLayout):
    """Phi-1/1.5/2: ``layers.N.self_attn.{q,k,v}_proj`` (biases) and output ``dense``."""

    name = "phi"
    patterns = _split_patterns(_ANY + r"layers\.(\d+)\.self_attn", "q_proj", "k_proj",
                               "v_proj", "dense")


@register_layout
class BertLayout(SplitLayout):
    """BERT-style encoders (BERT, RoBERTa, MiniLM, ...):
    ``encoder.layer.N.attention.self.{query,key,value}`` and ``attention.output.dense``."""

    name = "bert"
    patterns = _split_patterns(_ANY + r"layer\.(\d+)\.attention\.self", "query", "key", "value",
                               "dense", o_prefix=_ANY + r"layer\.(\d+)\.attention\.output")


@register_layout
class ViTLayout(SplitLayout):
    """ViT in transformers 5.x (also DeiT, Dinov2, ViTMAE):
    ``layers.N.attention.{q,k,v,o}_proj`` (``encoder.layer.N...`` for Dinov2)."""

    name = "vit"
    patterns = _split_patterns(_ANY + r"layers?\.(\d+)\.attention", "q_proj", "k_proj",
                               "v_proj", "o_proj")


@register_layout
class ViTLegacyLayout(SplitLayout):
    """ViT as stored by transformers 4.x (and VideoMAE, YOLOS, DPT in 5.x):
    ``encoder.layer.N.attention.attention.{query,key,value}`` and
    ``encoder.layer.N.attention.output.dense``."""

    name = "vit_legacy"
    patterns = _split_patterns(_ANY + r"layer\.(\d+)\.attention\.attention", "query", "key",
                               "value", "dense",
                               o_prefix=_ANY + r"layer\.(\d+)\.attention\.output")


# ---------------------------------------------------------------------------------------
# Fused projections.
# ---------------------------------------------------------------------------------------
@register_layout
class GPT2Layout(AttentionLayout):
    """GPT-2: Conv1D ``c_attn`` weight [d, 3·H·d_k] (heads along the columns of the stored
    weight, i.e. rows in the Linear convention) and Conv1D ``c_proj`` weight [H·d_v, d]
    (heads along the ROWS of the stored weight, i.e. columns in the Linear convention)."""

    name = "gpt2"
    patterns = {
        "Q": r"(?:.*\.)?h\.(\d+)\.attn\.c_attn",
        "K": r"(?:.*\.)?h\.(\d+)\.attn\.c_attn",
        "V": r"(?:.*\.)?h\.(\d+)\.attn\.c_attn",
        "O": r"(?:.*\.)?h\.(\d+)\.attn\.c_proj",
    }

    def extra_match(self, model):
        """GPT-2's c_attn is a Conv1D; a Linear c_attn is GPTBigCode's (another layout)."""
        return _first_module_is(model, self, "Q", _is_conv1d)

    def _slices(self, model, config, layer, block):
        path = self._path(model, layer, block)
        transposed = _is_conv1d(model.get_submodule(path))
        h, dk, dv = config.num_heads, config.head_dim, config.v_head_dim
        if block == "O":
            return (HeadSlices(path, "cols", tuple(k * dv for k in range(h)), dv, transposed),
                    h * dv)
        offset = {"Q": 0, "K": h * dk, "V": 2 * h * dk}[block]
        size = dv if block == "V" else dk
        return (HeadSlices(path, "rows", tuple(offset + k * size for k in range(h)), size,
                           transposed), 2 * h * dk + h * dv)


class FusedLayout(AttentionLayout):
    """One Linear holds Q, K and V; a separate Linear is O (heads along its columns).

    Subclasses give ``qkv_starts(config, block)``: the first row of each head's slice
    (H entries for Q, H_kv for K/V) and ``qkv_rows(config)``: the fused module's rows.
    """

    def qkv_starts(self, config: QKOVConfig, block: str) -> list[int]:
        raise NotImplementedError

    def qkv_rows(self, config: QKOVConfig) -> int:
        return (config.num_heads + config.num_kv_heads) * config.head_dim \
            + config.num_kv_heads * config.v_head_dim

    def _slices(self, model, config, layer, block):
        path = self._path(model, layer, block)
        if block == "O":
            dv = config.v_head_dim
            return (HeadSlices(path, "cols", tuple(k * dv for k in range(config.num_heads)), dv),
                    config.num_heads * dv)
        size = config.v_head_dim if block == "V" else config.head_dim
        return (HeadSlices(path, "rows", tuple(self.qkv_starts(config, block)), size),
                self.qkv_rows(config))


@register_layout
class Phi3Layout(FusedLayout):
    """Phi-3: ``self_attn.qkv_proj`` rows [Q (H·d_k) | K (H_kv·d_k) | V (H_kv·d_v)],
    output ``self_attn.o_proj``."""

    name = "phi3"
    patterns = _split_patterns(_ANY + r"layers\.(\d+)\.self_attn", "qkv_proj", "qkv_proj",
                               "qkv_proj", "o_proj")

    def qkv_starts(self, config, block):
        h, kv, dk, dv = config.num_heads, config.num_kv_heads, config.head_dim, config.v_head_dim
        if block == "Q":
            return [k * dk for k in range(h)]
        if block == "K":
            return [h * dk + k * dk for k in range(kv)]
        return [(h + kv) * dk + k * dv for k in range(kv)]


class InterleavedLayout(FusedLayout):
    """Fused rows interleaved per head: head k owns rows [k·3·d, (k+1)·3·d) as
    [q_k (d) | k_k (d) | v_k (d)] (GPT-NeoX/Pythia, Falcon-7B-style, BLOOM). MHA only."""

    def qkv_starts(self, config, block):
        if config.num_kv_heads != config.num_heads or config.head_dim != config.v_head_dim:
            raise ValueError(f"layout {self.name!r} interleaves [q, k, v] per head: it needs "
                             f"num_kv_heads == num_heads and v_head_dim == head_dim, got "
                             f"{config.num_kv_heads}/{config.num_heads} and "
                             f"{config.v_head_dim}/{config.head_dim}")
        d = config.head_dim
        pos = {"Q": 0, "K": 1, "V": 2}[block]
        return [(3 * k + pos) * d for k in range(config.num_heads)]


@register_layout
class GPTNeoXLayout(InterleavedLayout):
    """GPT-NeoX / Pythia: ``layers.N.attention.query_key_value`` rows [H, (q, k, v), d_k],
    output ``layers.N.attention.dense``."""

    name = "gpt_neox"
    patterns = _split_patterns(_ANY + r"layers\.(\d+)\.attention", "query_key_value",
                               "query_key_value", "query_key_value", "dense")


_FALCON = _split_patterns(_ANY + r"h\.(\d+)\.self_attention", "query_key_value",
                          "query_key_value", "query_key_value", "dense")


def _falcon_flags(model: nn.Module) -> tuple[bool, bool]:
    cfg = getattr(model, "config", None)
    return (bool(getattr(cfg, "new_decoder_architecture", False)),
            bool(getattr(cfg, "multi_query", False)))


class _FalconGeometry:
    def geometry(self, model):
        g = geometry_from_hf_config(model.config)
        new, mq = _falcon_flags(model)
        if new:
            kv = getattr(model.config, "num_kv_heads", None) or \
                getattr(model.config, "n_head_kv", None) or g["num_heads"]
        elif mq:
            kv = 1
        else:
            kv = g["num_heads"]
        return {**g, "num_kv_heads": int(kv)}


@register_layout
class FalconGroupedLayout(_FalconGeometry, FusedLayout):
    """Falcon with ``new_decoder_architecture`` (40B/180B style): per KV group g the fused
    rows are [q_{g·p} .. q_{g·p+p-1}, k_g, v_g] (p = H / H_kv), each d_k rows."""

    name = "falcon_grouped"
    patterns = dict(_FALCON)

    def extra_match(self, model):
        return _falcon_flags(model)[0]

    def qkv_starts(self, config, block):
        p, d = config.group_size, config.head_dim
        if block == "Q":
            return [((h // p) * (p + 2) + h % p) * d for h in range(config.num_heads)]
        pos = p if block == "K" else p + 1
        return [(g * (p + 2) + pos) * d for g in range(config.num_kv_heads)]


@register_layout
class FalconMQALayout(_FalconGeometry, FusedLayout):
    """Falcon with ``multi_query`` (7B style, no new_decoder_architecture): fused rows
    [q_0 .. q_{H-1}, k, v], one shared K/V head."""

    name = "falcon_mqa"
    patterns = dict(_FALCON)

    def extra_match(self, model):
        new, mq = _falcon_flags(model)
        return mq and not new

    def qkv_starts(self, config, block):
        d, h = config.head_dim, config.num_heads
        if block == "Q":
            return [k * d for k in range(h)]
        if config.num_kv_heads != 1:
            raise ValueError(f"layout 'falcon_mqa' has one K/V head, config says "
                             f"num_kv_heads={config.num_kv_heads}")
        return [h * d] if block == "K" else [(h + 1) * d]


@register_layout
class FalconInterleavedLayout(_FalconGeometry, InterleavedLayout):
    """Falcon with neither flag (and BLOOM, same module names): fused rows interleaved per
    head [H, (q, k, v), d] like GPT-NeoX."""

    name = "falcon_interleaved"
    patterns = dict(_FALCON)

    def extra_match(self, model):
        new, mq = _falcon_flags(model)
        return not new and not mq


@register_layout
class GPTBigCodeLayout(AttentionLayout):
    """GPTBigCode (StarCoder): Linear ``h.N.attn.c_attn`` and ``c_proj``. With
    ``multi_query`` the rows are [Q (H·d) | k (d) | v (d)]; without, they interleave per
    head [H, (q, k, v), d] (the module's ``view(..., H, 3·d).split``)."""

    name = "gpt_bigcode"
    patterns = dict(GPT2Layout.patterns)

    def extra_match(self, model):
        return _first_module_is(model, self, "Q", lambda m: isinstance(m, nn.Linear))

    def _slices(self, model, config, layer, block):
        path = self._path(model, layer, block)
        h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
        if block == "O":
            return HeadSlices(path, "cols", tuple(k * d for k in range(h)), d), h * d
        if kv == 1:
            starts = [k * d for k in range(h)] if block == "Q" else [(h + "KV".index(block)) * d]
            return HeadSlices(path, "rows", tuple(starts), d), (h + 2) * d
        if kv != h:
            raise ValueError(f"layout 'gpt_bigcode' has 1 or H key/value heads, config says "
                             f"num_kv_heads={kv} of num_heads={h}")
        pos = "QKV".index(block)
        return HeadSlices(path, "rows", tuple((3 * k + pos) * d for k in range(h)), d), 3 * h * d


@register_layout
class CodeGenLayout(FusedLayout):
    """CodeGen: ``h.N.attn.qkv_proj`` holds ``mp_num`` (4) partitions, each [q | v | k] of
    H/mp_num heads (note the v-before-k order); output ``h.N.attn.out_proj``. Detected by
    the attention module's ``mp_num`` attribute."""

    name = "codegen"
    patterns = _split_patterns(_ANY + r"h\.(\d+)\.attn", "qkv_proj", "qkv_proj", "qkv_proj",
                               "out_proj")

    def extra_match(self, model):
        found = self.modules_by_layer(model, "Q")
        return bool(found) and hasattr(
            model.get_submodule(found[min(found)].rsplit(".", 1)[0]), "mp_num")

    def qkv_starts(self, config, block):
        h, d, mp = config.num_heads, config.head_dim, int(config.extra.get("mp_num", 4))
        if config.num_kv_heads != h or h % mp:
            raise ValueError(f"layout 'codegen' needs num_kv_heads == num_heads divisible by "
                             f"mp_num={mp}, got {config.num_kv_heads}/{h}")
        local = (h // mp) * d
        pos = {"Q": 0, "V": 1, "K": 2}[block]
        return [(k // (h // mp)) * 3 * local + pos * local + (k % (h // mp)) * d
                for k in range(h)]
