"""Attention layouts: one small adapter per way of storing Q, K, V and O (SPEC section 2).

An adapter says, for one layer and one block, which module holds the block and where
each head's rows (Q/K/V) or columns (O) sit, in the Linear convention (weight [out, in]).
Conv1D modules (GPT-2) store the transpose; the adapter marks them and the indexer
transposes. Adding a layout = writing one adapter and decorating it with
``@register_layout``.
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


class AttentionLayout:
    """Base adapter. Subclasses set ``name`` and ``patterns`` and implement ``slices``.

    ``patterns[block]``: a regex over module paths with one group capturing the layer id.
    """

    name: str = ""
    patterns: dict[str, str] = {}

    def with_patterns(self, name: str, patterns: dict[str, str]) -> "AttentionLayout":
        """A copy of this adapter under ``name`` with other module patterns."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.name, clone.patterns = name, dict(patterns)
        return clone

    # -- discovery -------------------------------------------------------------------
    def modules_by_layer(self, model: nn.Module, block: str) -> dict[int, str]:
        """Map layer id -> module path for ``block`` (empty when the pattern matches nothing)."""
        rx = re.compile(self.patterns[block])
        found = {}
        for path, module in model.named_modules():
            m = rx.fullmatch(path)
            if m and getattr(module, "weight", None) is not None:
                found[int(m.group(1))] = path
        return found

    def matches(self, model: nn.Module) -> bool:
        """True when every block's pattern finds the same non-empty set of layers."""
        layer_sets = [set(self.modules_by_layer(model, b)) for b in BLOCKS]
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
        return QKOVConfig(
            num_layers=len(layers), num_heads=g["num_heads"], head_dim=g["head_dim"],
            v_head_dim=g.get("v_head_dim", g["head_dim"]), hidden_dim=g["hidden_dim"],
            fused_qkv=fused, fused_qkv_transposed=fused and _is_conv1d(first),
            num_kv_heads=g["num_kv_heads"], layout=self.name, include_bias=include_bias)

    def slices(self, model: nn.Module, config: QKOVConfig, layer: int, block: str
               ) -> HeadSlices:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Split projections: one module per block.
# ---------------------------------------------------------------------------------------
class SplitLayout(AttentionLayout):
    """q/k/v rows per head (K/V with H_kv heads), o columns per query head."""

    def slices(self, model, config, layer, block):
        path = self.modules_by_layer(model, block).get(layer)
        if path is None:
            raise KeyError(block)
        if block == "O":
            n, size, axis = config.num_heads, config.v_head_dim, "cols"
        else:
            n = config.block_heads(block)
            size = config.v_head_dim if block == "V" else config.head_dim
            axis = "rows"
        return HeadSlices(path, axis, tuple(k * size for k in range(n)), size)


@register_layout
class LlamaLayout(SplitLayout):
    """LLaMA, Mistral, Qwen2 (q/k/v biases), Gemma: ``self_attn.{q,k,v,o}_proj``."""

    name = "llama"
    patterns = {
        "Q": r"(?:.*\.)?layers\.(\d+)\.self_attn\.q_proj",
        "K": r"(?:.*\.)?layers\.(\d+)\.self_attn\.k_proj",
        "V": r"(?:.*\.)?layers\.(\d+)\.self_attn\.v_proj",
        "O": r"(?:.*\.)?layers\.(\d+)\.self_attn\.o_proj",
    }


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

    def slices(self, model, config, layer, block):
        path = self.modules_by_layer(model, block)[layer]
        transposed = _is_conv1d(dict(model.named_modules())[path])
        h, dk, dv = config.num_heads, config.head_dim, config.v_head_dim
        if block == "O":
            return HeadSlices(path, "cols", tuple(k * dv for k in range(h)), dv, transposed)
        offset = {"Q": 0, "K": h * dk, "V": 2 * h * dk}[block]
        size = dv if block == "V" else dk
        return HeadSlices(path, "rows", tuple(offset + k * size for k in range(h)), size,
                          transposed)
