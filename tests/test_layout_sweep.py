"""A fixed subset of the coverage sweep (scripts/sweep_architectures.py) and the proof on
first contact (issue 18).

Each family below is built by ``tiny_auto_model`` from its transformers config class,
shrunk to 2 layers and width 32 (nothing downloaded); its layout is detected, proven by
``prove_layout`` on a float64 copy, and its default heatmap is compared with a float64
brute force (per-sample autograd, explicit loops) whose slices come from the proven
indexer (tests/reference_layouts.heatmap_vs_brute). The 13 registered layouts keep their
hand-written references in tests/test_architectures.py; here they go through the proof.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from interference.architectures import LAYOUTS, QKOVConfig
from interference.architectures.proof import (LayoutProofError, float64_copy,
                                              prove_first_contact, prove_layout, shrunk_copy)
from interference.tiny_families import tiny_auto_model

from reference_layouts import heatmap_vs_brute

# family -> the layout it must be read as (issue 18's list)
FAMILIES = {
    "gptj": "generic_split", "gpt_bigcode": "gpt_bigcode", "codegen": "codegen",
    "bloom": "falcon_interleaved", "mpt": "generic_concat", "stablelm": "llama",
    "olmo": "llama", "olmo2": "llama", "cohere": "llama", "granite": "llama",
    "gemma2": "llama", "qwen3": "llama", "mixtral": "llama", "qwen2_moe": "llama",
    "bart": "generic_split",   # an encoder-decoder: its decoder's self-attention
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_detected_proven_and_matches_brute_force(family):
    model, kind = tiny_auto_model(family)
    cfg = QKOVConfig.from_model(model)
    assert cfg.layout == FAMILIES[family]
    heads = [0, cfg.num_heads - 1]     # both ends (both K/V groups); the sweep checks all
    proof = prove_layout(float64_copy(model), heads=heads)
    assert proof["layout"] == cfg.layout and proof["observables"] == "probs+context"
    assert heatmap_vs_brute(model, kind, n_fisher=2, n_scored=2) <= 1e-5


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "qwen2", "gemma3", "phi3", "phi",
                                  "gpt_neox", "falcon", "falcon_mqa", "falcon_mha", "bloom",
                                  "opt", "bert", "vit", "vit_legacy", "videomae"])
def test_registered_layouts_pass_the_proof(name):
    """The 13 registered layouts (hand-checked in test_architectures.py) pass the proof
    that runs on first contact."""
    from test_architectures import VARIANTS, _model

    proof = prove_layout(float64_copy(_model(name)), heads=[0, 3])
    assert proof["layout"] == VARIANTS[name][2]


def _bigcode(multi_query):
    cfg = T.GPTBigCodeConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=32,
                             multi_query=multi_query)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return T.GPTBigCodeForCausalLM(cfg).double().eval()


def test_bigcode_with_and_without_multi_query_and_gptj_work():
    """The two failures of the issue: GPTBigCode (MQA: [Q | k | v]; MHA: per-head
    [q, k, v]) is no longer read as GPT-2, and GPT-J is found by the generic path."""
    for mq, kv in ((True, 1), (False, 4)):
        m = _bigcode(mq)
        cfg = QKOVConfig.from_model(m)
        assert (cfg.layout, cfg.num_kv_heads) == ("gpt_bigcode", kv)
        prove_layout(m, cfg)
    gptj = T.GPTJForCausalLM(T.GPTJConfig(n_layer=1, n_head=2, n_embd=16, rotary_dim=4,
                                          vocab_size=50, n_positions=32))
    assert QKOVConfig.from_model(gptj).layout == "generic_split"


def test_misregistered_layout_is_caught_on_first_contact(monkeypatch):
    """GPTBigCode without multi_query has the shapes GPT-2's layout expects ([3·H·d, d]) but
    interleaves q, k, v per head: read as GPT-2 (the old detection), the proof on first
    contact (models.describe) refuses it, naming what it expected and what it saw."""
    from interference import models

    m = _bigcode(False).float()
    monkeypatch.setattr(type(LAYOUTS["gpt2"]), "extra_match", lambda self, model: True)
    monkeypatch.setattr(type(LAYOUTS["gpt_bigcode"]), "extra_match", lambda self, model: False)
    assert QKOVConfig.from_model(m).layout == "gpt2"      # the shapes fit: no shape error
    with pytest.raises(LayoutProofError) as err:
        models.describe(m, None)
    msg = str(err.value)
    assert "'gpt2'" in msg and "gpt_bigcode" in msg and "expected" in msg and "saw" in msg
    assert "register_layout" in msg
    monkeypatch.undo()
    assert models.describe(m, None)["layout_proof"]["layout"] == "gpt_bigcode"


def test_swapped_k_and_v_rows_of_a_fused_layout_are_caught():
    """A fused concat read in the wrong order ([Q | V | K]) fails the proof at K."""
    from interference.architectures.generic import GenericLayout, discover

    class Swapped(GenericLayout):
        def _slices(self, model, config, layer, block):
            return super()._slices(model, config, layer, {"K": "V", "V": "K"}.get(block, block))

    m64 = float64_copy(tiny_auto_model("mpt")[0])
    cfg = QKOVConfig.from_model(m64)
    LAYOUTS["swapped_mpt"] = Swapped("swapped_mpt", discover(m64).patterns, "concat")
    try:
        with pytest.raises(LayoutProofError, match=r"L1 K head 0: expected"):
            prove_layout(m64, QKOVConfig(**{**cfg.to_dict(), "layout": "swapped_mpt"}))
    finally:
        del LAYOUTS["swapped_mpt"]


@pytest.mark.parametrize("stack, path", [
    (None, "model.decoder.layers.1.self_attn.q_proj"),
    ("encoder", "model.encoder.layers.1.self_attn.q_proj"),
    ("decoder_cross", "model.decoder.layers.1.encoder_attn.q_proj")])
def test_an_encoder_decoder_maps_the_chosen_stack_and_proves_it(stack, path):
    """BART: one stack of three is mapped (default: the decoder's self-attention) and the
    proof runs on that stack's modules; the choice survives into the indexer."""
    from interference.architectures import QKOVIndexer

    model, _ = tiny_auto_model("bart")
    m64 = float64_copy(model)
    cfg = QKOVConfig.from_model(m64, attention_stack=stack)
    assert list(QKOVIndexer(m64, cfg).head_param_indices(1, "Q", 0)) == [path + ".weight"]
    assert prove_layout(m64, cfg, heads=[0, 3])["observables"] == "probs+context"
    assert prove_first_contact(model, attention_stack=stack)["observables"] == "probs+context"


def test_stack_choice_is_refused_when_it_does_not_exist_or_is_not_a_role():
    from interference.architectures.generic import LayoutNotFound, choose_stack

    with pytest.raises(ValueError, match="attention_stack must be one of"):
        choose_stack(["model.decoder.layers.{N}.self_attn"], "cross")
    with pytest.raises(LayoutNotFound, match="'encoder' asked"):
        choose_stack(["model.decoder.layers.{N}.self_attn"], "encoder")
    with pytest.raises(LayoutNotFound, match="heads would be mixed"):   # two towers
        choose_stack(["model.H_module.layers.{N}.self_attn", "model.L_module.layers.{N}.attn"])


def test_a_gated_query_read_as_plain_llama_is_refused():
    """Qwen3-Next's q_proj holds [query | gate] per head: forced to 'llama' the shapes
    contradict; its own layout gives head h the rows [2h·d, (2h+1)·d)."""
    from interference.architectures import QKOVIndexer

    model, _ = tiny_auto_model("qwen3_next")
    with pytest.raises(ValueError, match="implies"):
        QKOVIndexer(model, QKOVConfig.from_model(model, layout="llama"))
    cfg = QKOVConfig.from_model(model)
    (name, idx), = QKOVIndexer(model, cfg).head_param_indices(1, "Q", 1).items()
    d, width = cfg.head_dim, cfg.hidden_dim
    assert idx.min().item() == 2 * d * width and idx.numel() == d * width


def test_unprovable_models_are_refused_with_the_family_and_the_reason():
    """No attention (Mamba) is refused; KV heads that differ between layers (MiMo-V2) too."""
    mamba = T.MambaForCausalLM(T.MambaConfig(num_hidden_layers=1, hidden_size=16,
                                             vocab_size=50))
    with pytest.raises(KeyError) as err:
        QKOVConfig.from_model(mamba)
    msg = str(err.value)
    assert "model_type 'mamba'" in msg and "Generic discovery: no module with query/key/value" \
        in msg and "register_layout" in msg
    mimo, _ = tiny_auto_model("mimo_v2_flash")
    with pytest.raises(ValueError, match="KV heads or widths differ between layers"):
        QKOVConfig.from_model(mimo)


def test_weights_shared_across_layers_are_one_layer_proven_at_first_application():
    """ALBERT applies one attention module at every depth: it is mapped as one layer (its
    parameters), proven on the module's first application (after the sharpened retry:
    near-uniform attention of the tiny random model), and its heatmap matches the brute
    force."""
    from interference.architectures.proof import prove_copy

    albert, kind = tiny_auto_model("albert")
    assert albert.config.num_hidden_layers == 2
    cfg = QKOVConfig.from_model(albert)
    assert cfg.num_layers == 1
    proof = prove_copy(albert)
    assert proof["observables"] == "probs+context" and proof["dtype"] == "float64"
    assert heatmap_vs_brute(albert, kind, n_fisher=2, n_scored=2) <= 1e-5


def test_proof_tolerances_catch_a_misread_layout_in_float32_and_after_sharpening():
    """XGLM cannot run in float64 (a float32 mask constant): prove_copy proves it on a
    float32 copy; K and V read from each other's modules fail there too, and the sharpened
    retries of MobileBERT (attention too flat to tell) do not rescue K/V swapped either
    (there the scaled 'K' rows are V's, so the proof still stops)."""
    from interference.architectures.proof import prove_copy

    xglm, _ = tiny_auto_model("xglm")
    proof = prove_copy(xglm)
    assert proof["dtype"] == "float32" and "overflow" in proof["float64_error"]
    for family, model in (("xglm", xglm), ("mobilebert", tiny_auto_model("mobilebert")[0])):
        good = QKOVConfig.from_model(model)
        pats = dict(LAYOUTS[good.layout].patterns)
        LAYOUTS["kv_swapped"] = LAYOUTS[good.layout].with_patterns(
            "kv_swapped", {**pats, "K": pats["V"], "V": pats["K"]})
        try:
            with pytest.raises(LayoutProofError, match="kv_swapped' of .* failed its "
                               "functional proof"):
                prove_copy(model, QKOVConfig(**{**good.to_dict(), "layout": "kv_swapped"}),
                           heads=[0])
        finally:
            del LAYOUTS["kv_swapped"]


def test_a_norm_over_all_heads_before_o_is_divided_out_but_a_misread_is_not():
    """BitNet normalises the whole context before o_proj, so a changed head rescales every
    other head's O input by one factor per token: the proof divides that factor out and
    passes; K and V read from each other's modules still fail."""
    from interference.architectures.proof import prove_copy

    bitnet, _ = tiny_auto_model("bitnet")
    assert prove_copy(bitnet)["observables"] == "probs+context"
    good = QKOVConfig.from_model(bitnet)
    pats = dict(LAYOUTS["llama"].patterns)
    LAYOUTS["kv_swapped"] = LAYOUTS["llama"].with_patterns(
        "kv_swapped", {**pats, "K": pats["V"], "V": pats["K"]})
    try:
        with pytest.raises(LayoutProofError, match=r"L1 K head 0: expected"):
            prove_copy(bitnet, QKOVConfig(**{**good.to_dict(), "layout": "kv_swapped"}))
    finally:
        del LAYOUTS["kv_swapped"]


def test_a_common_factor_is_divided_out_only_when_it_explains_every_other_head():
    from interference.architectures.proof import _common_scale_out

    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    old[1:, 2] = 0.0                       # a token with no context outside head 0
    factor = 1 + torch.rand(5, generator=g, dtype=torch.float64)
    new = old * factor[None, :, None]
    new[0] += torch.randn(5, 3, generator=g, dtype=torch.float64)
    out = _common_scale_out(new, old, {0})
    assert torch.isfinite(out).all() and torch.allclose(out[1:], old[1:], atol=1e-12)
    assert (out[0] - old[0]).abs().max() > 0.1
    moved = new.clone()
    moved[2, 1] += 0.5                     # head 2 really moved: nothing is divided out
    assert torch.equal(_common_scale_out(moved, old, {0}), moved)


def test_rotation_moves_every_head_size_and_keeps_the_ones_vector():
    from interference.architectures.proof import _rotation

    for n in (2, 3, 8):
        R = _rotation(n)
        ones = torch.ones(n, dtype=torch.float64)
        assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(R @ ones, ones, atol=1e-12)
        assert (R - torch.eye(n, dtype=torch.float64)).abs().max() > 0.3
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(_rotation(2), swap, atol=1e-12)


def test_per_layer_head_dims_are_read_from_each_layer():
    """Gemma 4: full-attention layers have another head_dim than sliding ones (the config
    refuses a global head_dim); each layer's d_k / d_v come from its own weights, the
    slices follow them, and the float64 heatmap matches the brute force."""
    from interference.architectures import QKOVIndexer
    from interference.architectures.proof import float64_copy, prove_copy

    model, kind = tiny_auto_model("gemma4_text")
    cfg = QKOVConfig.from_model(model)
    attn = [model.model.layers[l].self_attn for l in range(2)]
    d = [a.q_proj.weight.shape[0] // cfg.num_heads for a in attn]
    assert d[0] != d[1] and cfg.head_dim == d[0]
    assert cfg.extra["layer_head_dims"] == {"1": [d[1], d[1]]}
    idx = QKOVIndexer(model, cfg)
    for l in range(2):
        (name, ix), = idx.head_param_indices(l, "Q", 3).items()
        assert name == f"model.layers.{l}.self_attn.q_proj.weight"
        assert ix.min().item() == 3 * d[l] * cfg.hidden_dim and ix.numel() == d[l] * 32
        (name, ix), = idx.head_param_indices(l, "O", 3).items()
        assert sorted({int(i) % (cfg.num_heads * d[l]) for i in ix}) == \
            list(range(3 * d[l], 4 * d[l]))
    assert prove_copy(model)["observables"] == "probs+context"
    assert heatmap_vs_brute(float64_copy(model), kind, n_fisher=2, n_scored=2) <= 1e-5


def test_a_vision_tower_of_a_text_model_is_left_out():
    """GIT (bert-style text stack + a CLIP-style image tower) maps its text stack."""
    model, _ = tiny_auto_model("git")
    cfg = QKOVConfig.from_model(model)
    from interference.architectures import QKOVIndexer

    (name,) = QKOVIndexer(model, cfg).head_param_indices(1, "Q", 0)
    assert (cfg.layout, name) == ("bert", "git.encoder.layer.1.attention.self.query.weight")


def test_a_16_bit_model_is_probed_for_leaking_pads_through_a_float32_copy(monkeypatch):
    """pads_leak of a bfloat16 model runs on its float32 shrunk copy (the model's own
    forward is never probed), and still tells CPM-Ant (leaks) from GPT-2 (does not)."""
    from interference.gradients import per_sample

    seen = []
    real = per_sample._probe_padding
    monkeypatch.setattr(per_sample, "_probe_padding",
                        lambda m, tol: seen.append((next(m.parameters()).dtype, tol))
                        or real(m, tol))
    cpm = tiny_auto_model("cpmant")[0].to(torch.bfloat16)
    gpt2 = tiny_auto_model("gpt2")[0].to(torch.bfloat16)
    assert (per_sample.pads_leak(cpm), per_sample.pads_leak(gpt2)) == (True, False)
    assert seen == [(torch.float32, 1e-4)] * 2


def test_shrunk_copy_narrows_the_feed_forward_only():
    """A LLaMA (intermediate_size 256) and a GPT-2 (n_inner None: 4 x width) copy get
    MLP_WIDTH-wide feed-forwards and keep every attention weight's shape; the proof holds
    on them."""
    from interference.architectures import QKOVIndexer
    from interference.architectures.proof import MLP_WIDTH, prove_first_contact

    tiny = tiny_auto_model("llama")[0]
    cfg = copy.deepcopy(tiny.config)
    cfg.intermediate_size = 256
    for model, key in ((T.LlamaForCausalLM(cfg), "intermediate_size"),
                       (tiny_auto_model("gpt2")[0], "n_inner")):
        small = shrunk_copy(model)
        assert getattr(small.config, key) == MLP_WIDTH
        widths = {tuple(p.shape) for n, p in small.named_parameters() if ".mlp." in n
                  and p.dim() == 2}
        assert widths and all(MLP_WIDTH in w for w in widths), widths
        shapes = lambda m: {n: tuple(dict(m.named_parameters())[n].shape)
                            for n in QKOVIndexer(m).param_names}
        assert {n: v for n, v in shapes(model).items() if n in shapes(small)} == shapes(small)
        assert prove_first_contact(model)["on"] == "shrunk copy"


def test_a_16_bit_models_padding_probe_copy_is_built_on_the_models_device(monkeypatch):
    """per_sample.padding_of probes a 16-bit model through a float32 shrunk copy built on
    the model's own device (its initialisation: 1.2 s on the CPU for a 7B shape, on B2's
    critical path) and seeded there; a meta-device model's copy is built on the CPU."""
    from interference.architectures import proof
    from interference.gradients import per_sample

    built = []
    real = proof.shrunk_copy

    def spy(model, **kw):
        copy_ = real(model, **kw)
        built.append(next(copy_.parameters()).device.type)
        return copy_

    monkeypatch.setattr(proof, "shrunk_copy", spy)
    model = tiny_auto_model("llama")[0].to(torch.bfloat16)
    assert per_sample.padding_of(model) == per_sample.padding_of(model.float())
    with torch.device("meta"):
        meta = T.LlamaForCausalLM(copy.deepcopy(model.config)).to(torch.bfloat16)
    per_sample.padding_of(meta)
    assert built == ["cpu", "cpu"]
    small = real(model, dtype=torch.float32, device="meta")
    assert {p.device.type for p in small.parameters()} == {"meta"}
    a, b = (real(model, dtype=torch.float32, seed=3) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_shrunk_copy_keeps_the_geometry_and_cuts_the_layers():
    model, _ = tiny_auto_model("gemma2")
    model.config.num_hidden_layers  # 2 already: grow a 3-layer model and shrink it
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers, cfg.layer_types = 3, ["sliding_attention", "full_attention"] * 1 + \
        ["sliding_attention"]
    big = T.Gemma2ForCausalLM(cfg)
    small = shrunk_copy(big)
    assert small.config.num_hidden_layers == 2 and len(small.config.layer_types) == 2
    assert next(small.parameters()).dtype == torch.float64
    a, b = QKOVConfig.from_model(big), QKOVConfig.from_model(small)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.layout) == \
        (b.num_heads, b.num_kv_heads, b.head_dim, b.layout)


def test_the_workflow_maps_the_configured_stack_of_an_encoder_decoder(tmp_path, monkeypatch):
    """``model.attention_stack`` (conf/model) reaches the model stage (QKOVConfig and the
    proof on first contact, model.json) and the collect stage's rebuilt config: a tiny BART
    run with 'encoder' maps the encoder's self-attention, the default its decoder's."""
    import contextlib
    import json
    from types import SimpleNamespace

    from interference import data, models
    from interference.architectures import QKOVIndexer
    from qkov_pipeline.stages import gradients, model as model_stage

    bart, _ = tiny_auto_model("bart")
    monkeypatch.setattr(models, "build_from_config", lambda mcfg, **kw: (bart, None))
    monkeypatch.setattr(models, "save_prepared", lambda *a, **k: None)
    monkeypatch.setattr(models, "load_prepared", lambda *a, **k: (bart, None))
    monkeypatch.setattr(data, "load_task_batches", lambda *a, **k: ({}, None, {}))
    monkeypatch.setattr(gradients, "set_threads", lambda *a, **k: 1)
    monkeypatch.setattr(gradients, "choose_devices", lambda *a, **k: (["cpu"], "cpu"))
    for stack, side in (("encoder", "encoder"), (None, "decoder")):
        mcfg = {"name": "bart", "source": "tiny", "attention_stack": stack}
        out = tmp_path / str(stack) / "model.json"
        out.parent.mkdir()
        job = SimpleNamespace(slice={"model": mcfg}, output=SimpleNamespace(manifest=str(out)),
                              timed=lambda name: contextlib.nullcontext(), config_hash="h",
                              metric=lambda *a: None, artifact=lambda *a: None)
        model_stage.run(job)
        info = json.loads(out.read_text())
        assert info["qkov_config"]["extra"].get("attention_stack") == stack
        assert info["layout_proof"]["observables"] == "probs+context"
        stored = QKOVIndexer(bart, QKOVConfig(**info["qkov_config"]))
        (name,) = stored.head_param_indices(1, "Q", 0)
        assert name == f"model.{side}.layers.1.self_attn.q_proj.weight"
        job = SimpleNamespace(slice={"data": {"model": mcfg}}, held_locks=[],
                              input=SimpleNamespace(model=str(out), data=str(out)),
                              timed=lambda name: contextlib.nullcontext())
        qcfg, idx = gradients.load_inputs(job, {}, 0)[3:5]
        assert qcfg.to_dict() == info["qkov_config"]
        assert list(idx.head_param_indices(1, "Q", 0)) == [name]


# families proven by the mechanisms of the second pass (issue 18: 170 -> 185 of 201):
# family -> (layout, what it exercises)
SECOND_PASS = {
    "dory": ("llama", "a looped layer: the hooks engine sums both applications"),
    "prophetnet": ("generic_split", "padding leaks (predict streams): auto takes the loop"),
    "nystromformer": ("bert", "Nystrom landmarks (as Funnel's pooling) are not padding-"
                      "invariant: the reference runs samples alone"),
    "imagegpt": ("gpt2", "an image classifier over token ids, built as its causal model"),
    "musicgen": ("opt", "one codebook in the tiny config"),
    "zamba2": ("generic_split", "Mamba heads sized to width 32"),
    "squeezebert": ("generic_split", "kernel-1 Conv1d projections, channels first"),
    "yoso": ("bert", "no probabilities, a normalised context: the V-rotation rule"),
    "perceiver": ("generic_split", "latent heads; the MLM decoder answers more positions"),
    "xlstm": ("generic_split", "mLSTM's matrix memory, per-head q/k/v/o; width 128"),
    "hrm_text": ("generic_split", "two stacks of one tower as one sequence of layers; "
                 "applications without gradients add nothing"),
}


@pytest.mark.parametrize("family", list(SECOND_PASS))
def test_second_pass_family_is_proven_and_matches_brute_force(family):
    model, kind = tiny_auto_model(family)
    cfg = QKOVConfig.from_model(model)
    assert cfg.layout == SECOND_PASS[family][0]
    proof = prove_layout(float64_copy(model), heads=[0, cfg.num_heads - 1])
    assert proof["layout"] == cfg.layout
    assert heatmap_vs_brute(model, kind, n_fisher=2, n_scored=2) <= 1e-5


@pytest.mark.parametrize("family,bound64", [("gemma4_unified_text", 1e-4), ("cpmant", 1e-5)])
def test_float64_engine_meets_the_brute_force_where_float32_rounding_does_not(family, bound64):
    """The float32 engine's heatmap is 3e-5 (Gemma 4 unified) / 2e-4 (CPM-Ant) from the
    float64 brute force (division by small Fisher entries amplifies float32 rounding of
    the loss); a float64 model keeps float64 losses and products (never downcast to
    float32) and meets 1e-5 on CPM-Ant. Gemma 4's own code runs its norms and rotary
    angles in float32 even in a float64 model (``hidden_states.float()``), so its float64
    heatmap keeps float32 rounding that depends on the CPU's vector kernels (the padded
    batch and each sample alone take different tails): within 1e-5 on the machines of
    earlier runs, 2.1e-5 on an AVX2 AMD EPYC; the bound there is 1e-4."""
    model, kind = tiny_auto_model(family)
    prove_layout(float64_copy(model), heads=[0, 3])
    assert heatmap_vs_brute(float64_copy(model), kind, n_fisher=2, n_scored=2) <= bound64
    assert heatmap_vs_brute(model, kind, n_fisher=2, n_scored=2) <= 1e-3


def _engine_rows(model, engine, batch):
    from interference.architectures import QKOVIndexer
    from interference.gradients import OBJECTIVES
    from interference.gradients.per_sample import PerSampleGradients

    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    eng = PerSampleGradients(model, idx, OBJECTIVES["causal_lm"](), engine=engine)
    return idx, {g.sample_id: g.vector.double() for g in eng(batch, batch["sample_ids"])}


def _brute_rows(idx, model, batch):
    from reference_layouts import brute_grads_any

    ref = brute_grads_any("causal_lm", model, batch, trim=True)
    return {sid: torch.cat([idx.gather(g, l, b).reshape(-1) for (l, b) in idx.entries])
            for sid, g in ref.items()}


def test_hooks_engine_sums_the_applications_of_a_looped_layer():
    """Dory runs layer 0 twice per forward: the hooks engine concatenates both
    applications' tokens (x and δ), so its per-sample gradients equal the float64 brute
    force of each sample alone; the factored store refuses such a module."""
    from interference.gradients.per_sample import _HookCapture
    from reference_layouts import text_batch

    m64 = float64_copy(tiny_auto_model("dory")[0])
    batch = text_batch(3, 8, 1, "a", 97)
    idx, got = _engine_rows(m64, "hooks", batch)
    want = _brute_rows(idx, m64, batch)
    for sid in want:
        # 1e-6 of the largest entry: Dory's rotary angles are float32 even in a float64
        # model, and their rounding differs between the padded batch and a sample alone
        # by CPU (up to 1.3e-7 of the largest entry on an AVX2 AMD EPYC); a misplaced
        # application would be off by O(1)
        assert (got[sid] - want[sid]).abs().max() <= 1e-6 * want[sid].abs().max()
    cap = _HookCapture(m64, idx.param_names)
    try:
        m64(input_ids=batch["input_ids"][:1])
    finally:
        cap.remove()
    assert cap.stacked == {n.rsplit(".", 1)[0] for n in idx.param_names if ".layers.0." in n}


def test_auto_engine_takes_the_loop_where_right_padding_leaks():
    """CPM-Ant's real tokens see right padding: the hooks engine's padded batch gives
    other gradients than each sample alone, so 'auto' picks the loop engine there (and
    keeps hooks for GPT-2)."""
    from interference.gradients import OBJECTIVES
    from interference.gradients.per_sample import PerSampleGradients, pads_leak
    from reference_layouts import text_batch

    cpm = float64_copy(tiny_auto_model("cpmant")[0])
    gpt2 = tiny_auto_model("gpt2")[0]
    obj = OBJECTIVES["causal_lm"]()
    assert (pads_leak(cpm), pads_leak(gpt2)) == (True, False)
    assert PerSampleGradients.choose_engine(cpm, obj) == "loop"
    assert PerSampleGradients.choose_engine(gpt2, obj) == "hooks"
    batch = text_batch(3, 8, 1, "a", 97)
    idx, loop = _engine_rows(cpm, "loop", batch)
    _, hooks = _engine_rows(cpm, "hooks", batch)
    want = _brute_rows(idx, cpm, batch)
    padded = "a:1"   # 6 real tokens of 8
    assert torch.allclose(loop[padded], want[padded], rtol=1e-6, atol=1e-12)
    assert (hooks[padded] - want[padded]).abs().max() > 1e-3 * want[padded].abs().max()


def test_brute_force_refuses_a_non_finite_reference():
    """ProphetNet's float64 code turns a padded sample's masks into NaN gradients: the
    reference says so instead of letting NaN drop out of the max (the sweep then falls
    back to a float32 reference)."""
    from reference_layouts import NonFiniteReference

    model, kind = tiny_auto_model("prophetnet")
    with pytest.raises(NonFiniteReference, match="not finite"):
        heatmap_vs_brute(model, kind, n_fisher=2, n_scored=2, trim=False)


def test_kernel1_conv_projections_are_sliced_like_linear_rows():
    """SqueezeBERT: query/key/value are grouped nn.Conv1d(kernel 1) [out, in/groups, 1] and
    O is post_attention.conv1d [d, H·d_v, 1]; head h owns output channels (rows)
    [h·d, (h+1)·d) of q/k/v and input channels (columns) of O, written out by hand."""
    from interference.architectures import QKOVIndexer

    model, _ = tiny_auto_model("squeezebert")
    cfg = QKOVConfig.from_model(model)
    idx = QKOVIndexer(model, cfg)
    d, a = cfg.head_dim, "transformer.encoder.layers.1."
    for block, name in (("Q", "attention.query"), ("V", "attention.value")):
        w = dict(model.named_parameters())[a + name + ".weight"]
        (pname, ix), = idx.head_param_indices(1, block, 2).items()
        flat = torch.arange(w.numel()).view(w.shape)
        assert pname == a + name + ".weight"
        assert torch.equal(ix, flat[2 * d:3 * d, :, 0].reshape(-1))
    w = dict(model.named_parameters())[a + "post_attention.conv1d.weight"]
    (pname, ix), = idx.head_param_indices(1, "O", 2).items()
    assert torch.equal(ix, torch.arange(w.numel()).view(w.shape)[:, 2 * d:3 * d, 0].reshape(-1))


@pytest.mark.parametrize("family", ["yoso", "squeezebert"])
def test_a_context_only_model_with_q_and_v_swapped_fails_the_proof(family):
    """Neither YOSO (its context is normalised) nor SqueezeBERT returns probabilities: the
    proof tells V from Q/K by whether the context turns by V's rotation; Q and V read from
    each other's modules fail."""
    from interference.architectures import QKOVIndexer

    m64 = float64_copy(tiny_auto_model(family)[0])
    good = QKOVConfig.from_model(m64)
    assert prove_layout(m64, good, heads=[0])["observables"] == "context"
    adapter = QKOVIndexer(m64, good).adapter
    pats = dict(adapter.patterns)
    LAYOUTS["qv_swapped"] = adapter.with_patterns("qv_swapped",
                                                  {**pats, "Q": pats["V"], "V": pats["Q"]})
    try:
        with pytest.raises(LayoutProofError, match=r"L1 Q head 0: expected"):
            prove_layout(m64, QKOVConfig(**{**good.to_dict(), "layout": "qv_swapped"}),
                         heads=[0])
    finally:
        del LAYOUTS["qv_swapped"]


def test_an_image_classifier_over_token_ids_is_built_as_its_causal_model():
    model, kind = tiny_auto_model("imagegpt")
    assert (type(model).__name__, kind) == ("ImageGPTForCausalImageModeling", "causal_lm")


def test_one_towers_stacks_are_one_sequence_of_layers_in_module_order():
    """HRM's L and H modules (no encoder / decoder side) are layers 0-1 and 2-3 in module
    order; Swin's stages are too, but their head counts differ by stage: refused."""
    from interference.architectures import QKOVIndexer

    model, _ = tiny_auto_model("hrm_text")
    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    names = [next(iter(idx.head_param_indices(l, "Q", 0))) for l in idx.layers]
    assert names == [f"model.{s}_module.layers.{i}.self_attn.q_proj.weight"
                     for s in "LH" for i in range(2)]
    swin, _ = tiny_auto_model("swin")
    with pytest.raises(ValueError, match="number of attention heads"):
        QKOVConfig.from_model(swin)


def test_two_named_towers_on_one_side_are_not_one_tower():
    from interference.architectures.generic import _one_tower_stacks

    assert _one_tower_stacks(["m.L_module.layers.{N}.attn", "m.H_module.layers.{N}.attn"])
    assert _one_tower_stacks(["s.encoder.layers.{N}.blocks.0.attention",
                              "s.encoder.layers.{N}.blocks.1.attention"])
    assert not _one_tower_stacks(["question_encoder.bert.encoder.layer.{N}.attention.self",
                                  "ctx_encoder.bert.encoder.layer.{N}.attention.self"])
    assert not _one_tower_stacks(["text.layers.{N}.attn", "vision.layers.{N}.attn"])


def test_causal_models_run_padded_batches_unmasked_and_others_keep_the_mask():
    """padding_of reads GPT-2 as causal: the hooks engine's forward gets no attention mask
    and its per-sample gradients of a right-padded batch still equal the float64 brute
    force of each sample alone. A bidirectional BertGeneration reads 'masked' and keeps the
    mask; forced to run unmasked, its padded samples' gradients would be wrong by O(1)."""
    from interference.gradients import per_sample
    from reference_layouts import text_batch

    batch = text_batch(3, 8, 1, "a", 97)      # samples of 8, 6 and 4 tokens
    gpt2 = float64_copy(tiny_auto_model("gpt2")[0])
    seen = []
    # the transformer under the head: the engine calls it directly (no [n, T, V] logits)
    gpt2.base_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("attention_mask") is not None), with_kwargs=True)
    assert per_sample.padding_of(gpt2) == "causal"
    seen.clear()
    idx, got = _engine_rows(gpt2, "hooks", batch)
    assert seen == [False]                    # one micro-batch, no mask
    want = _brute_rows(idx, gpt2, batch)
    for sid in want:
        assert torch.allclose(got[sid], want[sid], rtol=1e-6, atol=1e-12), sid

    bert = float64_copy(tiny_auto_model("bert-generation")[0])
    assert per_sample.padding_of(bert) == "masked"
    idx, got = _engine_rows(bert, "hooks", batch)
    want = _brute_rows(idx, bert, batch)
    err = lambda rows, sid: float((rows[sid] - want[sid]).abs().max() / want[sid].abs().max())
    assert max(err(got, s) for s in want) < 1e-6
    per_sample._PADDING[bert] = "causal"
    _, forced = _engine_rows(bert, "hooks", batch)
    assert err(forced, "a:1") > 1e-2 and err(forced, "a:0") < 1e-6   # a:0 has no pads


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_o_check_catches_a_slice_of_the_wrong_head(family):
    """The O part of the proof (one batch of per-head probes through the O module: an
    nn.Linear, GPT-2's Conv1D) passes on the true slices of head 1 and, handed head 2's
    slice as head 1's, names head 2 as the one that moved."""
    from interference.architectures import QKOVIndexer
    from interference.architectures.proof import _check_o

    m64 = float64_copy(tiny_auto_model(family)[0])
    idx = QKOVIndexer(m64, QKOVConfig.from_model(m64))
    _check_o(m64, idx, 1, 1, seed=2001)

    shifted = copy.copy(idx)
    shifted.head_param_indices = lambda layer, block, h: idx.head_param_indices(layer, block,
                                                                                h + 1)
    with pytest.raises(LayoutProofError, match=r"L1 O head 1: .*saw heads \[2\]"):
        _check_o(m64, shifted, 1, 1, seed=2001)


@pytest.mark.parametrize("model_type", sorted(
    __import__("interference.gradients.objectives", fromlist=["x"]).PLAIN_HEAD_TYPES))
def test_every_plain_head_type_gives_the_brute_force_gradients_without_logits(model_type):
    """Each model type listed in objectives.PLAIN_HEAD_TYPES (logits = the output
    projection's, so the hooks engine runs the body and head_token_nll) gives the float64
    brute force's per-sample gradients of a right-padded batch. A type listed wrongly (its
    logits scaled or capped after the projection) fails here."""
    from interference.gradients.objectives import plain_lm_head
    from reference_layouts import text_batch

    model = float64_copy(tiny_auto_model(model_type)[0])
    assert model.config.model_type == model_type
    assert plain_lm_head(model) is model.get_output_embeddings()
    batch = text_batch(3, 8, 1, "a", model.config.vocab_size)
    idx, got = _engine_rows(model, "hooks", batch)
    want = _brute_rows(idx, model, batch)
    for sid in want:     # float32 rows (the store's) against float64: rounding only
        err = float((got[sid] - want[sid]).abs().max() / want[sid].abs().max())
        assert err < 1e-6, (model_type, sid, err)
