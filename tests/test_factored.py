"""Factored per-sample gradients (issue 15, item 1): stores that keep each projection's x
and δ give the same per-sample gradients, Fisher and heatmap as dense stores (float32
rounding) on every layout the hooks engine supports, and the float64 brute force."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from interference.architectures import QKOVConfig
from interference.gradients import FisherCollector, GradientStore
from interference.models import tiny_model
from interference.scores import QKOVInterferenceMetric
from interference.tiny_families import tiny_model_extra

from conftest import padded_batch, tiny_gpt2, tiny_llama
from reference import brute_grads, brute_scores, fisher_mean

# family -> (builder, include_bias)
FAMILIES = {
    "gpt2": (lambda: tiny_model("gpt2", vocab_size=97), True),        # Conv1D c_attn / c_proj
    "llama_gqa": (lambda: tiny_model("llama", vocab_size=97), False),  # GQA, head_dim 24
    "qwen2": (lambda: tiny_model_extra("qwen2"), True),                # q/k/v biases
    "mistral": (lambda: tiny_model_extra("mistral"), False),           # MQA
    "phi3": (lambda: tiny_model_extra("phi3"), False),                 # fused [Q | K | V]
    "gpt_neox": (lambda: tiny_model_extra("gpt_neox"), True),          # interleaved per head
    "falcon": (lambda: tiny_model_extra("falcon"), False),             # grouped
    "falcon_mqa": (lambda: tiny_model_extra("falcon_mqa"), False),
    "falcon_mha": (lambda: tiny_model_extra("falcon_mha"), True),
    "opt": (lambda: tiny_model_extra("opt"), True),
    "gemma3": (lambda: tiny_model_extra("gemma3"), False),             # head_dim 16, q/k norms
    "phi": (lambda: tiny_model_extra("phi"), True),                    # output `dense`
}
RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def _model(name):
    return FAMILIES[name][0]().eval()


def _batches(T=12):
    return {("math", "fisher"): padded_batch(4, T, 1, "math:f"),
            ("code", "fisher"): padded_batch(3, T, 2, "code:f"),
            ("math", "scored"): padded_batch(3, T, 3, "math:s"),
            ("code", "scored"): padded_batch(3, T - 1, 4, "code:s")}


def _collect(model, fmt, include_bias=False, memory_mb=100.0, T=12, **kw):
    cfg = QKOVConfig.from_model(model, include_bias=include_bias)
    fc = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=memory_mb,
                         config=cfg, gradient_format=fmt, **kw)
    for (task, role), b in _batches(T).items():
        fc.collect_fisher(model, b, task=task, mode="mean", role=role)
    return fc, cfg


def _heatmap(fc, cfg, **opts):
    metric = QKOVInterferenceMetric(cfg, fc, device="cpu", backend="torch",
                                    ridge_lambda=1e-14, **opts)
    return metric.compute_heatmap("math", "code")


def _close(a, b, rtol=RTOL):
    """Equal within float32 rounding, relative to the array's scale."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


def _assert_same(fa, fb, cfg, rtol=RTOL):
    sa, sb = fa.gradient_manager, fb.gradient_manager
    for task in ("math", "code"):
        ids = sa.ids(task, "scored")
        assert ids == sb.ids(task, "scored")
        for sid in ids:
            _close(sa.vector(task, sid), sb.vector(task, sid), rtol)
        # a factored store's norms are float64 sums of each weight's float32 row norms (no
        # row [P] is formed; per_sample.ROW_NORM_DEVICES), a dense store's the float64 norm
        # of the row: within 3e-8 of each other here (float32 rounding allows 1.2e-7)
        np.testing.assert_allclose(sa.grad_norms(task, ids), sb.grad_norms(task, ids),
                                   rtol=3e-8)
        _close(fa.fisher.get(task), fb.fisher.get(task), rtol)
        for (layer, block) in sa.entries:
            _close(sa.block(task, ids, layer, block), sb.block(task, ids, layer, block), rtol)
    ha, hb = _heatmap(fa, cfg), _heatmap(fb, cfg)
    for block in "QKVO":
        _close(ha[block]["scores"], hb[block]["scores"], rtol)
        _close(ha[block]["layer_head_avg"], hb[block]["layer_head_avg"], rtol)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_factored_equals_dense_on_every_layout(family):
    model = _model(family)
    bias = FAMILIES[family][1]
    dense, cfg = _collect(model, "dense", bias)
    factored, _ = _collect(model, "factored", bias)
    store = factored.gradient_manager
    assert store.gradient_format == "factored" and dense.gradient_manager.layout is None
    assert store.get_memory_usage()["ram_mb"] < dense.gradient_manager.get_memory_usage()["ram_mb"]
    _assert_same(factored, dense, cfg)


