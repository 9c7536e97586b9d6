"""Tests of interference.models: tokenizers, tiny models, offline pretrained loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from interference.models import (TINY_FAMILIES, build_tokenizer, convert_to_safetensors, load_minilm,
                                 load_pretrained, load_smollm2, load_smollm2_gguf, load_tokenizer, save_tokenizer,
                                 tiny_model, train_bpe)

TEXTS = ["def add(a, b):\n    return a + b\n", "Question: What is 2 + 2?\nAnswer: 4",
         "The quick brown fox jumps over the lazy dog."] * 20


def test_bpe_deterministic_and_roundtrip(tmp_path):
    a, b = train_bpe(TEXTS, vocab_size=300), train_bpe(TEXTS, vocab_size=300)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) <= 300 and a.pad_token == "<pad>" and a.eos_token == "<|endoftext|>"
    assert a.pad_token_id != a.eos_token_id and a.padding_side == "right"
    text = "def sub(a, b):\n    return a - b  # é"
    enc = a(text)["input_ids"]
    assert a.decode(enc) == text  # byte-level: lossless
    c = load_tokenizer(save_tokenizer(a, tmp_path / "tok"))
    assert c(text)["input_ids"] == enc and c.pad_token_id == a.pad_token_id
    assert build_tokenizer("folder", path=tmp_path / "tok")(text)["input_ids"] == enc
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(tmp_path / "missing")


def test_default_bpe_vocab():
    tok = build_tokenizer("bpe", vocab_size=512)
    assert len(tok) == 512


def test_the_default_bpe_is_read_from_the_package_not_trained(monkeypatch):
    """kind bpe at 512 tokens reads the shipped file: no corpus is made (sympy's 400 math
    problems), and it is the tokenizer the file holds, with train_bpe's specials."""
    import interference.models as models
    from tokenizers import Tokenizer

    def no_corpus():
        raise AssertionError("the default corpus was made")

    monkeypatch.setattr(models, "_default_corpus", no_corpus)
    tok = build_tokenizer("bpe", vocab_size=512)
    assert tok.backend_tokenizer.to_str() == Tokenizer.from_file(str(models.DEFAULT_BPE)).to_str()
    assert (tok.eos_token, tok.bos_token, tok.pad_token, tok.padding_side) == \
        ("<|endoftext|>", "<|endoftext|>", "<pad>", "right")
    assert (tok.convert_tokens_to_ids("<|endoftext|>"), tok.pad_token_id) == (0, 1)
    text = "def sub(a, b):\n    return a - b  # 12 * 7 = 84, é"
    assert tok.decode(tok(text)["input_ids"]) == text
    with pytest.raises(AssertionError, match="default corpus"):   # other sizes still train
        build_tokenizer("bpe", vocab_size=300)


def test_the_shipped_bpe_is_the_default_corpus_trained(tmp_path):
    """The shipped tokenizer is what train_bpe gives on today's default corpus, wherever
    that corpus is the one the file was made from (its digest in bpe512.meta.json; the
    pydoc prose differs between Python versions, the math problems between sympy's). And
    write_default_bpe writes what it reads back."""
    import json

    import interference.models as models

    meta = json.loads(models.DEFAULT_BPE_META.read_text())
    shipped = models.tokenizer_digest(models.default_bpe())
    assert shipped == meta["tokenizer_digest"]
    texts = models._default_corpus()
    if models.corpus_digest(texts) != meta["corpus_sha256"]:
        pytest.skip(f"the default corpus differs from the one the shipped tokenizer was made "
                    f"from ({meta['made_with']})")
    assert models.tokenizer_digest(train_bpe(texts, 512)) == shipped
    written = models.write_default_bpe(tmp_path / "bpe512.json")
    assert {k: v for k, v in written.items() if k != "made_with"} == \
        {k: v for k, v in meta.items() if k != "made_with"}
    assert (tmp_path / "bpe512.json").read_bytes() == models.DEFAULT_BPE.read_bytes()
    with pytest.raises(ValueError, match="make_default_bpe"):
        models.default_bpe(tmp_path / "missing.json")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_models_deterministic(family):
    before = torch.random.get_rng_state()
    m1, m2, m3 = (tiny_model(family, vocab_size=300, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)
    assert not m1.training and m1.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in m1.parameters())
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        out1 = m1(input_ids=x, attention_mask=torch.ones_like(x))
        out2 = m2(input_ids=x, attention_mask=torch.ones_like(x))
    # weights are bitwise equal (above); outputs only to float tolerance, because CPU
    # kernels may round differently with differently aligned buffers
    torch.testing.assert_close(out1.logits, out2.logits, rtol=1e-6, atol=1e-6)


