"""Issue 15 (workflow side): bfloat16 models against float64 brute force, the estimate
printed before collection (rows, disk, time) and its refusals, layer chunks and passes,
random models from a named shape."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import FisherCollector
from interference.gradients.collect import (activation_bytes, check_disk, check_memory,
                                            collection_estimate, disk_plan,
                                            estimate, layer_bytes, pass_flops_per_token,
                                            pass_memory, RATE_FLOPS)
from interference.results import size_text as size
from interference.scores import QKOVInterferenceMetric
from interference.scores.layerwise import chunk_layers, layer_passes, plan_passes

from conftest import ROOT, padded_batch, tiny_gpt2, tiny_llama
from reference import brute_grads, brute_scores, fisher_mean

LLAMA = {"L": 2, "H": 4, "Hkv": 2, "dk": 12, "dv": 12}
# bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3): every activation, weight
# gradient and δ of the forward and backward passes is rounded to it, through 2 layers, so
# the scores (products of two gradients over a Fisher of squares) carry a few percent of
# error against float64 on the same (bf16-exact) weights (measured: <= 1.2%). Stated
# tolerance: 3% of each
# (layer, block)'s largest score; float32 models are held to 1e-5 elsewhere (test_engine).
BF16_RTOL = 3e-2


def _batches():
    return {("math", "fisher"): padded_batch(3, 12, 1, "math:f"),
            ("code", "fisher"): padded_batch(3, 12, 2, "code:f"),
            ("math", "scored"): padded_batch(2, 12, 3, "math:s"),
            ("code", "scored"): padded_batch(3, 11, 4, "code:s")}


def test_bfloat16_model_matches_float64_brute_force(fmt="auto"):
    """A bfloat16 LLaMA-GQA (factored rows in bf16, gradients and Fisher accumulated in
    float32) scores within BF16_RTOL of the float64 computation on the same weights."""
    model = tiny_llama().to(torch.bfloat16)
    cfg = QKOVConfig.from_model(model)
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, gradient_format=fmt)
    batches = _batches()
    for (task, role), b in batches.items():
        fc.collect_fisher(model, b, task=task, mode="mean", role=role)
    assert fc.gradient_manager.layout is not None        # rows kept as bf16 x and δ
    heat = QKOVInterferenceMetric(cfg, fc, device="cpu", backend="torch",
                                  ridge_lambda=1e-14).compute_heatmap("math", "code")
    ref = {k: brute_grads(model, b) for k, b in batches.items()}   # float64 copy of the bf16 weights
    fm, fcode = fisher_mean(ref[("math", "fisher")]), fisher_mean(ref[("code", "fisher")])
    pooled = {n: (fm[n] + fcode[n]) / 2 for n in fm}
    for block in "QKVO":
        want = brute_scores("llama", LLAMA, ref[("math", "scored")], ref[("code", "scored")],
                            pooled, block, [0, 1], [0, 1, 2, 3], ridge_lambda=1e-14)
        got = heat[block]["scores"]
        for li in range(2):
            scale = np.abs(want[:, :, li]).max()
            err = np.abs(got[:, :, li] - want[:, :, li]).max() / scale
            assert err <= BF16_RTOL, (block, li, err)


# ----------------------------------------------------------------------------- the estimate

def _store_bytes(fc, directory) -> int:
    """Bytes of the saved gradient rows (the .bin files) of a collector's store."""
    fc.save_task("code", directory, partial=True)
    return sum(p.stat().st_size for p in directory.rglob("*.bin"))


@pytest.mark.parametrize("fmt", ["dense", "factored"])
def test_layer_bytes_equals_the_saved_rows_of_gpt2(tmp_path, fmt):
    """GPT-2's c_attn reads x once per module, so the estimate is exact for both formats:
    it equals the bytes of the rows the store writes."""
    model = tiny_gpt2()
    cfg = QKOVConfig.from_model(model)
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, gradient_format=fmt)
    b = padded_batch(5, 12, 1, "code:s")
    fc.collect_fisher(model, b, task="code", mode="mean", role="scored")
    tokens = b["attention_mask"].sum(1).tolist()
    per_layer = layer_bytes(QKOVIndexer(model, cfg), tokens, "float32", fmt, "float32")
    assert sum(per_layer.values()) == _store_bytes(fc, tmp_path / "s")
    if fmt == "dense":     # dense rows: every attention parameter, 4 bytes, per sample
        assert sum(per_layer.values()) == QKOVIndexer(model, cfg).total_size * 4 * 5


def test_layer_bytes_bounds_llama_factored_rows(tmp_path):
    """LLaMA's q/k/v_proj share x, kept once: the estimate counts it per projection, an
    upper bound within (3 + 3 + 2) / (1 + 3 + 2) of the saved rows for this geometry."""
    model = tiny_llama()
    cfg = QKOVConfig.from_model(model)
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, gradient_format="factored")
    b = padded_batch(5, 12, 1, "code:s")
    fc.collect_fisher(model, b, task="code", mode="mean", role="scored")
    est = sum(layer_bytes(QKOVIndexer(model, cfg), b["attention_mask"].sum(1).tolist(),
                          "float32", "factored", "float32").values())
    saved = _store_bytes(fc, tmp_path / "s")
    # per token: x (32) once, δ of q (48), k (24), v (24); x (48) and δ (32) of o_proj
    exact = sum(T * (32 + 48 + 24 + 24 + 48 + 32) * 4 * 2 for T in b["attention_mask"].sum(1).tolist())
    assert saved == exact
    assert est == exact + sum(T * 2 * 32 * 4 * 2 for T in b["attention_mask"].sum(1).tolist())


