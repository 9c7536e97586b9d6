"""The arms of an analysis and the reference disruptors' scores (SPEC 5-6).

Arm ``main``: task A vs task B (:meth:`QKOVInterferenceMetric.compute_heatmap`). Arm
``control``: A vs A' (task A's held-out ``control`` samples in B's place), normalised by the
SAME Fisher as the main arm so the two are comparable. Both arms also score the reference
disruptors R against the same task-A samples with the same normaliser
(:func:`reference_scores`): the statistics compare B (or A') with R.

"Task A equals task B" is decided by samples (ids and texts), never by task names
(:func:`check_disjoint_tasks`).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .._tables import ROLES
from .metric import check_not_shared


def control_ids(collector, task_a: str) -> list[str]:
    """Task A's held-out control samples (A'); an error when there are none."""
    ids = collector.sample_ids(task_a, "control")
    if not ids:
        raise ValueError(f"task {task_a!r} has no control samples; set control.n_control > 0")
    return ids


def arm_disruptors(collector, arm: str, task_a: str, task_b: str) -> tuple[str, list[str]]:
    """(task, sample ids) scored against task A in an arm: B's scored samples ('main') or
    A's control samples ('control')."""
    if arm == "main":
        return task_b, collector.sample_ids(task_b, "scored")
    if arm == "control":
        return task_a, control_ids(collector, task_a)
    raise ValueError(f"arm must be 'main' or 'control', got {arm!r}")


def control_heatmap(metric, task_a: str, task_b: str) -> dict:
    """A vs A' in compute_heatmap's format: task A's scored samples against its control
    samples, normalised as the pair A vs B is (``meta['control_of']`` = task B)."""
    ids_c = control_ids(metric.fisher_collector, task_a)
    heat = metric.heatmap_of(task_a, metric.scored_ids(task_a), task_a, ids_c,
                             list(metric.fisher_collector.layers),
                             list(range(metric.config.num_heads)),
                             metric.fisher_tasks(task_a, task_b))
    heat["meta"]["control_of"] = task_b
    return heat


def arm_heatmap(metric, arm: str, task_a: str, task_b: str) -> dict:
    """The heatmap of one arm: 'main' (A vs B) or 'control' (A vs A')."""
    if arm == "main":
        return metric.compute_heatmap(task_a, task_b)
    if arm == "control":
        return control_heatmap(metric, task_a, task_b)
    raise ValueError(f"arm must be 'main' or 'control', got {arm!r}")


def reference_scores(metric, meta: Mapping, task_r: str, ids_r: list[str]
                     ) -> dict[str, np.ndarray]:
    """Block -> M [n_a, n_r, n_layers, n_heads]: the heatmap's task-A samples against the
    reference disruptors ``ids_r`` of ``task_r``, on the heatmap's layers and heads and with
    its own Fisher normaliser (``meta['fisher_tasks']``, e.g. pooled A+B; the metric's
    default for (task_a, task_r) would be A's alone when task_r == task_a)."""
    if not ids_r:
        raise ValueError(f"no reference samples of task {task_r!r} in the stores")
    fisher_tasks = meta.get("fisher_tasks")
    return metric.pair_scores(meta["task_a"], list(meta["sample_ids_a"]), task_r, list(ids_r),
                              list(meta["layers"]), list(meta["heads"]),
                              fisher_tasks=tuple(fisher_tasks) if fisher_tasks else None)