def test_tiny_llama_gqa_shapes():
    m = tiny_model("llama", vocab_size=300, seed=0)
    cfg = m.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size) == (4, 2, 24, 64)
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 24, 64) and attn.k_proj.weight.shape == (2 * 24, 64)
    assert attn.v_proj.weight.shape == (2 * 24, 64) and attn.o_proj.weight.shape == (64, 4 * 24)
    big = tiny_model("llama", vocab_size=300, seed=0, num_hidden_layers=3, head_dim=8)
    assert len(big.model.layers) == 3 and big.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    g = tiny_model("gpt2", vocab_size=300, seed=0)
    assert g.transformer.h[0].attn.c_attn.weight.shape == (64, 192)
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny_model("nope")


def test_load_pretrained_local_safetensors(tmp_path):
    m = tiny_model("llama", vocab_size=300, seed=0)
    m.save_pretrained(tmp_path / "m")
    tok = train_bpe(TEXTS, vocab_size=300)
    tok.save_pretrained(tmp_path / "m")
    m2, tok2 = load_pretrained(tmp_path / "m")
    x = torch.randint(0, 300, (1, 7))
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=x).logits, m2(input_ids=x).logits, rtol=1e-6, atol=1e-6)
    assert tok2 is not None and not m2.training
    (tmp_path / "bare").mkdir()
    m.save_pretrained(tmp_path / "bare")
    assert load_pretrained(tmp_path / "bare")[1] is None
    with pytest.raises(ValueError, match="local folders only"):
        load_pretrained("HuggingFaceTB/SmolLM2-135M")


def test_minilm():
    model, tok = load_minilm()
    cfg = model.config
    assert type(model).__name__ == "BertModel"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (6, 12, 384)
    enc = tok(["def f(x): return x", "a cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    assert h.shape[:2] == enc["input_ids"].shape and h.shape[2] == 384


@pytest.mark.slow
def test_smollm2_gguf_convert_reload(tmp_path):
    """GGUF load (one parse of the file, from memory: gguf_read_once), conversion to
    safetensors, fast reload: identical logits; weights equal gguf's own dequantisation of
    the file read through its memory map, and every metadata field read from memory equals
    the memory-mapped read's."""
    import gguf
    import gguf.gguf_reader
    import numpy as np

    from interference.models import gguf_read_once, smollm2_gguf_path

    parses, reader = [], gguf.GGUFReader

    class Counted(reader):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            parses.append(type(self.data))
    gguf.GGUFReader = Counted
    try:
        raw, tok = load_smollm2_gguf()
    finally:
        gguf.GGUFReader = reader
    assert parses == [np.ndarray]         # once (not per config, tokenizer, weights), in memory
    assert gguf.get_tensor_name_map.__module__.startswith("gguf")   # restored
    assert gguf.gguf_reader.np is np
    folder, name = smollm2_gguf_path()
    mapped = reader(str(Path(folder) / name))
    assert isinstance(mapped.data, np.memmap)
    with gguf_read_once():
        in_memory = gguf.GGUFReader(str(Path(folder) / name))
    assert list(in_memory.fields) == list(mapped.fields)
    for key, field in mapped.fields.items():
        other = in_memory.fields[key]
        assert other.types == field.types and other.data == field.data, key
        assert all(np.array_equal(a, b) for a, b in zip(other.parts, field.parts)), key
    tensors = {t.name: t for t in mapped.tensors}
    sd = raw.state_dict()
    for g, h in [("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                 ("blk.29.attn_output.weight", "model.layers.29.self_attn.o_proj.weight"),
                 ("token_embd.weight", "model.embed_tokens.weight")]:   # q, k: permuted
        t = tensors[g]
        want = torch.from_numpy(np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type)))
        assert torch.equal(want.float(), sd[h]), g
    cfg = raw.config
    assert type(raw).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.hidden_size, cfg.vocab_size) == (30, 9, 3, 64, 576, 49152)
    out = convert_to_safetensors(raw, tok, tmp_path / "smollm2")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    with pytest.raises(FileExistsError):
        convert_to_safetensors(raw, tok, out)
    model, tok2 = load_smollm2(cache_dir=out)  # the fast path: from_pretrained(out_dir)
    assert getattr(model.config, "quantization_config", None) is None and not model.training
    text = "def add(a, b):\n    return a + b\n"
    enc, enc2 = tok(text, return_tensors="pt"), tok2(text, return_tensors="pt")
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    raw_sd, new_sd = raw.state_dict(), model.state_dict()
    assert raw_sd.keys() == new_sd.keys()
    assert all(torch.equal(raw_sd[k], new_sd[k]) for k in raw_sd)  # bitwise-identical weights
    with torch.no_grad():
        a = raw(**enc, labels=enc["input_ids"])
        b = model(**enc)
    # identical in practice (max |diff| 0 here); a tolerance only guards against kernels
    # that round differently with differently aligned buffers
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    assert a.loss.item() < 3.0  # real weights (random init: about ln 49152 = 10.8)


