"""Tiny random-init models of the attention families beyond GPT-2 and LLaMA.

``tiny_model_extra(family, vocab_size, seed, **overrides)`` complements
``interference.models.tiny_model`` (gpt2, llama): same signature, one small config per
family, eager attention, eval mode. ``overrides`` go into the transformers config
(``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``hidden_size``,
``head_dim``, ...). Used by the tests of ``tests/test_architectures.py`` and by
``conf/model/tiny_<family>.yaml``.

Family keys and what they build (2 layers, width 32, 4 heads unless overridden):

============== ============================== ===========================================
key            class                          layout detail
============== ============================== ===========================================
mistral        MistralForCausalLM             MQA (1 KV head), split q/k/v/o
qwen2          Qwen2ForCausalLM               GQA, q/k/v biases
gemma3         Gemma3ForCausalLM              head_dim 16 != 32/4, q/k norms, GQA
phi3           Phi3ForCausalLM                fused qkv_proj [Q | K | V], GQA
phi            PhiForCausalLM                 split q/k/v with biases, output ``dense``
gpt_neox       GPTNeoXForCausalLM             fused query_key_value, per head [q, k, v]
falcon         FalconForCausalLM              new_decoder_architecture, 2 KV groups
falcon_mqa     FalconForCausalLM              multi_query (1 KV head)
falcon_mha     FalconForCausalLM              neither flag: NeoX-like, with biases
opt            OPTForCausalLM                 q/k/v/out_proj with biases
bert           BertForMaskedLM                attention.self.{query,key,value}
bert_encoder   BertModel                      same, no head (pair loss)
vit            ViTForImageClassification      5.x names: layers.i.attention.{q,k,v,o}_proj
videomae       VideoMAEForVideoClassification 4.x ViT names: attention.attention.query ...
============== ============================== ===========================================
"""
from __future__ import annotations

import torch
import torch.nn as nn

FAMILIES_EXTRA = ("mistral", "qwen2", "gemma3", "phi3", "phi", "gpt_neox", "falcon",
                  "falcon_mqa", "falcon_mha", "opt", "bert", "bert_encoder", "vit", "videomae")

_BASE = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32)
_DECODER = dict(_BASE, intermediate_size=48, max_position_embeddings=64)


def _spec(family: str, vocab_size: int):
    import transformers as T

    tok = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    table = {
        "mistral": (T.MistralConfig, T.MistralForCausalLM,
                    dict(_DECODER, num_key_value_heads=1, sliding_window=None, **tok)),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM,
                  dict(_DECODER, num_key_value_heads=2, use_sliding_window=False, **tok)),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
                   dict(_DECODER, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=8, **tok)),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM,
                 dict(_DECODER, num_key_value_heads=2, **tok)),
        "phi": (T.PhiConfig, T.PhiForCausalLM, dict(_DECODER, **tok)),
        "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(_DECODER, **tok)),
        "falcon": (T.FalconConfig, T.FalconForCausalLM,
                   dict(_BASE, new_decoder_architecture=True, num_kv_heads=2, bias=False,
                        **tok)),
        "falcon_mqa": (T.FalconConfig, T.FalconForCausalLM,
                       dict(_BASE, new_decoder_architecture=False, multi_query=True,
                            bias=False, parallel_attn=True, **tok)),
        "falcon_mha": (T.FalconConfig, T.FalconForCausalLM,
                       dict(_BASE, new_decoder_architecture=False, multi_query=False,
                            bias=True, parallel_attn=False, **tok)),
        "opt": (T.OPTConfig, T.OPTForCausalLM,
                dict(_BASE, ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=64,
                     vocab_size=vocab_size, pad_token_id=1, bos_token_id=2, eos_token_id=2)),
        "bert": (T.BertConfig, T.BertForMaskedLM,
                 dict(_DECODER, vocab_size=vocab_size, pad_token_id=0)),
        "bert_encoder": (T.BertConfig, T.BertModel,
                         dict(_DECODER, vocab_size=vocab_size, pad_token_id=0)),
        "vit": (T.ViTConfig, T.ViTForImageClassification,
                dict(_BASE, intermediate_size=48, image_size=8, patch_size=4, num_channels=1,
                     num_labels=5)),
        "videomae": (T.VideoMAEConfig, T.VideoMAEForVideoClassification,
                     dict(_BASE, intermediate_size=48, image_size=8, patch_size=4,
                          num_channels=1, num_frames=2, tubelet_size=1, num_labels=5,
                          use_mean_pooling=True)),
    }
    if family not in table:
        raise KeyError(f"unknown tiny family {family!r}; known: {sorted(table)}")
    return table[family]