def score_arms(metric, arms: tuple[str, ...], task_a: str, task_b: str, task_r: str,
               ids_r: list[str]) -> dict[str, tuple[dict, dict[str, np.ndarray] | None]]:
    """Arm -> (heatmap, reference scores or None when ``ids_r`` is empty) of every arm in
    ``arms`` ('main', 'control'), in one pass over the (layer, block)s: task A's scored
    rows are made once and contracted with B's, A''s and R's rows in turn. Each result
    equals :func:`arm_heatmap` and :func:`reference_scores` of that arm, bitwise; the
    reference scores are computed once and shared by the arms (same samples, same
    normaliser)."""
    ids_a = metric.scored_ids(task_a)
    disruptors = {arm: arm_disruptors(metric.fisher_collector, arm, task_a, task_b)
                  for arm in arms}
    if "main" in disruptors:
        check_not_shared(task_a, ids_a, task_b, metric.scored_ids(task_b))
    layers = list(metric.fisher_collector.layers)
    heads = list(range(metric.config.num_heads))
    fisher_tasks = metric.fisher_tasks(task_a, task_b)
    sets = list(disruptors.values()) + ([(task_r, list(ids_r))] if ids_r else [])
    scores = metric.score_sets(task_a, ids_a, sets, layers, heads, fisher_tasks)
    ref = None
    if ids_r:
        ref = {b: x.cpu().double().numpy() for b, x in scores[-1].items()}
    out = {}
    for k, (arm, (task_j, ids_j)) in enumerate(disruptors.items()):
        heat = metric.heatmap_from(scores[k], task_a, ids_a, task_j, ids_j, layers, heads,
                                   fisher_tasks)
        if arm == "control":
            heat["meta"]["control_of"] = task_b
        out[arm] = (heat, ref)
    return out


def arm_results(metric, arms: tuple[str, ...], task_a: str, task_b: str, task_r: str,
                contents: Mapping[str, Mapping[str, str] | None] | None = None
                ) -> dict[str, dict]:
    """:func:`score_arms` on the layers ``metric``'s collector holds, as a chunk keeps them:
    arm -> {'heat', 'ref' (or None), 'ids_r', 'config', 'top_k', 'sq_norms_b' /
    'sq_norms_r' ([n] squared gradient norms of the disruptors / reference samples over
    these layers)}. ``contents`` (task -> {sample id: content digest}): first refuse
    disruptors that are task A's samples (:func:`check_disjoint_tasks`)."""
    collector = metric.fisher_collector
    store = collector.gradient_manager
    ids_r = collector.sample_ids(task_r, "reference")
    disruptors = {arm: arm_disruptors(collector, arm, task_a, task_b) for arm in arms}
    if contents is not None:
        for task_j, ids_j in disruptors.values():
            check_disjoint_tasks(collector, contents, task_a, task_j, ids_j, task_r, ids_r)
    return {arm: {"heat": heat, "ref": ref, "ids_r": ids_r, "config": collector.config,
                  "top_k": metric.top_k, "sq_norms_b": store.grad_norms(*disruptors[arm]) ** 2,
                  "sq_norms_r": store.grad_norms(task_r, ids_r) ** 2}
            for arm, (heat, ref) in score_arms(metric, arms, task_a, task_b, task_r,
                                               ids_r).items()}


def check_disjoint_tasks(collector, content: Mapping[str, Mapping[str, str] | None], a: str,
                         disruptor: str, disruptor_ids: list[str], ref_task: str,
                         ref_ids: list[str]) -> None:
    """B's disruptors (A' for the control) and the reference disruptors must not be samples
    of task A (any role): "task A equals task B" is decided by sample ids and texts
    (``content[task]``: id -> content digest, None where unknown), never by names. A
    held-out split of A shares none, so the negative control passes."""
    a_ids = set(collector.sample_ids(a, "fisher"))
    for role in collector.gradient_manager.roles(a):
        a_ids |= set(collector.sample_ids(a, role))
    for task, ids, what in ((disruptor, disruptor_ids, "disruptors"),
                            (ref_task, ref_ids, "reference disruptors")):
        if task == a:   # the same task: roles are disjoint by id (split_task, collector)
            a_role = {i: r for r in ROLES for i in collector.sample_ids(a, r)}
            clash = [i for i in ids if i in a_role and a_role[i] not in ("control", "reference")]
        else:
            ca, cb = content.get(a), content.get(task)
            clash = [i for i in ids if i in a_ids and (ca is None or cb is None
                                                       or ca.get(i) == cb.get(i))]
        if clash:
            raise ValueError(
                f"the {what} ({task!r}: {len(clash)} of {len(ids)} samples, e.g. {clash[:3]}) are "
                f"also samples of task A ({a!r}) with the same text: task A equals task B here. "
                "The negative control A vs A' is built in (control.enabled); to compare two "
                "variants of a source, make their samples differ")