# ------------------------------------- a data job's tokenizer: tokenizer and config, no weights

def _model_conf(name: str, tmp_path: Path) -> dict:
    """conf/model/<name>.yaml as the workflow resolves it; ``local``: a saved tiny LLaMA with
    its own BPE tokenizer (no pad token: the eos stands in) and no tokenizer kind."""
    import yaml

    if name != "local":
        return yaml.safe_load((Path(__file__).parents[1] / "conf" / "model" / f"{name}.yaml").read_text())
    folder = tmp_path / "ckpt"
    tiny_model("llama", vocab_size=300, seed=0).save_pretrained(folder)
    tok = train_bpe(TEXTS, vocab_size=300)
    tok.pad_token = None
    tok.save_pretrained(folder)
    mcfg = _model_conf("tiny", tmp_path)
    return dict(mcfg, name="local", source="local", path=str(folder), tokenizer={"kind": None})


@pytest.mark.parametrize("name", ["tiny", "tiny_phi3", "tiny_vit", "minilm", "llama2_7b", "local"])
def test_the_data_jobs_build_the_models_tokenizer_and_positions(name, tmp_path):
    """A data job's tokenizer (stages.tokenizer.build_tokenizer: text_tokenizer and
    model_config, no weights) is the one prepare_model's build_from_config + describe give:
    the same digest (which the jobs compare where data meet the model), size and
    max_positions; None without a tokenizer."""
    from interference.models import build_from_config, describe, tokenizer_digest, with_pad_token
    from qkov_pipeline.stages.tokenizer import build_tokenizer

    mcfg = _model_conf(name, tmp_path)
    model, tok = build_from_config(mcfg)
    tok = with_pad_token(tok)
    alone, info = build_tokenizer(mcfg)
    want = describe(model, tok, prove=False)
    assert tokenizer_digest(alone) == tokenizer_digest(tok) == info["tokenizer_digest"]
    for k in ("max_positions", "has_tokenizer", "tokenizer_size"):
        assert info[k] == want[k], k
    assert (alone is None) == (name == "tiny_vit")
    if alone is not None:
        text = "def f(x):\n    return x + 1  # 2 + 2 = 4"
        assert alone(text)["input_ids"] == tok(text)["input_ids"]
        assert alone.pad_token_id is not None and alone.pad_token_id == tok.pad_token_id
    if name == "local":   # the eos stands in for the missing pad token, on both sides
        assert alone.pad_token == alone.eos_token


def test_a_tokenizer_digest_tells_tokenizers_apart():
    from interference.models import tokenizer_digest

    a, b = train_bpe(TEXTS, vocab_size=300), train_bpe(TEXTS, vocab_size=300)
    assert tokenizer_digest(a) == tokenizer_digest(b) and tokenizer_digest(None) is None
    assert tokenizer_digest(train_bpe(TEXTS, vocab_size=290)) != tokenizer_digest(a)
    b.pad_token = b.eos_token          # same vocabulary, another pad id
    assert tokenizer_digest(b) != tokenizer_digest(a)


