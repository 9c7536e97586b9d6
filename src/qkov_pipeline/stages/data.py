"""prepare_data: one task's records, split into disjoint roles, tokenised, saved.

Roles (disjoint by dataset id, seeded by the split seed): fisher, scored, reference (task A
only) and control (task A's A' for the negative control). ``tasks.<t>.pack`` packs short
records into samples of up to ``data.max_length`` tokens; ``tasks.<t>.keep`` says which end
of a longer sample is kept (docs/interpreting.md). With ``data.match_lengths`` every
(task, role) batch of the experiment's tasks is truncated to the same distribution of
loss-token counts (interference.data.match_lengths), so the job prepares the whole group
and saves its own task; it also refuses two tasks that share samples (id and text). The
job builds the model's tokenizer from the model config (stages.tokenizer; its digest goes
in the meta), so the data wait for no other job. Output: ``_data/<task>-<hash>/``
(manifest.json, tensors.safetensors).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch  # noqa: F401 (imported first so the job frame fixes its thread count)

logger = logging.getLogger("qkov.data")


def prepare_group(s: dict, tokenizer) -> dict:
    """task -> (batches by role, records by role, meta), length-matched when asked."""
    from interference.data import match_lengths, prepare_task

    group = s["match_lengths"] or [{"task": s["task"], "spec": s["spec"], "roles": s["roles"]}]
    out = {}
    for entry in group:
        roles, spec, name = entry["roles"], entry["spec"], entry["task"]
        extra = {"control": roles["control"]} if roles.get("control") else None
        try:
            batches, records, meta = prepare_task(
                spec["source"], tokenizer, n_fisher=roles["fisher"],
                n_scored=roles["scored"], n_reference=roles["reference"], seed=s["split_seed"],
                max_length=s["max_length"], loss_tokens=s["loss_tokens"], extra_roles=extra,
                task_kwargs=spec["kwargs"], pack=spec.get("pack", False),
                keep=spec.get("keep", "head"), label=name)
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise ValueError(f"tasks.{name} (source {spec['source']!r}, kwargs {spec['kwargs']}): "
                             f"{err}. Fix tasks.{name} in conf/ or the override that sets it "
                             f"(roles need {roles})") from None
        out[name] = (batches, records, meta)
    for a, b in s.get("compared") or []:
        if a in out and b in out:
            check_distinct_tasks({a: out[a][1], b: out[b][1]})
    if s["match_lengths"]:
        flat = {f"{t}/{r}": b for t, (bs, _, _) in out.items() for r, b in bs.items()}
        matched = match_lengths(flat)
        for t, (bs, recs, meta) in out.items():
            out[t] = ({r: matched[f"{t}/{r}"] for r in bs}, recs,
                      dict(meta, length_matching=[g["task"] for g in group]))
    return out


def check_distinct_tasks(records: dict[str, dict[str, list]]) -> None:
    """Two tasks must not share a sample (same dataset id AND same text): "task A equals task
    B" is decided by the samples, not by the task names (a held-out split of A, the negative
    control, shares none). Raises ValueError naming the tasks and example ids."""
    from interference.data import content_digest

    seen: dict[tuple[str, str], str] = {}
    for task, by_role in records.items():
        shared = []
        for recs in by_role.values():
            for r in recs:
                key = (r["id"], content_digest(r))
                other = seen.get(key)
                if other is not None and other != task:
                    shared.append((other, r["id"]))
                seen.setdefault(key, task)
        if shared:
            n_task = sum(len(v) for v in by_role.values())
            other = shared[0][0]
            raise ValueError(
                f"tasks {other!r} and {task!r} share {len(shared)} of {n_task} samples (same "
                f"dataset id and text, e.g. {[i for _, i in shared[:3]]}): task A equals task B "
                "where it matters. The negative control A vs A' is built in (control.enabled); "
                "to compare two variants of a source, make their samples differ (e.g. another "
                "generation seed in tasks.<name>.kwargs)")


def run(job) -> None:
    from interference.data import save_task_batches

    from .tokenizer import build_tokenizer

    s = job.slice
    task = s["task"]
    with job.timed("tokenizer"):
        tokenizer, info = build_tokenizer(s["model"])
    if info.get("max_positions") and s["max_length"] > info["max_positions"]:
        raise ValueError(f"data.max_length={s['max_length']} exceeds the {info['max_positions']} "
                         f"positions model {s['model']['name']!r} allows "
                         f"(max_position_embeddings); set data.max_length <= "
                         f"{info['max_positions']}")
    if not info.get("has_tokenizer", True):
        raise ValueError(f"model {s['model']['name']!r} ({info['class']}) has no tokenizer: the "
                         "workflow's tasks are text; use a text model or add an image task")
    with job.timed("prepare"):
        prepared = prepare_group(s, tokenizer)
    batches, records, meta = prepared[task]
    meta = dict(meta, task_name=task, split_seed=s["split_seed"], config_hash=job.config_hash,
                tokenizer_digest=info["tokenizer_digest"])
    with job.timed("save"):
        save_task_batches(Path(job.output.manifest).parent, batches, records, meta)
    for role, b in batches.items():
        lengths = np.asarray(b["attention_mask"].sum(1))
        n_loss = np.asarray(b.meta["n_loss_tokens"])
        logger.info("%s/%s: %d samples, tokens mean %.1f (min %d, max %d), loss tokens mean "
                    "%.1f, %d truncated at %d", task, role, len(lengths), lengths.mean(),
                    lengths.min(), lengths.max(), n_loss.mean(), b.meta.get("n_truncated", 0),
                    s["max_length"])
        job.metric(f"data.{role}.n", len(lengths))
        job.metric(f"data.{role}.mean_tokens", lengths.mean())
        job.metric(f"data.{role}.mean_loss_tokens", n_loss.mean())
        job.metric(f"data.{role}.n_truncated", b.meta.get("n_truncated", 0))
        lm = b.meta.get("length_matching")
        if lm:
            job.metric(f"data.{role}.n_shortened", lm["n_shortened"])
            job.metric(f"data.{role}.mean_loss_tokens_before_matching", np.mean(lm["before"]))
    if meta.get("packing"):
        job.metric("data.pack.mean_members", meta["packing"]["mean_members"])
        logger.info("%s: %d source records packed into %d samples of <= %d tokens (%.2f per "
                    "sample)", task, meta["n_source_records"], meta["n_records"],
                    s["max_length"], meta["packing"]["mean_members"])
    job.artifact(job.output.manifest)
