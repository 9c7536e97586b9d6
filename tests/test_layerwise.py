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