def test_data_tokenised_by_another_tokenizer_are_refused(tmp_path):
    import json

    from qkov_pipeline.stages.tokenizer import check_same_tokenizer

    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps({"tokenizer_digest": "aaaa"}))
    check_same_tokenizer(model_json, {"tokenizer_digest": "aaaa"}, tmp_path / "data")
    for other in ({"tokenizer_digest": "bbbb"}, {}):
        with pytest.raises(ValueError, match="tokenised by tokenizer .* records tokenizer aaaa"):
            check_same_tokenizer(model_json, other, tmp_path / "data")


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path):
    """A random or tiny model's tokenizer must fit its embeddings, whether built with the
    model (build_from_config) or alone (a data job's)."""
    from interference.models import build_from_config, text_tokenizer

    mcfg = dict(_model_conf("tiny", tmp_path), vocab_size=300)      # the BPE has 512 tokens
    for build in (build_from_config, text_tokenizer):
        with pytest.raises(ValueError, match="512 tokens but model.vocab_size is 300"):
            build(mcfg)
    text_tokenizer(dict(mcfg, vocab_size=512))


@pytest.mark.parametrize("name", ["llama2_7b", "llama3_8b", "tiny_random"])
def test_random_model_facts_without_the_config_equal_the_configs(monkeypatch, name):
    """models.model_facts of a random model whose overrides name its positions (the data
    jobs' facts, B2's critical path) equals the facts of its built transformers config,
    without building it; without positions in the overrides, the config is built."""
    import yaml

    from interference import models

    root = Path(__file__).resolve().parents[1]
    mcfg = yaml.safe_load((root / "conf" / "model" / f"{name}.yaml").read_text())
    config = models.model_config(mcfg)
    want = {"class": (getattr(config, "architectures", None) or [type(config).__name__])[0],
            "max_positions": models.max_positions(config)}
    overrides = dict(mcfg.get("overrides") or {})
    named = bool(overrides.get("max_position_embeddings") or overrides.get("n_positions"))
    built = []
    real = models.model_config
    monkeypatch.setattr(models, "model_config", lambda m: built.append(m) or real(m))
    assert models.model_facts(mcfg) == want
    assert bool(built) != named
    bare = dict(mcfg, overrides={k: v for k, v in overrides.items()
                                 if k not in ("max_position_embeddings", "n_positions")})
    built.clear()
    facts = models.model_facts(bare)
    assert built and facts["max_positions"] == models.max_positions(real(bare))


def test_smollm2_tokenizer_and_facts_without_the_config_equal_autotokenizers(monkeypatch):
    """The data jobs' SmolLM2 tokenizer (the fast-tokenizer class reading the GGUF) and facts
    (the GGUF's metadata) equal what AutoTokenizer and the GGUF's transformers config give:
    the same class, digest and ids on text with special tokens, the same positions and
    class name; and no model config is built on the way."""
    import transformers

    from interference import models

    folder, name = models.smollm2_gguf_path()
    auto = models.with_pad_token(
        transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True))
    config = models.model_config({"source": "smollm2"})
    want = {"class": (getattr(config, "architectures", None) or [type(config).__name__])[0],
            "max_positions": models.max_positions(config)}
    built = []
    real = models.model_config
    monkeypatch.setattr(models, "model_config", lambda m: built.append(m) or real(m))
    tok, facts = models.tokenizer_and_facts({"source": "smollm2", "name": "smollm2",
                                             "tokenizer": {"kind": "smollm2"}})
    assert not built and facts == want and facts["max_positions"] == 8192
    assert type(tok) is type(auto)
    assert models.tokenizer_digest(tok) == models.tokenizer_digest(auto)
    texts = ["def f(x):\n    return 2 * x + 1<|im_end|>", "Solve 12 + 30 = ?  Answer: 42",
             "<|im_start|>user\nhi<|im_end|>\n", "  ünïcode\ttabs\n\nand  spaces "]
    assert tok(texts)["input_ids"] == auto(texts)["input_ids"]
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.padding_side) == (
        auto.pad_token, auto.eos_token, auto.bos_token, auto.padding_side)