def test_auto_mixes_dense_and_factored_projections_per_sample():
    """LLaMA width 32, q_proj 48 rows, k_proj 24 rows: with T in {13, 15, 17} the 13-token
    sample keeps k_proj factored, the longer ones dense (q_proj factored in all); every
    sample equals the dense store's."""
    model = tiny_llama()
    dense, cfg = _collect(model, "dense", T=17)
    auto, _ = _collect(model, "auto", T=17)
    layout = auto.gradient_manager.layout
    plans = {T: layout.plan(T)["factored"] for T in (13, 15, 17)}
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert plans[13][q] and plans[13][k] and plans[15][q] and not plans[15][k]
    assert plans[17][q] and not plans[17][k]
    assert layout.plan(20)["factored"][q] is False
    _assert_same(auto, dense, cfg)


@pytest.mark.parametrize("variant", ["qkov", "fisher_weighted"])
@pytest.mark.parametrize("budget_mb", [None, 1000.0])
def test_scoring_writes_over_rebuilt_rows_only(variant, budget_mb):
    """The torch contraction writes f(left)·w and g(right) over its operands only where a
    factored store rebuilt them for it: after a heatmap a dense store's rows (resident on
    the device within the budget, or read from the store) and the Fisher are as collected,
    and the two stores' heatmaps agree."""
    model = tiny_llama()
    dense, cfg = _collect(model, "dense")
    factored, _ = _collect(model, "factored")
    store = dense.gradient_manager
    ids = {t: store.ids(t, "scored") for t in ("math", "code")}
    rows = {(t, s): store.vector(t, s).clone() for t in ids for s in ids[t]}
    fisher = {(k, t): fc.fisher.get(t).clone() for k, fc in enumerate((dense, factored))
              for t in ids}
    maps = [_heatmap(fc, cfg, variant=variant, device_memory_mb=budget_mb)
            for fc in (dense, factored)]
    for (t, s), row in rows.items():
        assert torch.equal(store.vector(t, s), row)
    for (k, t), f in fisher.items():
        assert torch.equal((dense, factored)[k].fisher.get(t), f)
    for block in "QKVO":
        _close(maps[1][block]["scores"], maps[0][block]["scores"])


def test_shared_input_of_q_k_v_is_stored_once():
    fc, _ = _collect(tiny_llama(), "factored")
    layout = fc.gradient_manager.layout
    pre = "model.layers.1.self_attn."
    assert {layout.groups[pre + p] for p in ("q_proj", "k_proj", "v_proj")} == {pre + "q_proj"}
    assert layout.groups[pre + "o_proj"] == pre + "o_proj"
    xs = [k for k in layout.plan(12)["sections"] if k[0] == "x"]
    assert len(xs) == 4                       # 2 layers x (qkv input, o input)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_factored_matches_float64_brute_force(family):
    make, dims = {"gpt2": (tiny_gpt2, {"L": 2, "H": 4, "Hkv": 4, "dk": 8, "dv": 8}),
                  "llama": (tiny_llama, {"L": 2, "H": 4, "Hkv": 2, "dk": 12, "dv": 12})}[family]
    model = make()
    fc, cfg = _collect(model, "factored")
    ref = {k: brute_grads(model, b) for k, b in _batches().items()}
    store = fc.gradient_manager
    for (task, role), grads in ref.items():
        if role != "scored":
            continue
        for sid, g in grads.items():
            want = fc.indexer.flatten({n: t.float() for n, t in g.items()})
            _close(store.vector(task, sid), want, 1e-4)
    fisher = {t: fisher_mean(ref[(t, "fisher")]) for t in ("math", "code")}
    pooled = {n: (fisher["math"][n] + fisher["code"][n]) / 2 for n in fisher["math"]}
    heat = _heatmap(fc, cfg)
    for block in "QKVO":
        want = brute_scores(family, dims, ref[("math", "scored")], ref[("code", "scored")],
                            pooled, block, [0, 1], list(range(4)), ridge_lambda=1e-14)
        _close(heat[block]["scores"], want, 1e-4)