def tiny_model_extra(family: str, vocab_size: int = 97, seed: int = 0, **overrides
                     ) -> nn.Module:
    """A tiny random-init ``family`` model (eager attention, eval mode, float32).

    BERT models get ``config.mask_token_id`` (vocab_size - 1 unless overridden) so the
    masked-LM objective finds its mask token without a tokenizer.
    """
    cfg_cls, model_cls, kwargs = _spec(family, vocab_size)
    kwargs = {**kwargs, **overrides}
    mask_id = kwargs.pop("mask_token_id", vocab_size - 1)
    cfg = cfg_cls(**kwargs)
    cfg._attn_implementation = "eager"
    if family.startswith("bert"):
        cfg.mask_token_id = mask_id
    torch.manual_seed(seed)
    model = model_cls(cfg)
    return model.eval()


# ---------------------------------------------------------------------------------------
# any family of transformers' auto mappings, shrunk generically (the coverage sweep)
# ---------------------------------------------------------------------------------------
_SHRINK = {   # config attribute -> tiny value (set only where the family's config has it)
    2: ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers",
        "encoder_layers", "num_decoder_layers", "num_encoder_layers"),
    32: ("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "embedding_size", "emb_dim",
         "word_embed_proj_dim"),
    4: ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
        "decoder_attention_heads", "num_experts", "num_local_experts", "n_routed_experts",
        "rotary_dim", "patch_size"),
    8: ("head_dim",),
    64: ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size",
         "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_ffn_dim",
         "encoder_ffn_dim", "max_position_embeddings", "n_positions", "max_seq_len",
         "expert_intermediate_size"),
    128: ("vocab_size", "vocab_size_per_layer_input"),   # Gemma 4 per-layer embeddings
    16: ("image_size",),
}
_HYBRID = {   # Mamba parts of hybrids sized to width 32 (expand 2 x 32 = 4 heads x 16);
    # the attention layer of a 2-layer hybrid is the second (GPT-Neo: global then local;
# RecurrentGemma: recurrent then attention)
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_headdim": 16, "mamba_dt_rank": 4,
    "mamba_d_ssm": 64, "n_mamba_heads": 4,
    "attn_layer_indices": [1], "hybrid_layer_ids": [1],
    "attention_types": [[["global", "local"], 1]], "block_types": ["recurrent", "attention"]}
_FAMILY = {   # families whose defaults do not shrink by the rules above
    "dory": dict(n_input_layers=0, n_output_layers=1,    # layer 0 looped, layer 1 output
                 layer_types=["sliding_attention", "full_attention"]),
    "musicgen": dict(num_codebooks=1),          # input_ids [n·codebooks, T]: one codebook
    "musicgen_melody": dict(num_codebooks=1),
    "xlstm": dict(hidden_size=128),   # q/k and v widths are rounded up to 64: 4 heads
    "perceiver": dict(d_latents=64, num_latents=8, num_self_attends_per_block=2,
                      num_self_attention_heads=4, num_cross_attention_heads=4),
}
_LAYER_LISTS = ("layer_types", "layers_block_type", "attention_layers")
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
               "cls_token_id", "mask_token_id", "decoder_start_token_id")
AUTO_KINDS = ("masked_lm", "causal_lm", "image_classification")


def auto_families() -> dict[str, tuple[str, str]]:
    """model_type -> (kind, model class name) over transformers' masked-LM, causal-LM and
    image-classification auto mappings (masked LM first, so BERT is read as an encoder)."""
    from transformers.models.auto import modeling_auto as ma

    maps = {"masked_lm": ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
            "causal_lm": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            "image_classification": ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES}
    out: dict[str, tuple[str, str]] = {}
    for kind in AUTO_KINDS:
        for family, cls in maps[kind].items():
            out.setdefault(family, (kind, cls if isinstance(cls, str) else cls[0]))
    return dict(sorted(out.items()))