def test_collection_estimate_and_disk_refusal(tmp_path, monkeypatch):
    """The estimate's parts by hand; the disk check refuses a store larger than the free
    space (factored-aware: the factored estimate, not the dense size, is what is checked)."""
    model = tiny_gpt2()
    cfg = QKOVConfig.from_model(model)
    idx = QKOVIndexer(model, cfg)
    batches = {"fisher": padded_batch(4, 12, 1, "f"), "scored": padded_batch(3, 12, 2, "s")}
    est = collection_estimate(model, idx, batches, "float32", "auto", 1024.0, "cpu", 2)
    stored = batches["scored"]["attention_mask"].sum(1).tolist()
    every = stored + batches["fisher"]["attention_mask"].sum(1).tolist()
    rows = sum(layer_bytes(idx, stored, "float32", "auto", "float32").values())
    n = sum(p.numel() for p in model.parameters())
    assert est["rows_bytes"] == rows
    assert est["disk"]["final_bytes"] == rows + 8 * idx.total_size
    act = activation_bytes(model, idx.layers, 8, max(every))
    assert act > 0 and est["activation_bytes"] == act
    assert est["memory_bytes"] == 4 * n + rows + 8 * idx.total_size + act
    assert collection_estimate(model, idx, batches, "float32", "auto", 1024.0, "cpu", 2,
                               4)["activation_bytes"] == activation_bytes(model, idx.layers, 4,
                                                                          max(every))
    flops = pass_flops_per_token(model, idx, idx.layers)
    assert est["seconds"] == pytest.approx(flops * sum(every) / (2 * RATE_FLOPS["cpu"]))
    assert estimate([3e10, 2e10], [256] * 300, "cuda:0", "bfloat16", 1, 40) == pytest.approx(
        (3e10 + 2e10) * 256 * 300 / RATE_FLOPS["cuda/bfloat16"] + 2 * 40 * 0.03)
    free = est["disk"]["peak_bytes"] * 2     # room for the factored store, not 100x it
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": free})())
    check_disk(tmp_path, est["disk"], 0.9)
    with pytest.raises(RuntimeError, match="not enough disk"):
        check_disk(tmp_path, disk_plan(idx.total_size, 300, "float32"), 0.9)
    assert size(512) == "512 B" and size(3.5 * 2**20) == "3.5 MB" and size(2.6 * 2**40) == "2.6 TB"
    need = est["memory_bytes"] - est["model_bytes"]
    check_memory(est, need)                  # exactly enough
    check_memory(est, None)                  # unknown: not checked
    with pytest.raises(RuntimeError, match="not enough memory"):
        check_memory(est, need - 1)


def test_collect_job_refuses_before_any_work(tmp_path, monkeypatch):
    """rule collect: the estimate and the disk check run before the collector exists."""
    from qkov_pipeline.stages import gradients as stage

    model = tiny_gpt2()
    cfg = QKOVConfig.from_model(model)
    batches = {"fisher": padded_batch(4, 12, 1, "f"), "scored": padded_batch(3, 12, 2, "s")}
    monkeypatch.setattr(stage, "load_inputs", lambda job, ex, slot: (
        model, batches, {}, cfg, QKOVIndexer(model, cfg), "cpu", {}, 1))
    monkeypatch.setattr(stage, "make_collector", lambda *a, **k: pytest.fail("collected"))
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1000})())

    class Job:
        rule = "collect"
        exec = {"disk_safety": 0.9, "gradient_format": "auto"}
        slice = {"data": {"task": "code", "split_seed": 0},
                 "fisher": {"store_dtype": "float32", "mode": "mean"}}
        output = type("O", (), {"manifest": str(tmp_path / "s" / "store.json"),
                                "grads": str(tmp_path / "s" / "grads")})()
        metrics = {}

        def metric(self, k, v):
            self.metrics[k] = v

    (tmp_path / "s").mkdir()
    job = Job()
    with pytest.raises(RuntimeError, match="not enough disk"):
        stage.run_collect(job)
    assert job.metrics["estimate.rows_bytes"] > 0


def test_engine_micro_batch_divides_the_fisher_unit():
    from interference.gradients.collect import engine_micro_batch

    assert [engine_micro_batch(m, 8) for m in (8, 4, 2, 1)] == [8, 4, 2, 1]
    for bad in (3, 0, 16, True, "4", None):
        with pytest.raises(ValueError, match="divisor of 8"):
            engine_micro_batch(bad, 8)


def test_micro_batches_of_4_within_units_of_8_give_the_same_store(tmp_path):
    """collect_role in 8-sample units with the engine's micro-batch 4 or 8: the same Fisher,
    per-sample gradients and norms up to float32 rounding (the Fisher's sums are added in a
    different order)."""
    from interference.gradients.collect import collect_role, make_collector

    model = tiny_llama()
    cfg = QKOVConfig.from_model(model)
    batches = {"fisher": padded_batch(12, 10, 1, "math:f"),
               "scored": padded_batch(9, 10, 2, "math:s")}
    f = {"ema_decay": 0.99, "store_dtype": "float32", "loss_reduction": "mean"}
    out = {}
    for m in (4, 8):
        fc = make_collector(f, {"gradient_format": "factored", "gradient_memory_mb": 64}, cfg,
                            tmp_path / f"spill{m}", False, m)
        for role, b in batches.items():
            collect_role(fc, model, b, "math", role, "mean", 0, len(b["sample_ids"]), 8)
        ids = fc.gradient_manager.ids("math", "scored")
        store = fc.gradient_manager
        out[m] = (fc.fisher.get("math").double(),
                  torch.stack([store.vector("math", i) for i in ids]).double(),
                  torch.as_tensor(store.grad_norms("math", ids)))
    for a, b in zip(out[4], out[8]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7 * float(b.abs().max()))
    assert not torch.equal(out[4][1], torch.zeros_like(out[4][1]))


