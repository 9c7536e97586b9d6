"""prepare_eval: a task's held-out ``eval`` samples for the validation of the map.

The task's records are split exactly as prepare_data splits them (same seed, sizes and
packing), with one more role, ``eval``, taking the next ``n_eval`` records of the seeded
ranking: so eval samples are disjoint from every other role and the other roles, and the
gradient stores built from them, are those of the run without validation. The job checks
that its other roles equal the data job's (same ids), then saves the eval role only
(truncated at data.max_length; not length-matched: the validation compares losses of one
model before and after a change, sample by sample). Output: ``_eval/<task>-<hash>/``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..jobs import read_json

logger = logging.getLogger("qkov.eval")


def eval_split(d: dict, n_eval: int, tokenizer):
    """(batches, records, meta) by role, as prepare_data splits the task (data slice ``d``)
    plus ``n_eval`` records of role ``eval`` after all the others."""
    from interference.data import prepare_task

    task, spec, roles = d["task"], d["spec"], d["roles"]
    extra = {**({"control": roles["control"]} if roles.get("control") else {}), "eval": n_eval}
    try:
        batches, records, meta = prepare_task(
            spec["source"], tokenizer, n_fisher=roles["fisher"], n_scored=roles["scored"],
            n_reference=roles["reference"], seed=d["split_seed"], max_length=d["max_length"],
            loss_tokens=d["loss_tokens"], extra_roles=extra, task_kwargs=spec["kwargs"],
            pack=spec.get("pack", False), keep=spec.get("keep", "head"), label=task)
    except ValueError as err:
        raise ValueError(f"tasks.{task}: {err}. The validation needs validation.n_eval="
                         f"{n_eval} more samples than the other roles ({roles}): lower "
                         f"validation.n_eval or make the task larger (tasks.{task}.kwargs)"
                         ) from None
    return batches, records, meta


def run(job) -> None:
    from interference.data import save_task_batches

    from .tokenizer import build_tokenizer

    d, n_eval = job.slice["data"], job.slice["n_eval"]
    task = d["task"]
    tokenizer, info = build_tokenizer(d["model"])
    batches, records, meta = eval_split(d, n_eval, tokenizer)
    manifest = read_json(job.input.data)["roles"]
    for role, entry in manifest.items():
        if [r["id"] for r in records.get(role, [])] != entry["sample_ids"]:
            raise ValueError(f"{job.input.data}: role {role!r} differs from this split of "
                             f"task {task!r}; the data were prepared by another version: "
                             f"rerun with --forcerun prepare_data")
    meta = dict(meta, task_name=task, split_seed=d["split_seed"], config_hash=job.config_hash,
                role="eval", tokenizer_digest=info["tokenizer_digest"])
    save_task_batches(Path(job.output.manifest).parent, {"eval": batches["eval"]},
                      {"eval": records["eval"]}, meta)
    n = int(batches["eval"]["attention_mask"].sum(1).float().mean())
    logger.info("%s: %d eval samples (mean %d tokens), disjoint from %s", task,
                len(records["eval"]), n, sorted(manifest))
    job.metric("eval.n", len(records["eval"]))
    job.artifact(job.output.manifest)