def test_spill_to_disk_under_a_tiny_budget(tmp_path):
    model = tiny_llama()
    dense, cfg = _collect(model, "dense")
    # room for about two records in memory: the rest spills
    spilled, _ = _collect(model, "factored", memory_mb=0.03, spill_dir=tmp_path / "spill")
    use = spilled.gradient_manager.get_memory_usage()
    assert use["n_on_disk"] > 0 and use["n_on_disk"] < use["n_samples"]
    assert use["ram_mb"] <= 0.03 and use["disk_mb"] > 0
    assert list((tmp_path / "spill").glob("*.bin"))
    _assert_same(spilled, dense, cfg)
    # the contribution cache (C_i = g_i ⊙ g_i) reads rebuilt rows
    sid = spilled.gradient_manager.ids("code", "scored")[-1]
    _close(spilled.contribution_cache[("code", sid)], dense.contribution_cache[("code", sid)])


@pytest.mark.parametrize("memory_mb", [100.0, 0.03, 0.0])
def test_save_open_round_trip(tmp_path, memory_mb):
    model = _model("gpt2")
    fc, cfg = _collect(model, "auto", include_bias=True, memory_mb=memory_mb)
    before = _heatmap(fc, cfg)
    rows = {t: fc.gradient_manager.block(t, fc.gradient_manager.ids(t, "scored"), 1, "K")
            for t in ("math", "code")}
    kept = fc.gradient_manager.shards[("math", "scored")]
    collected = {sid: {key: t.clone() for key, t in pos.items()}
                 for sid, (where, pos) in kept.where.items() if where == "ram"}
    assert bool(collected) == (memory_mb > 0)
    for task in ("math", "code"):
        fc.save_task(task, tmp_path / task)
    index = json.loads((tmp_path / "math" / "index.json").read_text())
    assert index["format_version"] == 2 and index["factor_layout"]["fmt"] == "auto"
    assert sorted(p.name for p in (tmp_path / "math").glob("*.bin")) == ["math__scored.bin"]
    after_save = _heatmap(fc, cfg)                         # the store now reads the files
    loaded = FisherCollector.from_saved([tmp_path / "math", tmp_path / "code"])
    assert loaded.gradient_format == "auto"
    after_open = _heatmap(loaded, cfg)
    # records are read with positioned reads: nothing of the store stays memory-mapped
    # (mapped pages would count in the scoring job's resident memory)
    assert all(not sh._maps for sh in loaded.gradient_manager.shards.values())
    for block in "QKVO":
        np.testing.assert_array_equal(after_save[block]["scores"], before[block]["scores"])
        np.testing.assert_array_equal(after_open[block]["scores"], before[block]["scores"])
    # a record read whole from the saved file (FactorLayout.read) holds what was collected
    shard = loaded.gradient_manager.shards[("math", "scored")]
    for sid in shard.ids:
        k, off = shard.where[sid][1]
        got = shard.layout.read(shard.files[k], off, shard.T[sid])
        want = collected.get(sid) or {key: sec.load()
                                      for key, sec in shard.record(sid)[1].items()}
        assert got.keys() == want.keys() and all(torch.equal(got[x], want[x]) for x in got)
    for t in ("math", "code"):
        ids = loaded.gradient_manager.ids(t, "scored")
        assert torch.equal(loaded.gradient_manager.block(t, ids, 1, "K"), rows[t])
        np.testing.assert_array_equal(loaded.gradient_manager.grad_norms(t, ids),
                                      fc.gradient_manager.grad_norms(t, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sections_on_disk_are_read_into_the_padded_batch(tmp_path, dtype):
    """Factors left on disk (factored.OnDisk) are read straight into their rows of the
    zero-padded batch: the same bytes as pad_sequence of the tensors, also mixed with
    factors in memory and when every length is equal; a section cut short is refused."""
    from interference.gradients.factored import OnDisk, _padded, to_numpy

    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(t, 6, generator=gen).to(dtype) for t in (5, 3, 7, 1)]
    path, sections, off = tmp_path / "records.bin", [], 3       # unaligned offsets too
    with open(path, "wb") as fh:
        fh.write(bytes(off))
        for f in factors:
            fh.write(to_numpy(f).tobytes())
            nbytes = f.numel() * f.element_size()
            sections.append(OnDisk(str(path), off, dtype, tuple(f.shape), nbytes))
            off += nbytes
    want = torch.nn.utils.rnn.pad_sequence(factors, batch_first=True)
    mixed = [sections[0], factors[1], sections[2], factors[3]]
    for got in (_padded(sections, "cpu"), _padded(mixed, "cpu")):
        assert got.dtype == dtype and torch.equal(got, want)
    same = [sections[0], sections[0]]
    assert torch.equal(_padded(same, "cpu"), torch.stack([factors[0], factors[0]]))
    assert torch.equal(sections[2].load(), factors[2])
    beyond = OnDisk(str(path), off - 4, dtype, (1, 6), 6 * factors[0].element_size())
    with pytest.raises(ValueError, match="cut short"):
        _padded([sections[0], beyond], "cpu")


def test_gather_of_factored_shards(tmp_path):
    """Two saved stores of disjoint samples gather (files linked) into one that reads the
    same rows; gathering it again (parts of parts) and re-saving keep them."""
    model = tiny_llama()
    cfg = QKOVConfig.from_model(model)
    whole = FisherCollector(enable_cross_task_analysis=True, config=cfg,
                            gradient_format="factored")
    b = padded_batch(5, 12, 7, "code:s")
    whole.collect_fisher(model, b, task="code", role="scored")
    dirs = []
    for k, (lo, hi) in enumerate([(0, 2), (2, 5)]):
        part = {key: (v[lo:hi] if key != "sample_ids" else v[lo:hi]) for key, v in b.items()}
        fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, spill_dir=tmp_path / f"s{k}",
                             gradient_format="factored", gradient_memory_mb=0.0 if k else 100)
        fc.collect_fisher(model, part, task="code", role="scored")
        fc.gradient_manager.save(tmp_path / f"shard{k}")
        dirs.append(tmp_path / f"shard{k}")
    g = GradientStore.gather(dirs, tmp_path / "gathered")
    ids = whole.gradient_manager.ids("code", "scored")
    assert g.ids("code", "scored") == ids
    for (layer, block) in g.entries:
        _close(g.block("code", ids, layer, block),
               whole.gradient_manager.block("code", ids, layer, block))
    g2 = GradientStore.gather([tmp_path / "gathered"], tmp_path / "again")
    g2.save(tmp_path / "resaved")
    g3 = GradientStore.open(tmp_path / "resaved")
    for (layer, block) in g.entries:
        assert torch.equal(g3.block("code", ids, layer, block), g.block("code", ids, layer, block))
    with pytest.raises(ValueError, match="read-only"):
        GradientStore.open(tmp_path / "again").shards[("code", "scored")].add(
            "x", {}, 3, in_ram=False)


