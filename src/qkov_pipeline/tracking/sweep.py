"""MLflow runs of an ablation sweep (rule draw_ablation_summary)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .settings import TrackingSettings
from .store import _client, _finite, _retry, bounded, experiment_id


def experiment_run(doc: dict, variant: str, results: Path, settings: TrackingSettings) -> str | None:
    """The variant's MLflow parent run that holds its job runs: the one its tracking.json
    names when that is newer than its cells tables (nothing reran since), else this
    invocation's (its jobs run now)."""
    current = settings.parents.get(variant)
    tracking_json = results / variant / "tracking.json"
    cells = [Path(a["variants"][variant]["cells_csv"]) for a in doc["analyses"].values()
             if variant in a["variants"]]
    try:
        if tracking_json.is_file() and all(tracking_json.stat().st_mtime >= c.stat().st_mtime
                                           for c in cells):
            return json.loads(tracking_json.read_text()).get("parent_run_id") or current
    except (OSError, ValueError):
        pass
    return current


def log_sweep(doc: dict, out: Path, settings: TrackingSettings, lock_path: Path) -> dict:
    """MLflow: experiment ``<prefix>/ablations``, one parent run per sweep (its figures and
    tables as artifacts) and one child run per variant: params ``variant`` and the ablated
    settings (``ablation.<key>``), metrics per analysis (significant cells per block,
    Spearman and Jaccard against the baseline). Select the children and Compare."""
    from filelock import FileLock
    from mlflow.entities import Metric, Param

    from interference._tables import BLOCKS
    from interference.settings import param_value

    uri, prefix = settings.uri, settings.prefix
    name = f"{prefix}/ablations"
    tags = {"qkov.sweep": doc["sweep"], "qkov.workflow_run_id": str(settings.workflow_run_id),
            "qkov.git_commit": settings.git_commit}
    with FileLock(str(lock_path)):
        client = _client(uri)
        eid = experiment_id(client, name, settings.artifacts)
        parent = _retry(lambda: client.create_run(
            eid, run_name=f"sweep {doc['sweep']}",
            tags={**tags, "qkov.kind": "ablation_sweep", "qkov.baseline": doc["baseline"],
                  "qkov.variants": ",".join(doc["variants"])[:5000]}), what="create sweep run")
        pid = parent.info.run_id
        ts = int(time.time() * 1000)
        keys = sorted(set().union(*(set(a) for a in doc["ablated"].values())))
        client.log_batch(pid, params=[Param("variants", ",".join(doc["variants"])[:6000]),
                                      Param("baseline", doc["baseline"]),
                                      Param("ablated_keys", ",".join(keys)[:6000] or "none")],
                         metrics=[Metric(f"{pair}.spearman_{k}", a[f"spearman_{k}"], ts, 0)
                                  for pair, a in doc["analyses"].items() for k in ("min", "mean")
                                  if a[f"spearman_{k}"] is not None])
        for p in sorted(out.rglob("*")):
            if p.is_file() and p.suffix in (".png", ".pdf", ".csv", ".md", ".json") \
                    and not p.name.startswith(("mlflow.", "config.")):
                _retry(lambda: client.log_artifact(pid, str(p), str(p.parent.relative_to(out))
                                                   if p.parent != out else None),
                       what=f"log artifact {p.name}")
        children = {}
        for v in doc["variants"]:
            ctags = {**tags, "qkov.kind": "ablation_variant", "qkov.experiment": v,
                     "mlflow.parentRunId": pid}
            link = experiment_run(doc, v, out.parents[1], settings)
            if link:
                ctags["qkov.experiment_run_id"] = link
            run = _retry(lambda: client.create_run(eid, run_name=v, tags=ctags),
                         what="create variant run")
            rid = run.info.run_id
            params = [Param("variant", v), Param("baseline", doc["baseline"])]
            params += [Param(f"ablation.{k}"[:250], param_value(doc["ablated"][v].get(k))[:6000])
                       for k in keys]
            metrics = []
            for pair, a in doc["analyses"].items():
                r = a["variants"].get(v)
                if r is None:
                    continue
                vals = {"n_significant": r["n_significant"], "n_q_significant": r["n_q_significant"],
                        "spearman_vs_baseline": r["spearman_vs_baseline"],
                        "jaccard_vs_baseline": r["jaccard_vs_baseline"],
                        **{f"{b}.n_significant": r["n_significant_by_block"][b] for b in BLOCKS}}
                metrics += [Metric(f"{pair}.{k}", float(x), ts, 0) for k, x in vals.items()
                            if x is not None and _finite(x)]
            client.log_batch(rid, params=params, metrics=metrics)
            client.set_terminated(rid, "FINISHED")
            children[v] = rid
        client.set_terminated(pid, "FINISHED")
    return {"experiment": name, "parent_run_id": pid, "variant_run_ids": children}


def record_sweep(doc: dict, out: Path, settings: TrackingSettings, lock_path: Path) -> dict:
    """Log a sweep (:func:`log_sweep`, bounded by the settings' timeout, at least 60 s) unless
    tracking is off; the record of what happened: status off / logged / error, the run ids
    or the error, and the seconds it took."""
    t0 = time.time()
    record = {"sweep": doc["sweep"], "mode": settings.mode, "uri": settings.uri,
              "status": "off", "time_s": None}
    if settings.mode != "off" and settings.uri:
        logged, err = bounded(lambda: log_sweep(doc, out, settings, lock_path),
                              max(settings.timeout_s, 60), "mlflow-ablation")
        record.update(status="logged", **logged) if err is None else \
            record.update(status="error", error=err)
    record["time_s"] = time.time() - t0
    return record
