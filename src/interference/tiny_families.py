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