def test_sharded_factored_collection_equals_one_collector_bitwise(tmp_path):
    """Shards (one holding Fisher samples only, so no record and no input groups yet)
    saved with partial sums and gathered == one collector: rows, norms, Fisher bitwise;
    record files hard-linked."""
    from qkov_pipeline.plan import MICRO_BATCH
    from interference.gradients.collect import take

    model = tiny_llama()
    batches = {"fisher": padded_batch(10, 12, 1, "f"), "scored": padded_batch(5, 12, 2, "s")}

    def collect(ranges, partials):
        fc = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=0.02,
                             fisher_partials=partials, gradient_format="factored")
        for role, (a, b) in ranges.items():
            calls = [(u, min(u + MICRO_BATCH, b)) for u in range(a, b, MICRO_BATCH)] \
                if role == "fisher" else [(a, b)]
            for u, v in calls:
                fc.collect_fisher(model, take(batches[role], u, v), task="t", mode="mean",
                                  role=role)
        return fc

    collect({"fisher": (0, 10), "scored": (0, 5)}, False).save_task("t", tmp_path / "one")
    plan = [{"fisher": (0, 8)}, {"fisher": (8, 10), "scored": (0, 2)}, {"scored": (2, 5)}]
    dirs = []
    for i, ranges in enumerate(plan):
        collect(ranges, True).save_task("t", tmp_path / f"p{i}", partial=True)
        dirs.append(tmp_path / f"p{i}")
    FisherCollector.gather_saved(dirs, tmp_path / "g")
    ref = FisherCollector.from_saved([tmp_path / "one"])
    got = FisherCollector.from_saved([tmp_path / "g"])
    assert got.gradient_format == "factored"
    assert torch.equal(ref.fisher.get("t"), got.fisher.get("t"))
    sa, sb = ref.gradient_manager, got.gradient_manager
    assert sa.ids("t", "scored") == sb.ids("t", "scored")
    for sid in sa.ids("t", "scored"):
        assert torch.equal(sa.vector("t", sid), sb.vector("t", sid))
        assert sa.norms[("t", sid)] == sb.norms[("t", sid)]
    part = next((tmp_path / "g").rglob("parts/*/t__scored.bin"))
    assert part.stat().st_nlink == 2