# ----------------------------------------------------------------------------- chunks, passes

def test_chunks_and_passes():
    assert chunk_layers(list(range(32)), 3) == [list(range(11)), list(range(11, 22)),
                                                list(range(22, 32))]
    assert chunk_layers([0, 1], 5) == [[0], [1]]
    with pytest.raises(ValueError):
        chunk_layers([0, 1], 0)
    per = {l: 10 for l in range(5)}
    assert layer_passes([0, 1, 2, 3, 4], per, None) == [[0, 1, 2, 3, 4]]
    assert layer_passes([0, 1, 2, 3, 4], per, 25) == [[0, 1], [2, 3], [4]]
    assert layer_passes([0, 1, 2, 3, 4], per, 50) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="exceed the memory budget"):
        layer_passes([0, 1], per, 9)


def test_passes_give_the_stored_scores():
    """Three layers in one pass or in two give the same heatmaps, reference scores and top
    conflicts, bit for bit (each (layer, block) reads only its own layer)."""
    from interference.scores.layerwise import score_layers

    model = tiny_llama(n_layer=3)
    cfg = QKOVConfig.from_model(model)
    by_task = {"math": {"fisher": padded_batch(3, 8, 1, "math:f"),
                        "scored": padded_batch(2, 8, 2, "math:s"),
                        "reference": padded_batch(2, 8, 3, "math:r"),
                        "control": padded_batch(2, 8, 6, "math:c")},
               "code": {"fisher": padded_batch(3, 8, 4, "code:f"),
                        "scored": padded_batch(3, 8, 5, "code:s")}}

    def make(layers):
        return FisherCollector(enable_cross_task_analysis=True, config=cfg, layers=layers)

    runs = [score_layers(model, by_task, "math", "code", p, make, arms=("main", "control"),
                         metric_kwargs={"device": "cpu"}, progress=False)
            for p in ([[0, 1, 2]], [[0, 1], [2]])]
    for arm in ("main", "control"):
        for block in "QKVO":
            np.testing.assert_array_equal(runs[0][arm]["heat"][block]["scores"],
                                          runs[1][arm]["heat"][block]["scores"])
            np.testing.assert_array_equal(runs[0][arm]["ref"][block], runs[1][arm]["ref"][block])
            assert runs[0][arm]["heat"][block]["top_conflicts"] == \
                runs[1][arm]["heat"][block]["top_conflicts"]
        np.testing.assert_allclose(runs[0][arm]["sq_norms_b"], runs[1][arm]["sq_norms_b"],
                                   rtol=1e-6)
    assert runs[1]["main"]["heat"]["meta"]["layers"] == [0, 1, 2]


