"""What lower-precision factored stores (``fisher.store_dtype`` bfloat16 / float16) do to the
default run's results, against float32 stores of the same samples (issue 15, item 4).

Takes the float32 factored stores that ``bench_default_run.py --work DIR`` saved (task ``a``:
Fisher, scored, reference, control; task ``b``: Fisher, scored) and writes each lower
dtype's copy: every record's x and δ rounded to the dtype, exactly what a collection with
that ``store_dtype`` keeps (it casts the same float32 factors; Fisher and norms come from
the float32 gradients in both). Then, per dtype and arm (main A vs B, control A vs A'),
the workflow's scores (heatmap and reference scores, default metric settings) and
statistics (``QKOVStatistics`` with conf/stats/default.yaml), compared with float32's:

- ``max_rel_score``: max |M_dtype - M_32| / max |M_32| over the pairs and cells of each
  block (scores and reference scores), the largest over blocks;
- ``spearman_statistic``: Spearman correlation of the cells' test statistic;
- ``significant``: cells significant in float32, in the dtype, and in one of them only.

Also the stores' bytes. One JSON line.

    python benchmarks/bench_default_run.py --threads 2 --layers 4 --work /tmp/w
    python benchmarks/bench_store_dtype.py --work /tmp/w --threads 2
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

BLOCKS = ("Q", "K", "V", "O")
CONF = Path(__file__).resolve().parent.parent / "conf"


def convert(src: Path, dst: Path, dtype: str) -> int:
    """A copy of the saved factored store ``src`` at ``dst`` with x and δ (and dense-kept
    gradients) rounded to ``dtype``; returns its records' bytes."""
    from interference.gradients.factored import FactorLayout

    index = json.loads((src / "index.json").read_text())
    old = FactorLayout.from_dict(index["factor_layout"])
    new = FactorLayout.from_dict(dict(index["factor_layout"], factor_dtype=dtype,
                                      store_dtype=dtype))
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    total = 0
    for key, info in index["shards"].items():
        name = key.replace("|", "__") + ".bin"
        offsets, pos = [], 0
        with open(dst / name, "wb") as fh:
            for r, T in enumerate(info["T"]):
                rec = old.read(src / info["files"][info["file_of"][r]], info["offsets"][r], T)
                rec = {k: v.to(new.fdt if k[0] != "grad" else new.sdt) for k, v in rec.items()}
                offsets.append(pos)
                pos += new.write(fh, rec, T)
        info.update(offsets=offsets, files=[name], file_of=[0] * len(offsets))
        total += pos
    index.update(store_dtype=dtype, factor_layout=new.to_dict())
    (dst / "index.json").write_text(json.dumps(index))
    shutil.copyfile(src / "fisher.safetensors", dst / "fisher.safetensors")
    return total


def analyse(dirs: list[Path]) -> dict:
    """arm -> {'scores': block -> M, 'ref': block -> M, 'cells': DataFrame} of the stores."""
    from interference.gradients import FisherCollector
    from interference.scores import QKOVInterferenceMetric
    from interference.scores.arms import arm_heatmap, reference_scores
    from interference.stats import QKOVStatistics

    metric_cfg = yaml.safe_load((CONF / "metric" / "default.yaml").read_text())
    stats_cfg = yaml.safe_load((CONF / "stats" / "default.yaml").read_text())
    stats_cfg.pop("reference", None)
    fc = FisherCollector.from_saved(dirs)
    metric = QKOVInterferenceMetric(fc.config, fc, device="cpu", **metric_cfg)
    ids_r = fc.sample_ids("a", "reference")
    out = {}
    for arm in ("main", "control"):
        heat = arm_heatmap(metric, arm, "a", "b")
        meta = heat["meta"]
        ref = reference_scores(metric, meta, "a", ids_r)
        res = QKOVStatistics(progress=False, **stats_cfg).test_scores(
            {blk: heat[blk]["scores"] for blk in BLOCKS}, ref, meta["layers"], meta["heads"],
            meta["kv_head_of"], variant=meta["variant"],
            ids_b=[(meta["task_b"], i) for i in meta["sample_ids_b"]],
            ids_r=[("a", i) for i in ids_r], ids_a=[("a", i) for i in meta["sample_ids_a"]])
        out[arm] = {"scores": {b: np.asarray(heat[b]["scores"]) for b in BLOCKS},
                    "ref": {b: np.asarray(ref[b]) for b in BLOCKS}, "cells": res["cells"]}
    return out


def compare(base: dict, other: dict) -> dict:
    """The agreement of ``other``'s results with ``base``'s (float32), per arm."""
    from scipy.stats import spearmanr

    out = {}
    for arm, b in base.items():
        o = other[arm]
        rel = max(float(np.abs(o[k][blk] - b[k][blk]).max() / np.abs(b[k][blk]).max())
                  for k in ("scores", "ref") for blk in BLOCKS)
        cb, co = b["cells"], o["cells"]
        assert list(cb["name"]) == list(co["name"])
        sb, so = cb["significant"].to_numpy(bool), co["significant"].to_numpy(bool)
        out[arm] = {"max_rel_score": rel,
                    "spearman_statistic": float(spearmanr(cb["statistic"], co["statistic"])[0]),
                    "max_abs_diff_q": float(np.abs(cb["q_value"] - co["q_value"]).max()),
                    "n_cells": int(len(cb)),
                    "significant": {"float32": int(sb.sum()), "dtype": int(so.sum()),
                                    "changed": int((sb != so).sum())}}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="bench_default_run.py --work folder")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    base_dirs = [work / "a", work / "b"]
    t = time.perf_counter()
    base = analyse(base_dirs)
    res = {"benchmark": "store dtype agreement (default run's scores and statistics)",
           "work": str(work), "bytes": {"float32": sum(
               f.stat().st_size for d in base_dirs for f in d.glob("*.bin"))},
           "seconds_float32": time.perf_counter() - t, "agreement": {}}
    for dtype in a.dtypes.split(","):
        dirs = [work / f"{d.name}.{dtype}" for d in base_dirs]
        res["bytes"][dtype] = sum(convert(s, d, dtype) for s, d in zip(base_dirs, dirs))
        res["agreement"][dtype] = compare(base, analyse(dirs))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
