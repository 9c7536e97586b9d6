"""Generic detection: the attention layout read from module structure and the model config.

When no registered adapter (``registry.LAYOUTS``) matches a model, ``discover`` looks for
the attention modules itself:

1. every Linear or Conv1D module whose name is a known query/key/value name (``q_proj``,
   ``query``, ``wq``, ``q_lin``, ...) or a fused-qkv name (``qkv_proj``, ``Wqkv``,
   ``c_attn``, ``query_key_value``, ...) marks its parent as an attention module;
2. the layer id is the first integer of that parent's path; the attention modules must form
   ONE stack, one per layer (several stacks of one tower are one sequence of layers in
   module order: ``_one_tower``); an encoder-decoder maps one of its stacks (``choose_stack``:
   the decoder's self-attention by default, or the encoder or the cross-attention); a
   vision / audio tower of a model that reads token ids is left out (``text_stacks``); a
   second tower or hierarchical stages are refused, never mixed;
3. the output projection is the parent's child with an output name (``o_proj``,
   ``out_proj``, ``dense``, ``c_proj``, ``wo``, ...) or, BERT-style, ``output.dense`` next to
   the parent;
4. a fused qkv module is read as [Q (H·d_k) | K (H_kv·d_k) | V (H_kv·d_v)] rows, except
   ``query_key_value`` and ``in_proj`` which interleave per head [H, (q, k, v), d]
   (GPT-NeoX, DeBERTa v1);
5. heads, key/value heads and head_dim come from the config (``geometry_from_hf_config``);
   Conv1D weights are marked transposed.

The result is an adapter like the registered ones (``GenericLayout``); it is only trusted
after the functional proof (``interference.architectures.proof``) passes.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.nn as nn

from .registry import AttentionLayout, HeadSlices, _is_conv1d, weight2d

Q_NAMES = ("q_proj", "query", "q", "wq", "Wq", "q_lin", "query_proj", "q_linear", "to_q",
           "project_q", "q_head")
K_NAMES = ("k_proj", "key", "k", "wk", "Wk", "k_lin", "key_proj", "k_linear", "to_k",
           "project_k", "k_head")
V_NAMES = ("v_proj", "value", "v", "wv", "Wv", "v_lin", "value_proj", "v_linear", "to_v",
           "project_v", "v_head")
QKV_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "W_pack", "qkv_linear",
             "to_qkv", "in_proj")
O_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "Wo", "o", "out_lin", "proj", "out",
           "o_linear", "to_out", "output", "attention_out", "post_proj")
O_OUTER = ("output.dense", "output.proj", "out_proj", "o_proj", "post_attention.conv1d")
PER_HEAD_FUSED = ("query_key_value", "in_proj")   # GPT-NeoX style; DeBERTa v1
ORDERS = ("split", "concat", "per_head")
STACKS = ("decoder_self", "encoder", "decoder_cross")
CROSS_MARKS = ("encoder_attn", "cross", "encdecattention")


TOWER_MARKS = ("vision", "image", "img", "visual", "audio", "speech", "video")


def in_tower(path: str) -> bool:
    """True for a module path inside a vision / audio tower (GIT's ``image_encoder``,
    Phi-4-multimodal's ``img_processor``): not the text stack of a text model."""
    return any(m in part.lower() for part in path.split(".") for m in TOWER_MARKS)


def text_stacks(model: nn.Module, paths: list[str]) -> list[str]:
    """``paths`` without those in a vision / audio tower when the model reads token ids
    and some path is outside every tower; else ``paths`` unchanged."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return paths
    outside = [p for p in paths if not in_tower(p)]
    return outside or paths


def stack_role(stack: str) -> str | None:
    """'decoder_cross', 'decoder_self' or 'encoder' for an attention stack path such as
    ``model.decoder.layers.{N}.encoder_attn``; None when the path names neither side."""
    parts = stack.lower().split(".")
    if "decoder" in parts or any(p.endswith("decoder") for p in parts):
        return "decoder_cross" if any(m in stack.lower() for m in CROSS_MARKS) else "decoder_self"
    if "encoder" in parts or any(p.endswith("encoder") for p in parts):
        return "encoder"
    return None


def choose_stack(stacks: list[str], attention_stack: str | None = None) -> str:
    """The one stack to map among an encoder-decoder's ``stacks`` (their paths).

    ``attention_stack``: 'decoder_self' | 'encoder' | 'decoder_cross'; None picks the
    decoder's self-attention when there is one, else the encoder. Stacks that are not one
    encoder / decoder self / decoder cross each (two towers, hierarchical vision stages)
    raise LayoutNotFound: their heads would be mixed."""
    if attention_stack is not None and attention_stack not in STACKS:
        raise ValueError(f"attention_stack must be one of {STACKS}, got {attention_stack!r}")
    roles = {s: stack_role(s) for s in stacks}
    by_role = {r: [s for s in stacks if roles[s] == r] for r in STACKS}
    if len(stacks) == 1 and attention_stack is None:
        return stacks[0]
    want = attention_stack or ("decoder_self" if by_role["decoder_self"] else "encoder")
    if None in roles.values() or len(by_role[want]) > 1:
        raise LayoutNotFound(f"{len(stacks)} attention stacks {stacks} (not one encoder / "
                             "decoder self-attention / cross-attention each: a second tower "
                             "or hierarchical stages): their heads would be mixed")
    if not by_role[want]:
        raise LayoutNotFound(f"attention_stack {want!r} asked, but the stacks are {stacks}")
    return by_role[want][0]


class LayoutNotFound(KeyError):
    """Generic discovery found no single attention stack; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _linear_like(module: nn.Module) -> bool:
    """Linear, Conv1D, or an nn.Conv1d of kernel 1 (a Linear over channels-first input)."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Conv1d):
        return module.kernel_size == (1,) and module.padding in ((0,), "valid")
    return isinstance(w, torch.Tensor) and w.dim() == 2 and (
        isinstance(module, nn.Linear) or _is_conv1d(module))


def _first(kids: dict[str, str], names) -> str | None:
    return next((kids[n] for n in names if n in kids), None)


def _layer_regex(path: str, start: int, end: int) -> str:
    """``path`` with its characters [start, end) (the layer id) as the capture group."""
    return re.escape(path[:start]) + r"(\d+)" + re.escape(path[end:])


def _attention_modules(model: nn.Module) -> list[dict]:
    """One record per module that owns q/k/v (or fused qkv) Linear children."""
    linears = [p for p, m in model.named_modules() if "." in p and _linear_like(m)]
    kids: dict[str, dict[str, str]] = defaultdict(dict)
    for path in linears:
        parent, leaf = path.rsplit(".", 1)
        kids[parent][leaf] = path
    found = []
    for parent, children in kids.items():
        q, k, v = (_first(children, n) for n in (Q_NAMES, K_NAMES, V_NAMES))
        qkv = _first(children, QKV_NAMES)
        if not (q and k and v) and not qkv:
            continue
        m = re.search(r"(?:^|\.)(\d+)(?=\.|$)", parent)
        if m is None:
            continue
        o = _first({n: p for n, p in children.items() if p not in (q, k, v, qkv)}, O_NAMES)
        if o is None:
            outer = parent.rsplit(".", 1)[0] if "." in parent else ""
            o = next((p for p in linears if outer and p[len(outer) + 1:] in O_OUTER
                      and p.startswith(outer + ".") and not p.startswith(parent + ".")), None)
        order = "split" if (q and k and v) else (
            "per_head" if qkv.rsplit(".", 1)[1] in PER_HEAD_FUSED else "concat")
        found.append({"parent": parent, "layer": int(m.group(1)), "span": m.span(1),
                      "q": q if order == "split" else qkv, "k": k if order == "split" else qkv,
                      "v": v if order == "split" else qkv, "o": o, "order": order,
                      "stack": parent[:m.start(1)] + "{N}" + parent[m.end(1):]})
    return found


def _fused_fits(model: nn.Module, path: str) -> bool:
    """A fused module counts as qkv only when its rows are (H + 2·H_kv)·d_k under the
    config (a Mamba or convolution ``in_proj`` is not)."""
    from .config import geometry_from_hf_config

    try:
        g = geometry_from_hf_config(model.config)
    except (ValueError, AttributeError):
        return False
    m = model.get_submodule(path)
    rows = weight2d(m).shape[1] if _is_conv1d(m) else weight2d(m).shape[0]
    return g["head_dim"] is not None and \
        rows == (g["num_heads"] + 2 * g["num_kv_heads"]) * g["head_dim"]


def discover(model: nn.Module, attention_stack: str | None = None) -> "GenericLayout":
    """The generic adapter of ``model``; LayoutNotFound with the reason when there is no
    single stack of attention modules with q/k/v(/fused) and output projections. An
    encoder-decoder maps one stack (``choose_stack``: by default the decoder's
    self-attention)."""
    found = _attention_modules(model)
    found = [f for f in found if f["order"] == "split" or _fused_fits(model, f["q"])]
    if not found:
        raise LayoutNotFound("no module with query/key/value (or fused qkv) Linear children "
                             f"{Q_NAMES[:4]}... / {QKV_NAMES[:4]}... (no softmax attention with "
                             "per-head projections, or unknown module names)")
    names = text_stacks(model, sorted({f["stack"] for f in found}))
    if len(names) > 1 and _one_tower_stacks(names) and \
            attention_stack in (None, stack_role(names[0])):
        return _one_tower(model, [f for f in found if f["stack"] in names])
    stacks = [choose_stack(names, attention_stack)]
    found = [f for f in found if f["stack"] == stacks[0]]
    layers = [f["layer"] for f in found]
    if len(set(layers)) != len(layers):
        raise LayoutNotFound(f"more than one attention module per layer in {stacks[0]}")
    first = min(found, key=lambda f: f["layer"])
    _check_found(model, found, stacks[0])
    start = len(first["stack"].split("{N}")[0])
    end = start + len(str(first["layer"]))
    patterns = {}
    for block, key in zip("QKVO", "qkvo"):
        path = first[key]
        if not path.startswith(first["parent"][:end]):
            raise LayoutNotFound(f"{block} module {path} is outside layer {first['layer']}")
        patterns[block] = _layer_regex(path, start, end)
    return GenericLayout(f"generic_{first['order']}", patterns, first["order"])


def _check_found(model: nn.Module, found: list[dict], where: str) -> None:
    """LayoutNotFound unless every module has an output projection that is not a grouped
    convolution and all store q/k/v alike."""
    for f in found:
        if f["o"] is None:
            raise LayoutNotFound(f"no output projection ({O_NAMES[:5]}..., or output.dense "
                                 f"beside it) found for {f['parent']}")
        o_mod = model.get_submodule(f["o"])
        if isinstance(o_mod, nn.Conv1d) and o_mod.groups != 1:
            raise LayoutNotFound(f"output projection {f['o']} is a grouped convolution: "
                                 "its columns are not one input channel each")
    if len({f["order"] for f in found}) > 1:
        raise LayoutNotFound(f"mixed q/k/v storage across layers of {where}")


def _one_tower_stacks(stacks: list[str]) -> bool:
    """True for stacks of one tower: on the same side, all in or all out of a vision /
    audio tower, and either differing in their indices only (hierarchical stages) or on
    no encoder / decoder side at all (HRM's L and H modules). Two named towers on one
    side (a question and a context encoder) are not."""
    roles = {stack_role(s) for s in stacks}
    return len(roles) == 1 and len({in_tower(s) for s in stacks}) == 1 and (
        len({re.sub(r"\d+", "#", s) for s in stacks}) == 1 or roles == {None})


def _one_tower(model: nn.Module, found: list[dict]) -> "GenericLayout":
    """Several stacks of one tower (``_one_tower_stacks``: hierarchical stages
    ``encoder.layer.{N}.transformer.layer.{M}``, HRM's L and H modules) as ONE sequence of
    layers in module order: layer l is the l-th attention module. The geometry then
    decides: per-stage head counts are refused (one head count per model)."""
    rank = {p: i for i, (p, _) in enumerate(model.named_modules())}
    found = sorted(found, key=lambda f: rank[f["parent"]])
    _check_found(model, found, "the stacks " + ", ".join(sorted({f["stack"] for f in found})))
    layout = GenericLayout(f"generic_{found[0]['order']}", {}, found[0]["order"])
    layout.paths = {l: dict(zip("QKVO", (f["q"], f["k"], f["v"], f["o"])))
                    for l, f in enumerate(found)}
    layout.patterns = {b: "|".join(re.escape(p[b]) for p in layout.paths.values())
                       for b in "QKVO"}
    return layout


class GenericLayout(AttentionLayout):
    """An adapter built by ``discover``: ``order`` is 'split' (one module per block),
    'concat' (fused rows [Q | K | V], GQA sizes) or 'per_head' (fused rows [H, (q, k, v),
    d], MHA only). Conv1D modules (weight [in, out]) are marked transposed."""

    def __init__(self, name: str = "generic_split", patterns: dict | None = None,
                 order: str = "split"):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.name, self.patterns, self.order = name, dict(patterns or {}), order
        self.paths: dict[int, dict[str, str]] | None = None   # layer -> block -> path

    def modules_by_layer(self, model: nn.Module, block: str) -> dict[int, str]:
        """Layer id -> module path: by the patterns, or the explicit ``paths`` of one
        tower's stacks (``_one_tower``)."""
        if self.paths is None:
            return super().modules_by_layer(model, block)
        return {l: p[block] for l, p in self.paths.items()}

    def _slices(self, model, config, layer, block):
        path = self._path(model, layer, block)
        transposed = _is_conv1d(model.get_submodule(path))
        h, kv, dk, dv = config.num_heads, config.num_kv_heads, config.head_dim, config.v_head_dim
        if block == "O":
            return HeadSlices(path, "cols", tuple(k * dv for k in range(h)), dv, transposed), h * dv
        size = dv if block == "V" else dk
        n = config.block_heads(block)
        if self.order == "split":
            return HeadSlices(path, "rows", tuple(k * size for k in range(n)), size,
                              transposed), n * size
        rows = (h + kv) * dk + kv * dv
        if self.order == "concat":
            base = {"Q": 0, "K": h * dk, "V": (h + kv) * dk}[block]
            return HeadSlices(path, "rows", tuple(base + k * size for k in range(n)), size,
                              transposed), rows
        if kv != h or dk != dv:
            raise ValueError(f"layout {self.name!r} interleaves [q, k, v] per head: it needs "
                             f"num_kv_heads == num_heads and v_head_dim == head_dim, got "
                             f"{kv}/{h} and {dv}/{dk}")
        pos = "QKV".index(block)
        return HeadSlices(path, "rows", tuple((3 * k + pos) * dk for k in range(h)), dk,
                          transposed), rows
