"""Recompute-by-layer-chunk scoring equals the stored path exactly (same float32 math)."""
import numpy as np
import pytest

from interference.architectures import QKOVConfig
from interference.gradients import FisherCollector
from interference.scores import QKOVInterferenceMetric
from interference.scores.layerwise import layerwise_heatmap

from conftest import padded_batch, tiny_llama


@pytest.mark.parametrize("chunk", [1, 2])
def test_layerwise_equals_stored(chunk):
    model = tiny_llama(n_layer=3)
    batches = {"a": {"fisher": padded_batch(5, 10, 1, "a:f"), "scored": padded_batch(3, 10, 2, "a:s"),
                     "reference": padded_batch(4, 10, 3, "a:r")},
               "b": {"fisher": padded_batch(5, 10, 4, "b:f"), "scored": padded_batch(4, 10, 5, "b:s")}}
    cfg = QKOVConfig.from_model(model)
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg)
    for t, by_role in batches.items():
        for role, b in by_role.items():
            fc.collect_fisher(model, b, task=t, mode="mean", role=role)
    metric = QKOVInterferenceMetric(cfg, fc, ridge_lambda_rel=1e-3)
    want = metric.compute_heatmap("a", "b")
    want_ref = metric.pair_scores("a", want["meta"]["sample_ids_a"], "a", fc.sample_ids("a", "reference"),
                                  fisher_tasks=("a", "b"))
    got, got_ref = layerwise_heatmap(model, batches, "a", "b", layers_per_chunk=chunk,
                                     metric_kwargs={"ridge_lambda_rel": 1e-3}, progress=False)
    for b in "QKVO":
        np.testing.assert_allclose(got[b]["scores"], want[b]["scores"], rtol=1e-6)
        np.testing.assert_allclose(got_ref[b], want_ref[b], rtol=1e-6)
        assert got[b]["top_conflicts"][:5] == want[b]["top_conflicts"][:5]
    assert got["meta"]["layers"] == [0, 1, 2]


@pytest.mark.parametrize("gradient_format,device_memory_mb", [
    ("dense", None), ("factored", None),
    ("factored", 0.15),     # the three sets' rows fit the budget once, not twice
    ("dense", 0.02)])       # they do not: each set alone, Q and O in tiles of one row
def test_both_arms_in_one_pass_equal_each_arm_alone(gradient_format, device_memory_mb):
    """score_arms (task A's rows made once for B, A' and R) gives bitwise the heatmaps and
    reference scores of arm_heatmap and reference_scores called arm by arm; also when a
    small device budget scores the sets one by one or blocks in tiles of rows."""
    from interference.scores.arms import arm_heatmap, reference_scores, score_arms

    model = tiny_llama(n_layer=2)
    batches = {"a": {"fisher": padded_batch(5, 10, 1, "a:f"), "scored": padded_batch(3, 10, 2, "a:s"),
                     "reference": padded_batch(4, 10, 3, "a:r"),
                     "control": padded_batch(2, 10, 6, "a:c")},
               "b": {"fisher": padded_batch(5, 10, 4, "b:f"), "scored": padded_batch(4, 10, 5, "b:s")}}
    cfg = QKOVConfig.from_model(model)
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg,
                         gradient_format=gradient_format)
    for t, by_role in batches.items():
        for role, b in by_role.items():
            fc.collect_fisher(model, b, task=t, mode="mean", role=role)
    metric = QKOVInterferenceMetric(cfg, fc, ridge_lambda_rel=1e-3, device="cpu",
                                    device_memory_mb=device_memory_mb)
    ids_r = fc.sample_ids("a", "reference")
    got = score_arms(metric, ("main", "control"), "a", "b", "a", ids_r)
    assert set(got) == {"main", "control"}
    for arm in ("main", "control"):
        want = arm_heatmap(metric, arm, "a", "b")
        want_ref = reference_scores(metric, want["meta"], "a", ids_r)
        heat, ref = got[arm]
        assert heat["meta"]["sample_ids_b"] == want["meta"]["sample_ids_b"]
        assert heat["meta"].get("control_of") == want["meta"].get("control_of")
        for b in "QKVO":
            assert np.array_equal(heat[b]["scores"], want[b]["scores"])
            assert np.array_equal(ref[b], want_ref[b])
            assert heat[b]["top_conflicts"] == want[b]["top_conflicts"]
    main, _ = score_arms(metric, ("main",), "a", "b", "a", [])["main"]
    assert np.array_equal(main["Q"]["scores"], got["main"][0]["Q"]["scores"])
    with pytest.raises(ValueError, match="arm must be"):
        score_arms(metric, ("both",), "a", "b", "a", ids_r)


