"""QKOVConfig: the attention geometry every downstream stage reads (SPEC section 2)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch.nn as nn

from .._tables import BLOCKS, SHARED_BLOCKS


def _first_attr(cfg, names, default=None):
    for name in names:
        try:
            value = getattr(cfg, name, None)
        except Exception:  # noqa: BLE001 - a per-layer attribute (Gemma 4): read per layer
            value = None
        if value is not None:
            return value
    return default


@dataclass
class QKOVConfig:
    """Attention geometry of a model.

    Fields follow the seed's manual constructor. ``head_dim`` is d_k (Q, K),
    ``v_head_dim`` is d_v (V, O); ``num_kv_heads`` is H_kv (None means H_kv = H).
    ``layout`` names the registered adapter (None: detect from the modules);
    ``include_bias`` adds Q/K/V biases to the head slices (never the O bias).
    ``extra['layer_head_dims']`` ({"layer": [d_k, d_v]}) holds the layers whose head
    dims differ from ``head_dim`` / ``v_head_dim`` (``at_layer``); heads and KV heads are
    the same in every layer.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    v_head_dim: int | None = None
    hidden_dim: int | None = None
    fused_qkv: bool = False
    fused_qkv_transposed: bool = False
    uses_gqa: bool = False
    num_kv_heads: int | None = None
    layout: str | None = None
    include_bias: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.num_kv_heads != self.num_heads:
            self.uses_gqa = True

    @property
    def group_size(self) -> int:
        """Query heads per key/value head, H / H_kv."""
        return self.num_heads // self.num_kv_heads

    def kv_head(self, head: int) -> int:
        """kv(h) = h // (H / H_kv): the key/value head that query head h reads."""
        if not 0 <= head < self.num_heads:
            raise IndexError(f"head {head} out of range [0, {self.num_heads})")
        return head // self.group_size

    def block_heads(self, block: str) -> int:
        """Number of distinct head slices of a block: H for Q/O, H_kv for K/V."""
        return self.num_kv_heads if block in SHARED_BLOCKS else self.num_heads

    def at_layer(self, layer: int) -> "QKOVConfig":
        """The geometry of one layer: ``head_dim`` and ``v_head_dim`` from
        ``extra['layer_head_dims']`` (layer -> [d_k, d_v], where a family's layers differ,
        e.g. Gemma 4's full-attention layers), else this config."""
        dims = self.extra.get("layer_head_dims", {}).get(str(layer))
        if dims is None:
            return self
        return replace(self, head_dim=int(dims[0]), v_head_dim=int(dims[1]))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_model(cls, model: nn.Module, include_bias: bool = False, layout: str | None = None,
                   attention_stack: str | None = None) -> "QKOVConfig":
        """Read the geometry from ``model.config`` and the attention modules themselves.

        ``num_key_value_heads`` and ``head_dim`` come from the model config when present;
        the layout is detected from parameter names and module types (not the class name).
        ``attention_stack`` ('decoder_self' | 'encoder' | 'decoder_cross') picks the stack
        of an encoder-decoder (default: the decoder's self-attention).
        """
        from .indexer import detect_layout

        adapter = detect_layout(model, layout, attention_stack=attention_stack)
        cfg = adapter.config_from_model(model, include_bias=include_bias)
        if attention_stack is not None:   # the indexer re-detects the same stack from it
            cfg.extra["attention_stack"] = attention_stack
        return cfg


def geometry_from_hf_config(cfg) -> dict:
    """Heads, KV heads, head dim and width from a Hugging Face config object.

    Reads the names the families use (``num_attention_heads`` / ``n_head`` / ``n_heads``,
    ``num_key_value_heads`` / ``num_kv_heads`` / ``n_head_kv`` / ``multi_query``, MPT's
    ``attn_config.kv_n_heads``, ``head_dim`` when set, else width / heads).
    """
    hidden = _first_attr(cfg, ["hidden_size", "n_embd", "d_model", "embed_dim", "dim"])
    heads = _first_attr(cfg, ["num_attention_heads", "n_head", "num_heads", "n_heads",
                              "num_self_attention_heads"])   # Perceiver's latent stack
    if not isinstance(heads, int):
        for sub in ("text_config", "vision_config"):   # a composite config: its one tower
            if getattr(cfg, sub, None) is not None:
                try:
                    return geometry_from_hf_config(getattr(cfg, sub))
                except ValueError:
                    continue
    if not isinstance(heads, int):
        raise ValueError(f"model config has no integer hidden size / number of attention "
                         f"heads (got {hidden!r} / {heads!r})")
    if not isinstance(hidden, int):   # widths by stage (MobileViT): read from the weights
        hidden = None
    kv = _first_attr(cfg, ["num_key_value_heads", "num_kv_heads", "n_head_kv", "kv_n_heads"])
    if kv is None:
        kv = _first_attr(getattr(cfg, "attn_config", None), ["kv_n_heads"])
    if kv is None and getattr(cfg, "multi_query", False):
        kv = 1
    head_dim = _first_attr(cfg, ["head_dim"], hidden // heads if hidden else None)
    return {"hidden_dim": hidden, "num_heads": int(heads),
            "num_kv_heads": int(kv) if kv is not None else int(heads),
            "head_dim": int(head_dim) if head_dim is not None else None}