def test_the_only_chunk_is_saved_joined_and_read_back_without_torch(tmp_path):
    """A run's only chunk is saved as its join (the means and top conflicts as the join
    recomputes them), so rule scores reads it back, without importing torch, to exactly
    what the join of the chunk as scored makes; the Snakemake process's planning imports no
    torch either (both start faster: the 7B benchmark's critical path)."""
    import json
    import subprocess
    import sys

    from interference.results import load_heatmap
    from interference.scores.join import join_chunk_folders
    from interference.scores.layerwise import join_heatmaps, score_layers
    from qkov_pipeline.stages.chunks import save_chunk_arms

    from conftest import ROOT, workflow_env

    model = tiny_llama(n_layer=2)
    cfg = QKOVConfig.from_model(model)
    by_task = {"math": {"fisher": padded_batch(3, 8, 1, "math:f"),
                        "scored": padded_batch(3, 8, 2, "math:s"),
                        "reference": padded_batch(2, 8, 3, "math:r")},
               "code": {"fisher": padded_batch(3, 8, 4, "code:f"),
                        "scored": padded_batch(2, 8, 5, "code:s")}}
    res = score_layers(model, by_task, "math", "code", [[0, 1]],
                       lambda layers: FisherCollector(enable_cross_task_analysis=True,
                                                      config=cfg, layers=layers),
                       arms=("main",), metric_kwargs={"device": "cpu", "top_k": 7},
                       progress=False)
    for name, only in (("raw", False), ("joined", True)):
        save_chunk_arms(tmp_path / name / "0", res, only=only)
        (tmp_path / name / "0" / "chunk.json").write_text(json.dumps(
            {"index": 0, "n_chunks": 1, "saved_joined": only}))
    raw_heat, raw_ref = load_heatmap(tmp_path / "raw" / "0" / "main")
    want, want_ref = join_heatmaps([raw_heat], [raw_ref], cfg, 7)     # the join as it was
    for name in ("joined", "raw"):     # read as saved; a chunk saved unjoined is joined
        heat, ref, norms_b, _, ids_r, _ = join_chunk_folders([tmp_path / name / "0"], "main")
        assert heat["meta"] == json.loads(json.dumps(want["meta"]))
        for b in "QKVO":
            np.testing.assert_array_equal(heat[b]["scores"], want[b]["scores"])
            np.testing.assert_array_equal(heat[b]["layer_head_avg"], want[b]["layer_head_avg"])
            np.testing.assert_array_equal(ref[b], want_ref[b])
            assert heat[b]["top_conflicts"] == want[b]["top_conflicts"] and \
                len(want[b]["top_conflicts"]) == 7
            assert (heat[b]["layers"], heat[b]["heads"]) == (want[b]["layers"], want[b]["heads"])
        np.testing.assert_array_equal(norms_b, np.sqrt(res["main"]["sq_norms_b"]))
        assert ids_r == res["main"]["ids_r"]
    light = (
        "import sys\n"
        "from pathlib import Path\n"
        "from interference.scores.join import join_chunk_folders\n"
        f"join_chunk_folders([{str(tmp_path / 'joined' / '0')!r}], 'main')\n"
        "from qkov_pipeline import hooks, plan as qp\n"
        f"root = Path({str(ROOT)!r})\n"
        "plan = qp.build_plan(root / 'conf', root / 'workflow/schemas/config.schema.yaml', "
        "['tiny'], ['++tracking.mode=off'])\n"
        "hooks.configure_tracking(plan, main=True)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True,
                         env=workflow_env(), cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_random_model_from_a_named_shape():
    """conf/model/llama2_7b.yaml, llama3_8b.yaml and llama2_70b.yaml describe the published
    shapes (built on the meta device: no memory, no download); a tiny random model is the
    same on rebuild."""
    import yaml

    from interference.models import DTYPES, describe, random_config, random_model
    from conftest import ROOT

    want = {"llama2_7b": (6_738_415_616, 32, 32, 32, 4096),
            "llama3_8b": (8_030_261_248, 32, 8, 32, 4096),
            "llama2_70b": (68_976_648_192, 64, 8, 80, 8192)}
    for name, (n, heads, kv, layers, width) in want.items():
        mcfg = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
        info = describe(random_model(random_config(mcfg), 0, DTYPES["bfloat16"], "meta"), None,
                        prove=False)                      # sizes only (the proof: test_layout_*)
        assert info["n_params"] == n
        assert (info["qkov_config"]["num_heads"], info["qkov_config"]["num_kv_heads"]) == (heads, kv)
        assert info["n_attention_params"] == layers * width * 128 * (2 * heads + 2 * kv)
    small = {"family": "llama", "vocab_size": 64, "attn_implementation": "eager",
             "overrides": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 1}}
    a = random_model(random_config(small), 3, torch.bfloat16)
    b = random_model(random_config(small), 3, torch.bfloat16)
    assert next(a.parameters()).dtype == torch.bfloat16
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), k


def test_random_weights_load_without_the_prepared_folder(tmp_path):
    """A chunk job of a random-weights model builds the config from the model config
    (load_prepared(None, ...)): the weights equal those made from prepare_model's saved
    config; any other source needs the folder."""
    import yaml

    from interference.models import build_from_config, load_prepared, save_prepared

    mcfg = yaml.safe_load((ROOT / "conf" / "model" / "tiny_random.yaml").read_text())
    save_prepared(*build_from_config(mcfg), tmp_path / "hf")
    saved, _ = load_prepared(tmp_path, mcfg)
    built, tok = load_prepared(None, mcfg)
    assert tok is None and type(built) is type(saved)
    a, b = saved.state_dict(), built.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert built.config.num_hidden_layers == 2 and built.config.head_dim == 24
    with pytest.raises(ValueError, match="needs the folder"):
        load_prepared(None, dict(mcfg, source="tiny"))


# ------------------------------------------------------------- memory of a pass, the planner

def _measured_pass(model, layers, batch, role):
    """Bytes actually allocated in one micro-batch of a collection over ``layers``: the
    hooks' per-sample gradients, the gathered pieces that are copies, the [m, P] rows, and
    the activations saved for the backward (distinct storages, parameters excluded)."""
    cfg = QKOVConfig.from_model(model)
    got = {"act": {}}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    original = QKOVIndexer.flatten_rows

    def flatten_rows(self, tensors):
        ptrs = {t.untyped_storage().data_ptr() for t in tensors.values()}
        got["grads"] = sum(t.untyped_storage().nbytes() for t in tensors.values())
        pieces = [self.gather(tensors, l, b).flatten(1) for (l, b) in self.entries]
        got["copies"] = sum(p.untyped_storage().nbytes() for p in pieces
                            if p.untyped_storage().data_ptr() not in ptrs)
        rows = original(self, tensors)
        got["cat"], got["P"] = rows.untyped_storage().nbytes(), rows.shape[1]
        return rows

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            got["act"][ptr] = t.untyped_storage().nbytes()
        return t

    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, layers=layers,
                         micro_batch=len(batch["sample_ids"]), gradient_format="dense")
    QKOVIndexer.flatten_rows = flatten_rows
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fc.collect_fisher(model, batch, task="math", mode="mean", role=role)
    finally:
        QKOVIndexer.flatten_rows = original
    got["act"] = sum(got["act"].values())
    return got