def test_stored_factors_do_not_depend_on_the_batch():
    """The same sample in two batches (other companions, other padding): same T, same
    rebuilt gradient, equal to a batch of one."""
    model = tiny_llama()
    cfg = QKOVConfig.from_model(model)
    a = padded_batch(3, 12, 11, "x")            # sample x:1 has 10 tokens, padded to 12
    lone = {k: (v[1:2] if k != "sample_ids" else v[1:2]) for k, v in a.items()}
    lone = {"input_ids": lone["input_ids"][:, :10], "attention_mask": lone["attention_mask"][:, :10],
            "labels": lone["labels"][:, :10], "sample_ids": ["x:1"]}
    other = padded_batch(4, 16, 12, "y")        # longer companions: x:1 padded to 16
    mixed = {k: torch.cat([other[k][:2], torch.nn.functional.pad(a[k][1:2], (0, 4),
                                                                    value=-100 if k == "labels" else 0),
                           other[k][2:]]) for k in ("input_ids", "attention_mask", "labels")}
    mixed["sample_ids"] = ["y:0", "y:1", "x:1", "y:2", "y:3"]
    rows = []
    for batch in (a, lone, mixed):
        fc = FisherCollector(enable_cross_task_analysis=True, config=cfg,
                             gradient_format="factored")
        fc.collect_fisher(model, batch, task="t", role="scored")
        st = fc.gradient_manager
        assert st.shards[("t", "scored")].T["x:1"] == 10
        rows.append(st.vector("t", "x:1"))
    _close(rows[1], rows[0])
    _close(rows[2], rows[0])


def test_bfloat16_model_keeps_factors_in_its_dtype():
    model = tiny_llama().to(torch.bfloat16)
    dense, cfg = _collect(model, "dense")
    factored, _ = _collect(model, "factored")
    rec = next(iter(factored.gradient_manager.shards[("code", "scored")].where.values()))[1]
    assert all(t.dtype == torch.bfloat16 for t in rec.values())
    _assert_same(factored, dense, cfg)