def shrunk_kwargs(config_cls, vocab_size: int = 128) -> dict:
    """Constructor kwargs that shrink ``config_cls``'s defaults to 2 layers, width 32,
    4 heads (2 KV heads when the family groups them, 1 when it is multi-query, 4 when its
    defaults have as many KV heads as heads or none), head_dim 8,
    FFN 64, 64 positions, 4 experts, 16x16 images; nested sub-configs shrunk the same way."""
    base = config_cls().to_dict()
    kw = {k: v for v, keys in _SHRINK.items() for k in keys
          if k in base and isinstance(base[k], int) and not isinstance(base[k], bool)}
    if "vocab_size" in base:
        kw["vocab_size"] = vocab_size
    if "head_dim" in base and base["head_dim"] is None and "hidden_size" in kw:
        kw["head_dim"] = 8   # left None by the defaults, read as-is by the module code
    heads = next((base[k] for k in _SHRINK[4][:4] if isinstance(base.get(k), int)), None)
    for k in _KV_KEYS:
        if k in base and not isinstance(base[k], bool):   # None: the module code needs a value
            kw[k] = 1 if base[k] == 1 else 4 if base[k] in (None, heads) else 2
    if isinstance(base.get("num_experts_per_tok"), int):
        kw["num_experts_per_tok"] = 2
    for k in _TOKEN_KEYS:
        if isinstance(base.get(k), int) and base[k] >= vocab_size:
            kw[k] = vocab_size - 1 - _TOKEN_KEYS.index(k)
    n_layers = next((base[k] for k in _SHRINK[2] if k in kw), None)
    for key in _LAYER_LISTS:   # per-layer kinds: keep one layer of each kind (hybrids)
        types = base.get(key)
        if isinstance(types, list) and types and len(types) == n_layers:
            other = next((t for t in types if t != types[0]), types[0])
            kw[key] = [types[0], other]
    kw.update({k: v for k, v in _HYBRID.items() if k in base})
    for key in ("attn_layer_period", "expert_layer_period"):   # Jamba-style periods
        if isinstance(base.get(key), int):
            kw[key], kw[key.replace("period", "offset")] = 2, 1
    for name, sub in (getattr(config_cls, "sub_configs", None) or {}).items():
        if isinstance(sub, type) and name in base:
            kw[name] = shrunk_kwargs(sub, vocab_size)
    return kw


def _token_image_classifier(kind: str, cls_name: str) -> tuple[str, str]:
    """(kind, class name); an image classifier that reads token ids (ImageGPT: pixels as
    colour-cluster ids) is replaced by its family's causal class, same attention modules,
    read as a causal LM (no per-sample objective takes token ids with image labels)."""
    import importlib

    import transformers as T

    cls = getattr(T, cls_name)
    if kind != "image_classification" or getattr(cls, "main_input_name", "") != "input_ids":
        return kind, cls_name
    module = importlib.import_module(cls.__module__)
    causal = [n for n in getattr(module, "__all__", dir(module)) if "ForCausal" in n]
    return ("causal_lm", causal[0]) if causal else (kind, cls_name)


def tiny_auto_model(family: str, seed: int = 0) -> tuple[nn.Module, str]:
    """(a tiny random-init float32 eval-mode model of ``family``, its kind) from its config
    class defaults shrunk by ``shrunk_kwargs``; eager attention; nothing is downloaded.
    The config class is the model class's own when it differs from the family's (a
    composite family whose causal-LM class takes the text config, e.g. Llama 4).
    Masked-LM models get ``config.mask_token_id`` (vocab - 1) when they have none; X-MOD
    models get their first language as the default adapter; an image classifier that
    reads token ids is built as its family's causal model (``_token_image_classifier``).
    ``_FAMILY`` holds the few families whose defaults the generic rules cannot shrink."""
    import transformers as T
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kind, cls_name = auto_families()[family]
    kind, cls_name = _token_image_classifier(kind, cls_name)
    config_cls = CONFIG_MAPPING[family]
    own = getattr(getattr(T, cls_name), "config_class", None)
    if isinstance(own, type) and own is not config_cls:   # Llama4ForCausalLM: the text config
        config_cls = own
    cfg = config_cls(**{**shrunk_kwargs(config_cls), **_FAMILY.get(family, {})})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    if kind == "masked_lm" and getattr(cfg, "mask_token_id", None) is None:
        cfg.mask_token_id = int(getattr(cfg, "vocab_size", 128)) - 1
    if kind == "masked_lm" and "pad_token_id" in cfg.to_dict() and cfg.pad_token_id is None:
        cfg.pad_token_id = 0   # ESM: position ids are counted from the non-pad tokens
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(T, cls_name)(cfg)
    if hasattr(model, "set_default_language"):   # X-MOD: one language adapter per forward
        model.set_default_language(next(iter(cfg.languages)))
    return model.float().eval(), kind