@pytest.mark.parametrize("layers", [[0, 1, 2], [2]])
def test_pass_memory_bounds_the_tensors_allocated(layers):
    """collect.pass_memory against the tensors one micro-batch really allocates (tiny
    LLaMA-GQA, eager attention): per-sample gradients and rows exactly, the copies and the
    activations saved for the backward bounded (the activations within 3x: an estimate),
    the Fisher's 24 bytes per parameter of the measured row width."""
    model = tiny_llama(n_layer=3, hidden=64, head_dim=16)
    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    batch = padded_batch(4, 16, 1, "m:s")
    got = _measured_pass(model, layers, batch, "scored")
    rows = sum(layer_bytes(idx, batch["attention_mask"].sum(1).tolist(), "float32", "dense",
                           "float32")[l] for l in layers)
    want = pass_memory(idx, layers, rows, 4, 16)
    assert want["grads"] == got["grads"] and want["cat"] == got["cat"]
    assert want["fisher"] == 24 * got["P"] and want["rows"] == 4 * 4 * got["P"]
    assert got["copies"] <= want["copies"] <= got["copies"] + want["grads"]
    assert got["act"] <= want["act"] <= 3 * got["act"], (got["act"], want["act"])
    base = max(want["act"] + want["grads"], want["grads"] + want["cat"] + want["copies"])
    stored = want["rows"] + 4 * got["P"] + max(base, want["grads"] + want["cat"] + 4 * got["P"])
    assert want["peak"] == max(max(base, want["grads"] + want["cat"] + want["fisher"]), stored,
                               want["rows"] + want["score"])