@pytest.mark.parametrize("store_dtype", ["bfloat16", "float16"])
def test_lower_precision_factors_rebuild_in_float32(tmp_path, store_dtype):
    """fisher.store_dtype bfloat16 / float16 on a float32 model: x and δ are kept in it (half
    the bytes of float32 factors), and rows are rebuilt from them with float32 sums: equal
    to the float64 Σ_t δ_t x_tᵀ of the stored (rounded) factors, also after save and open;
    Fisher and norms stay those of the float32 collection."""
    model = tiny_llama()
    full, cfg = _collect(model, "factored")
    low, _ = _collect(model, "factored", store_dtype=store_dtype)
    store, dt = low.gradient_manager, getattr(torch, store_dtype)
    assert store.layout.factor_dtype == store_dtype
    shard = store.shards[("code", "scored")]
    sid = shard.ids[0]
    assert all(t.dtype == dt for t in shard.record(sid)[1].values())
    assert 2 * shard.record_bytes(sid) == full.gradient_manager.shards[
        ("code", "scored")].record_bytes(sid)
    T, rec = shard.record(sid)
    grads = {}
    for path, m in store.layout.modules.items():
        x = rec[("x", store.layout.groups[path])].double()
        grads[m["params"]["weight"]] = rec[("delta", path)].double().T @ x
    want = low.indexer.flatten({n: g for n, g in grads.items()}).double()
    _close(store.vector("code", sid), want, 1e-6)
    low.save_task("code", tmp_path / "code")
    reopened = GradientStore.open(tmp_path / "code")
    assert torch.equal(reopened.vector("code", sid), store.vector("code", sid))
    tol = {"bfloat16": 2e-2, "float16": 2e-3}[store_dtype]
    _close(store.vector("code", sid), full.gradient_manager.vector("code", sid), tol)
    ids = store.ids("code", "scored")
    np.testing.assert_array_equal(store.grad_norms("code", ids),
                                  full.gradient_manager.grad_norms("code", ids))
    assert torch.equal(low.fisher.get("code"), full.fisher.get("code"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sixteen_bit_factors_rebuild_by_a_float32_output_matmul_in_the_same_layout(
        monkeypatch, family):
    """Where 16-bit matmuls write float32 (kernels.LOWP_OUT_DEVICES: CUDA's
    torch.bmm(out_dtype=)), rows are rebuilt by one δᵀx product per part instead of the
    float32 copies' einsum. On the CPU, with that product standing in as a float64 bmm
    rounded to float32, every (layer, block)'s rows (Q/K/V by rows, O by columns; LLaMA
    GQA, GPT-2 fused QKV) equal the einsum path's within float32 rounding. (The CUDA
    kernel itself: benchmarks/check_cuda.py.)"""
    from interference.gradients import kernels

    model = tiny_llama() if family == "llama" else tiny_gpt2()
    low, _ = _collect(model, "factored", store_dtype="bfloat16")
    store = low.gradient_manager
    ids = store.ids("code", "scored")
    keys = list(store.layout.parts)
    want = {k: store.block("code", ids, *k, device="cpu") for k in keys}
    calls = []

    def product(a, b):
        calls.append(a.dtype)
        return torch.bmm(a.double(), b.double()).float()

    monkeypatch.setattr(kernels, "LOWP_OUT_DEVICES", {"cpu"})
    monkeypatch.setattr(kernels, "_LOWP_OK", {})
    monkeypatch.setattr(kernels, "lowp_bmm", product)
    for k in keys:
        got = store.block("code", ids, *k, device="cpu")
        assert got.dtype == torch.float32 and got.shape == want[k].shape
        _close(got, want[k], 1e-6)
    assert calls and set(calls) == {torch.bfloat16}


def test_switch_and_engine_checks():
    with pytest.raises(ValueError, match="gradient_format"):
        FisherCollector(gradient_format="sparse")
    bert = tiny_model_extra("bert")
    b = padded_batch(2, 10, 1, "m")
    auto = FisherCollector(enable_cross_task_analysis=True, gradient_format="auto")
    auto.collect_fisher(bert, b, task="m", role="scored")      # loop engine: stays dense
    assert auto.gradient_manager.gradient_format == "dense"
    with pytest.raises(ValueError, match="hooks"):
        FisherCollector(enable_cross_task_analysis=True, gradient_format="factored"
                        ).collect_fisher(bert, b, task="m", role="scored")
    with pytest.raises(ValueError, match="hooks"):
        FisherCollector(enable_cross_task_analysis=True, gradient_format="factored",
                        engine="loop").collect_fisher(tiny_llama(), b, task="m", role="scored")
    # the seed's collector is unchanged: dense rows by default, same memory report
    seed = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=100)
    seed.collect_fisher(tiny_llama(), padded_batch(2, 10, 1, "s"), task="math", mode="ema")
    assert seed.gradient_manager.gradient_format == "dense"
    assert set(seed.gradient_manager.get_memory_usage()) == {
        "ram_mb", "disk_mb", "budget_mb", "n_samples", "n_on_disk"}
