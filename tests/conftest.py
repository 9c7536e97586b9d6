"""Shared fixtures: tiny random-init models (deterministic by seed) and padded batches."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers as T

T.logging.set_verbosity_error()
torch.set_num_threads(int(os.environ.get("QKOV_TEST_THREADS", "2")))

VOCAB = 97


def tiny_gpt2(seed=0, n_layer=2, n_head=4, n_embd=32):
    torch.manual_seed(seed)
    cfg = T.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=VOCAB,
                       n_positions=64, bos_token_id=0, eos_token_id=0,
                       attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1)
    cfg._attn_implementation = "eager"
    return T.GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed=0, n_layer=2, n_head=4, n_kv=2, hidden=32, head_dim=12, bias=False):
    """LLaMA with GQA and head_dim != hidden / heads (bias=True: Qwen2-like q/k/v biases)."""
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(num_hidden_layers=n_layer, num_attention_heads=n_head,
                        num_key_value_heads=n_kv, hidden_size=hidden, head_dim=head_dim,
                        intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
                        attention_bias=bias, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return T.LlamaForCausalLM(cfg).eval()


def padded_batch(n, T_len, seed, prefix, pad_from=None):
    """Right-padded batch: sample k keeps T_len - (k % 3) tokens; labels -100 at padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T_len), generator=g)
    mask = torch.ones(n, T_len, dtype=torch.long)
    for k in range(n):
        keep = T_len - (k % 3) * 2
        mask[k, keep:] = 0
        ids[k, keep:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "sample_ids": [f"{prefix}:{k}" for k in range(n)]}


@pytest.fixture
def gpt2_model():
    return tiny_gpt2()


@pytest.fixture
def llama_model():
    return tiny_llama()