@pytest.mark.parametrize("layers", [[0, 1, 2], [2]])
def test_pass_memory_of_factored_rows_bounds_the_profiled_peak(layers, tmp_path):
    """collect.pass_memory of a factored store against the peak of every CPU allocation
    while two tasks' Fisher samples and stored samples are collected (layerwise._collect;
    PyTorch's memory profiler timeline): within 25% both ways (tiny LLaMA-GQA: the
    activation term is an estimate, and small fixed allocations weigh more at this size);
    and no dense-row term: the micro-batch's per-sample gradients are one projection's."""
    import json
    import warnings

    from torch.profiler import ProfilerActivity, profile

    from interference.scores.layerwise import _collect

    model = tiny_llama(n_layer=3, hidden=64, head_dim=16)
    cfg = QKOVConfig.from_model(model)
    idx = QKOVIndexer(model, cfg)
    batches = {t: {"fisher": padded_batch(4, 16, s, f"{t}:f"),
                   "scored": padded_batch(4, 16, s + 5, f"{t}:s")}
               for s, t in ((1, "math"), (2, "code"))}
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, layers=layers,
                         micro_batch=4, gradient_format="factored", store_device="cpu",
                         gradient_memory_mb=1e6)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        _collect(fc, model, batches, "mean", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prof.export_memory_timeline(str(tmp_path / "timeline.json"), device="cpu")
    _, sizes = json.loads((tmp_path / "timeline.json").read_text())
    measured = max(sum(s) for s in sizes)
    stored = [int(x) for t in batches for x in batches[t]["scored"]["attention_mask"].sum(1)]
    rows = sum(layer_bytes(idx, stored, "float32", "factored", "float32")[l] for l in layers)
    want = pass_memory(idx, layers, rows, 4, 16, "factored", "float32", n_tasks=2)
    assert 0.75 * want["peak"] <= measured <= 1.25 * want["peak"], (measured, want)
    biggest = max(p.numel() for n, p in model.named_parameters() if "self_attn" in n)
    assert want["grads"] == 4 * 4 * biggest and want["cat"] == want["copies"] == 0
    dense = pass_memory(idx, layers, rows, 4, 16)
    assert dense["grads"] == 4 * 4 * sum(idx.entries[k].numel for k in idx.entries
                                         if k[0] in layers)


def test_planner_fits_the_budget_with_fewest_passes_then_smaller_micro_batches():
    """plan_passes: every pass within the budget; more layers than fit at micro-batch 8
    give one pass at a smaller micro-batch when passes cost more than micro-batches (and
    more passes at 8 when micro-batches are priced higher); a layer that cannot fit is
    refused."""
    model = tiny_llama(n_layer=4, hidden=64, head_dim=16)
    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    per = layer_bytes(idx, [16] * 20, "float32", "dense", "float32")

    def peak(p, m):
        return pass_memory(idx, p, sum(per[l] for l in p), m, 16)["peak"]

    layers = [0, 1, 2, 3]
    by_pass = lambda ps, m: 10.0 * len(ps) + 0.01 * len(ps) * (-(-40 // m))  # noqa: E731
    assert plan_passes(layers, peak, peak(layers, 8), by_pass)["passes"] == [layers]
    budget = (peak(layers, 2) + peak(layers, 4)) / 2          # all 4 fit at 2, not at 4
    plan = plan_passes(layers, peak, budget, by_pass)
    assert (plan["passes"], plan["micro_batch"]) == ([layers], 2)
    by_micro = lambda ps, m: 1.0 * len(ps) + 10.0 * len(ps) * (-(-40 // m))  # noqa: E731
    plan = plan_passes(layers, peak, budget, by_micro)
    assert plan["micro_batch"] == 8 and len(plan["passes"]) > 1
    assert [l for p in plan["passes"] for l in p] == layers
    for p in plan["passes"]:
        assert peak(p, 8) <= budget
    with pytest.raises(ValueError, match="over the memory budget"):
        plan_passes(layers, peak, peak([3], 1) - 1, by_pass)


def test_passes_sum_every_fisher_before_holding_rows(monkeypatch):
    """pass_memory counts no stored row during a Fisher micro-batch: layerwise._collect
    collects every task's Fisher samples first, then the stored roles task by task."""
    from interference.scores import layerwise

    calls = []
    monkeypatch.setattr(layerwise, "collect_role",
                        lambda c, m, b, task, role, *a: calls.append((task, role)))
    batches = {t: {r: {"sample_ids": ["x"]} for r in ("fisher", "scored", "reference")}
               for t in ("math", "code")}
    layerwise._collect(None, None, batches, "mean", 8)
    assert calls == [("math", "fisher"), ("code", "fisher"), ("math", "scored"),
                     ("math", "reference"), ("code", "scored"), ("code", "reference")]


def test_chunk_memory_budget_takes_the_setting_the_device_budget_or_the_cpu_default(monkeypatch):
    """scores.chunks.memory_budget: chunk_memory_mb when set; on CUDA the automatic device
    budget (device.memory_budget_mb 'auto': AUTO_SHARE of what the process can allocate);
    on the CPU gradient_memory_mb, or CPU_PASS_MB when that is 0."""
    from interference import device
    from interference.scores.chunks import CPU_PASS_MB, memory_budget

    monkeypatch.setattr(device, "free_memory_mb", lambda d: 1000.0)
    assert memory_budget(300, 0, "cuda") == 300 * 2**20
    assert memory_budget(None, 0, "cuda:0") == device.AUTO_SHARE * 1000.0 * 2**20
    assert memory_budget(None, 512, "cpu") == 512 * 2**20
    assert memory_budget(None, 0, "cpu") == CPU_PASS_MB * 2**20


@pytest.mark.parametrize("fmt", ["dense", "factored"])
def test_operand_budget_keeps_every_pass_within_the_chunk_budget(fmt):
    """scores.chunks.operand_budget_mb: with the scoring operands within it, every pass of
    a chunk plan stays within the plan's budget (rows + Fisher values + pooled Fisher +
    operands), and it holds at least one (layer, block)'s operands of the largest arm, as
    the planner promised (score_fixed = 4 P (n_tasks + 1) bytes)."""
    from interference.scores.chunks import operand_budget_mb
    from interference.scores.layerwise import plan_chunk

    model = tiny_llama(n_layer=4, hidden=64, head_dim=16)
    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    stored, every, score_rows = [16] * 12, [16] * 20, 8
    def peak(layers, m):
        rows = sum(layer_bytes(idx, stored, "float32", fmt, "float32")[l] for l in layers)
        return pass_memory(idx, layers, rows, m, 16, fmt, "float32", 2, score_rows)["peak"]

    # two layers per pass fit at micro-batch 4; three do not, at any micro-batch
    budget = min(peak([0, 1, 2], 1) - 1, max(peak([0, 1], 4), peak([0, 1], 1)))
    plan = plan_chunk(model, idx, [0, 1, 2, 3], stored, every, [8, 12], "float32", fmt,
                      "float32", budget, "cpu", 1, 4, n_tasks=2, score_rows=score_rows)
    plan["budget_bytes"] = budget
    assert len(plan["passes"]) > 1
    operands = operand_budget_mb(plan) * 2**20
    for p, mem in zip(plan["passes"], plan["memory"]):
        P = sum(idx.entries[(l, b)].numel for l in p for b in "QKVO")
        Pb = max(idx.entries[(l, b)].numel for l in p for b in "QKVO")
        assert mem["score_fixed"] == 4 * P * 3
        assert mem["rows"] + mem["score_fixed"] + operands <= budget
        assert operands >= 4 * score_rows * Pb


def test_the_plan_reserves_every_sets_operands_where_that_costs_no_pass():
    """plan_chunk(score_rows_all=): task A's and every disruptor set's operands of a
    (layer, block) are reserved (so score_arms makes A's rows once and the operand budget
    holds all the sets) when the passes and micro-batch stay those of the largest arm's
    reservation; where they would take one more pass, the largest arm's is kept."""
    from interference.scores.chunks import operand_budget_mb
    from interference.scores.layerwise import plan_chunk

    model = tiny_llama(n_layer=4, hidden=64, head_dim=16)
    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    stored, every, arm, every_set = [2] * 60, [2] * 68, 40, 60     # short: operands dominate
    fmt = "factored"

    def peak(layers, rows):
        size = sum(layer_bytes(idx, stored, "float32", fmt, "float32")[l] for l in layers)
        return pass_memory(idx, layers, size, 8, 2, fmt, "float32", 2, rows)["peak"]

    def plan(budget):
        out = plan_chunk(model, idx, [0, 1, 2, 3], stored, every, [4, 4, 20, 20, 20], "float32", fmt,
                         "float32", budget, "cpu", 1, 8, n_tasks=2, score_rows=arm,
                         score_rows_all=every_set)
        return dict(out, budget_bytes=budget)

    layers = [0, 1, 2, 3]
    assert peak(layers, every_set) > peak(layers, arm)
    wide = plan(peak(layers, every_set))             # one pass either way: every set
    assert wide["passes"] == [layers] and wide["score_rows"] == every_set
    Pb = max(e.numel for e in idx.entries.values())
    assert operand_budget_mb(wide) * 2**20 >= 4 * every_set * Pb
    narrow = plan(peak(layers, every_set) - 1)       # every set would need a second pass
    assert narrow["passes"] == [layers] and narrow["score_rows"] == arm
    assert narrow["memory"][0]["peak"] == peak(layers, arm)


def test_a_layer_over_the_budget_with_whole_operands_is_scored_in_tiles():
    """Where one layer cannot fit with a (layer, block)'s whole operands (LLaMA-2-70B's
    query block over two 80 GB cards), the plan reserves the largest tile of rows that fits
    (halving), says so, and its operand budget holds that tile, which the metric's tiles
    then keep to; where even a row of each task does not fit, the refusal stands."""
    from interference.scores.chunks import operand_budget_mb
    from interference.scores.layerwise import plan_chunk

    model = tiny_llama(n_layer=4, hidden=64, head_dim=16)
    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    stored, every, arm, fmt = [2] * 64, [2] * 72, 64, "factored"   # short: operands dominate

    def peak(layers, rows):
        size = sum(layer_bytes(idx, stored, "float32", fmt, "float32")[l] for l in layers)
        return pass_memory(idx, layers, size, 1, 2, fmt, "float32", 2, rows)["peak"]

    def plan(budget):
        out = plan_chunk(model, idx, [0, 1, 2, 3], stored, every, [4, 4, 32, 32], "float32",
                         fmt, "float32", budget, "cpu", 1, 8, n_tasks=2, score_rows=arm)
        return dict(out, budget_bytes=budget)

    whole = plan(peak([0, 1, 2, 3], arm))
    assert whole["score_rows"] == arm and not whole.get("score_tiles")
    budget = peak([0], 16)                           # a 16-row tile fits, 32 rows do not
    assert peak([0], 32) > budget
    tiled = plan(budget)
    assert tiled["score_tiles"] and tiled["score_rows"] == 16
    Pb = max(e.numel for e in idx.entries.values())
    assert operand_budget_mb(tiled) * 2**20 >= 4 * 16 * Pb
    assert all(m["peak"] <= budget for m in tiled["memory"])
    with pytest.raises(ValueError, match="one layer's pass peaks"):
        plan(peak([0], 2) - 1)


def test_factored_rows_stay_on_the_host_where_that_takes_less_time(monkeypatch):
    """plan_chunk(host_budget_bytes=): with the factored rows of a pass in host memory (the
    device holding one layer's factors while it is scored) the same layers fit in fewer
    passes (the device holding one layer's factors twice while it is scored: B2 on an H100
    peaked 2.8 GiB over a plan that counted them once); such a plan is taken only when its
    estimate, the rows' copies both ways included, is less, keeps each pass's rows within
    the host budget, and leaves the scoring operands room beside the staged layer. A host
    that cannot hold one layer's rows, or dense rows, keep the rows on the device; so do
    copies slow enough to cost more than the passes saved."""
    from interference.gradients import collect
    from interference.gradients.collect import pass_memory as pm
    from interference.scores.chunks import operand_budget_mb
    from interference.scores.layerwise import HOST_PLAN_SHARE, plan_chunk

    model = tiny_llama(n_layer=4, hidden=64, head_dim=16)
    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    stored, every, fmt = [16] * 40, [16] * 48, "factored"       # rows dominate
    per = layer_bytes(idx, stored, "float32", fmt, "float32")

    def plan(budget, host, f=fmt):
        out = plan_chunk(model, idx, [0, 1, 2, 3], stored, every, [4, 4, 20, 20], "float32",
                         f, "float32", budget, "cuda", 1, 8, n_tasks=2, score_rows=20,
                         host_budget_bytes=host)
        return dict(out, budget_bytes=budget)

    budget = pm(idx, [0, 1], per[0] + per[1], 8, 16, fmt, "float32", 2, 20)["peak"]
    on_device = plan(budget, None)
    assert not on_device["rows_on_host"] and on_device["host_rows_bytes"] == 0
    on_host = plan(budget, 10 * sum(per.values()))
    assert on_host["rows_on_host"] and len(on_host["passes"]) < len(on_device["passes"])
    copies = 2 * sum(per.values()) / collect.HOST_COPY_BYTES_S
    n_micro = sum(-(-k // on_host["micro_batch"]) for k in (4, 4, 20, 20))
    passes_s = estimate([pass_flops_per_token(model, idx, p) for p in on_host["passes"]],
                        every, "cuda", "float32", 1, n_micro)
    assert on_host["estimate_s"] == pytest.approx(passes_s + copies, rel=1e-12)
    assert on_host["estimate_s"] <= HOST_PLAN_SHARE * on_device["estimate_s"]
    # copies that leave the host plan less than HOST_PLAN_SHARE's gain: the rows stay on
    # the device (just inside it, the host plan is taken)
    for share, where in ((HOST_PLAN_SHARE * 1.01, False), (HOST_PLAN_SHARE * 0.99, True)):
        slow = share * on_device["estimate_s"] - passes_s          # copies' seconds
        monkeypatch.setattr(collect, "HOST_COPY_BYTES_S", 2 * sum(per.values()) / slow)
        assert plan(budget, 10 * sum(per.values()))["rows_on_host"] is where
    monkeypatch.undo()
    for p, mem in zip(on_host["passes"], on_host["memory"]):
        assert mem["rows"] == 0 and mem["staged"] == 2 * max(per[l] for l in p)
        assert mem["staged"] + mem["score"] <= mem["peak"] <= budget
    staged = pm(idx, [0], 0, 8, 16, fmt, "float32", 2, 20, staged_bytes=10**12)
    assert staged["peak"] == 10**12 + staged["score"]          # the scoring phase holds it
    assert on_host["host_rows_bytes"] == max(sum(per[l] for l in p) for p in on_host["passes"])
    Pb = max(e.numel for e in idx.entries.values())
    room = operand_budget_mb(on_host) * 2**20
    assert room >= 4 * 20 * Pb
    assert all(m["staged"] + m["score_fixed"] + room <= budget for m in on_host["memory"])
    # a host budget of two layers' rows: passes of at most two layers
    two = plan(budget, per[0] + per[1])
    assert all(sum(per[l] for l in p) <= per[0] + per[1] for p in two["passes"])
    assert not plan(budget, min(per.values()) - 1)["rows_on_host"]
    dense = layer_bytes(idx, stored, "float32", "dense", "float32")
    two_dense = pm(idx, [0, 1], dense[0] + dense[1], 8, 16, "dense", "float32", 2, 20)["peak"]
    kept = plan(two_dense, 10 * sum(dense.values()), "dense")
    assert len(kept["passes"]) > 1 and not kept["rows_on_host"]


def test_activation_estimate_counts_one_block_of_logits_where_the_loss_forms_no_more(
        monkeypatch):
    """A causal LM whose logits are its head's (plain_lm_head) holds one block of float32
    logits and an h-wide gradient per token for its loss (objectives.head_token_nll); any
    other holds the [tokens, V] logits and their gradient."""
    from interference.gradients import objectives

    model = tiny_llama()
    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    V, h, m, T = model.config.vocab_size, model.config.hidden_size, 8, 40
    fused = activation_bytes(model, idx.layers, m, T)
    monkeypatch.setattr(objectives, "plain_lm_head", lambda model: None)
    whole = activation_bytes(model, idx.layers, m, T)
    rows = min(m * T, objectives.block_rows(V, cuda=False))
    assert whole - fused == m * T * 2 * V * 4 - (rows * V * 4 + m * T * h * 4)


def test_the_collection_forward_takes_no_cudnn_attention(monkeypatch):
    """The hooks engine runs each micro-batch's forward inside device.attention_backends:
    with CUDA's list (here given to the CPU, which CI has) cuDNN's fused attention, which
    builds a plan per batch shape, is off during the forward and on again after, and the
    per-sample gradients equal those of torch's own choice of kernel."""
    from interference import device
    from interference.gradients import OBJECTIVES
    from interference.gradients.per_sample import PerSampleGradients

    model = tiny_llama(seed=3)
    model.config._attn_implementation = "sdpa"
    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    batch = padded_batch(5, 12, 4, "s")
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(   # once per forward
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))

    def rows():
        eng = PerSampleGradients(model, idx, OBJECTIVES["causal_lm"](), engine="hooks",
                                 micro_batch=2)
        return {g.sample_id: g.vector for g in eng(batch, batch["sample_ids"])}

    plain = rows()
    assert seen and all(seen)                 # the CPU keeps torch's choice
    seen.clear()
    monkeypatch.setitem(device.ATTENTION_BACKENDS, "cpu", device.ATTENTION_BACKENDS["cuda"])
    restricted = rows()
    assert len(seen) == 3 and not any(seen)  # 3 micro-batches, each without cuDNN
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert plain.keys() == restricted.keys()
    assert all(torch.allclose(plain[k], restricted[k], rtol=1e-5, atol=1e-7) for k in plain)


def test_the_b2_bench_measures_the_hosts_speed():
    """benchmarks/bench_b2_workflow.host_speed: a fresh interpreter's import of torch and
    transformers and a fixed Python loop, both timed (reported beside every B2 run)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_b2_workflow
    finally:
        sys.path.pop(0)
    speed = bench_b2_workflow.host_speed()
    assert set(speed) == {"host_import_s", "host_python_s"}
    assert all(0 < v < 120 for v in speed.values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pass_flops_per_token_counts_the_matrix_products_of_a_pass(family):
    """pass_flops_per_token against torch's FLOP counter: a forward and backward with the
    pass's attention weights alone wanting gradients (what a pass computes: autograd's
    weight gradient of them costs what the engine's per-sample gradients do), counting the
    matrix products of the linear layers (mm, addmm; the attention scores' T² products are
    left out, as in the estimate). Autograd also skips the input gradient of the lowest
    layer's Q/K/V projections, which the estimate counts (it takes whole layers): the
    difference is exactly that. Tied (GPT-2) and untied (LLaMA) heads."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_gpt2() if family == "gpt2" else tiny_llama()
    idx = QKOVIndexer(model, QKOVConfig.from_model(model))
    params = dict(model.named_parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    for layers in ([0, 1], [1]):
        want = {n for (l, _), e in idx.entries.items() if l in layers for n in
                (p.name for p in e.parts)}
        for n, p in params.items():
            p.requires_grad_(n in want)
        counter = FlopCounterMode(display=False)
        with counter:
            model(input_ids=ids, labels=ids).loss.backward()
        counts = counter.get_flop_counts()["Global"]
        linear = sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))
        low = min(layers)
        qkv_in = sum(e.numel for (l, b), e in idx.entries.items() if l == low and b in "QKV")
        got = pass_flops_per_token(model, idx, layers)
        assert got == pytest.approx(linear / ids.numel() + 2 * qkv_in, rel=1e-12)
    for p in params.values():
        p.requires_grad_(True)