def test_score_arms_and_compute_heatmap_refuse_b_sharing_a_scored_samples():
    from interference.scores.arms import score_arms

    model = tiny_llama(n_layer=1)
    cfg = QKOVConfig.from_model(model)
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg)
    fc.collect_fisher(model, padded_batch(4, 8, 1, "a:f"), task="a", mode="mean", role="fisher")
    fc.collect_fisher(model, padded_batch(4, 8, 2, "b:f"), task="b", mode="mean", role="fisher")
    for task in ("a", "b"):       # the same ids (and tokens) scored for both tasks
        fc.collect_fisher(model, padded_batch(2, 8, 3, "x:s"), task=task, mode="mean",
                          role="scored")
    metric = QKOVInterferenceMetric(cfg, fc, device="cpu")
    for call in (lambda: metric.compute_heatmap("a", "b"),
                 lambda: score_arms(metric, ("main",), "a", "b", "a", [])):
        with pytest.raises(ValueError, match="share scored samples"):
            call()


@pytest.mark.parametrize("gradient_format,device_memory_mb", [("factored", None),
                                                              ("factored", 0.15)])
def test_one_pass_frees_a_blocks_rows_before_making_the_next(gradient_format, device_memory_mb,
                                                             monkeypatch):
    """When score_sets makes a (layer, block)'s rows, no row of an earlier (layer, block)
    is alive: the peak is one block's operands, not two (on the H200 a lingering name kept
    the previous block's rows and raised B2's peak by 25 GiB)."""
    import weakref

    from interference.scores.arms import score_arms

    model = tiny_llama(n_layer=2)
    cfg = QKOVConfig.from_model(model)
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg,
                         gradient_format=gradient_format)
    for t, roles in {"a": ("fisher", "scored", "reference", "control"),
                     "b": ("fisher", "scored")}.items():
        for k, role in enumerate(roles):
            fc.collect_fisher(model, padded_batch(3, 10, 10 * len(t) + k, f"{t}:{role}"),
                              task=t, mode="mean", role=role)
    metric = QKOVInterferenceMetric(cfg, fc, device="cpu", device_memory_mb=device_memory_mb)
    alive, stale = [], []
    rows = QKOVInterferenceMetric._rows

    def tracked(self, task, ids, layer, block):
        out = rows(self, task, ids, layer, block)
        stale.extend(key for key, ref in alive if ref() is not None and key != (layer, block))
        alive.append(((layer, block), weakref.ref(out)))
        return out

    monkeypatch.setattr(QKOVInterferenceMetric, "_rows", tracked)
    score_arms(metric, ("main", "control"), "a", "b", "a", fc.sample_ids("a", "reference"))
    assert len(alive) == 2 * 4 * 4          # (A, B, A', R) x 4 blocks x 2 layers, each once
    assert stale == []


def test_arm_results_refuse_disruptors_that_are_task_a_samples_when_contents_are_given():
    """arm_results (the chunk jobs' and the stores' scoring job's per-arm results) runs
    check_disjoint_tasks on every arm when the tasks' content digests are given: B's
    scored samples with task A's ids and texts are refused; without contents it scores."""
    from interference.scores.arms import arm_results

    model = tiny_llama(n_layer=1)
    cfg = QKOVConfig.from_model(model)
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg)
    fc.collect_fisher(model, padded_batch(4, 8, 1, "a:f"), task="a", mode="mean", role="fisher")
    fc.collect_fisher(model, padded_batch(4, 8, 2, "b:f"), task="b", mode="mean", role="fisher")
    fc.collect_fisher(model, padded_batch(2, 8, 3, "a:s"), task="a", mode="mean", role="scored")
    fc.collect_fisher(model, padded_batch(2, 8, 4, "a:r"), task="a", mode="mean", role="reference")
    # B's scored samples carry the ids of A's reference samples
    fc.collect_fisher(model, padded_batch(2, 8, 5, "a:r"), task="b", mode="mean", role="scored")
    metric = QKOVInterferenceMetric(cfg, fc, device="cpu")
    same = {t: {i: "same text" for i in fc.sample_ids("b", "scored")} for t in ("a", "b")}
    with pytest.raises(ValueError, match="task A equals task B"):
        arm_results(metric, ("main",), "a", "b", "a", same)
    got = arm_results(metric, ("main",), "a", "b", "a")["main"]
    assert got["heat"]["Q"]["scores"].shape[:2] == (2, 2) and got["ref"]["Q"].shape[1] == 2
    assert np.allclose(got["sq_norms_b"], fc.gradient_manager.grad_norms("b", fc.sample_ids("b", "scored")) ** 2)


def test_kernels_are_compiled_in_a_thread_beside_the_first_pass_leaving_the_scores_as_they_were(
        monkeypatch):
    """On a device of WARM_UP_DEVICES (the CPU here) score_layers asks, in a thread it joins,
    for the square sum at the micro-batch and the contraction of task A's scored samples
    against every set's size, for each block's head count, with the metric's f, g, backend
    and precision; the scores are bitwise those of a run without it. (That the warm-ups
    compile what the real calls use is checked on a GPU: benchmarks/check_cuda.py.)"""
    import threading

    from interference.scores import contraction, layerwise

    model = tiny_llama(n_layer=2)
    batches = {"a": {"fisher": padded_batch(3, 8, 1, "a:f"), "scored": padded_batch(3, 8, 2, "a:s"),
                     "reference": padded_batch(2, 8, 3, "a:r")},
               "b": {"fisher": padded_batch(3, 8, 4, "b:f"), "scored": padded_batch(4, 8, 5, "b:s")}}
    kwargs = dict(layers_per_chunk=1, metric_kwargs={"ridge_lambda_rel": 1e-3, "backend": "torch"},
                  progress=False, micro_batch=2)
    want, want_ref = layerwise_heatmap(model, batches, "a", "b", **kwargs)
    calls, threads = [], []
    real_background = layerwise.in_background
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(layerwise, "in_background",
                        lambda *a: threads.append(real_background(*a)) or threads[-1])
    monkeypatch.setattr(contraction, "warm_up", lambda *a: calls.append(
        ("contraction", threading.current_thread().name, a[1:])))
    monkeypatch.setattr(layerwise, "warm_up_square_sum", lambda device, m: calls.append(
        ("square_sum", threading.current_thread().name, m)))
    monkeypatch.setattr(layerwise, "WARM_UP_DEVICES", ("cpu",))
    got, got_ref = layerwise_heatmap(model, batches, "a", "b", **kwargs)
    assert calls == [("square_sum", "kernel warm-up", 2),
                     ("contraction", "kernel warm-up",
                      (3, [3, 2, 4], [4, 2, 2, 4], "square", "abs", "torch", "bf16x3"))]
    assert len(threads) == 1 and not threads[0].is_alive()      # one warm-up, joined
    for b in "QKVO":
        np.testing.assert_array_equal(got[b]["scores"], want[b]["scores"])
        np.testing.assert_array_equal(got_ref[b], want_ref[b])
    # Triton's interpreter compiles nothing, and runs one kernel at a time: no warm-up
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert layerwise.warm_up_kernels(model, batches, "a", QKOVConfig.from_model(model),
                                     kwargs["metric_kwargs"], 2) is None


def test_background_work_that_fails_is_logged_not_raised(caplog):
    """interference.device.in_background: an error of work that only saves time later is a
    warning naming the work; the thread ends and nothing is raised in the caller."""
    import torch

    from interference.device import in_background

    def work():
        raise RuntimeError("no compiler")

    with caplog.at_level("WARNING", logger="interference.device"):
        thread = in_background(work, torch.device("cpu"), "kernel warm-up")
        thread.join()
    assert "kernel warm-up failed (RuntimeError: no compiler)" in caplog.text
