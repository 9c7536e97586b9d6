"""Both arms and the reference scores in one pass, against arm by arm, on saved stores.

The workflow's scoring from the gradient stores (rule ``chunk_scores`` with
``layer_chunks`` = 1) calls ``score_arms``: task A's scored rows of each (layer, block) are
made once (rebuilt from a factored store) and contracted with B's, A''s and R's rows. Before,
two ``scores`` jobs (main, control) each scored A vs B (or A') and then A vs R, making A's
rows four times and R's twice. This script times, in one process on the same stores:

- ``arm_by_arm``: ``arm_heatmap`` + ``reference_scores`` for main, then for control (the
  former two jobs' work, without their process start and file writes);
- ``one_pass``: ``score_arms(main, control)``;
- ``rows_floor``: only making each set's rows of every (layer, block) once (A, B, A', R),
  no contraction: what any pass that needs them all costs at least.

and checks that both ways give bitwise the same scores. Prints one JSON line.

    python benchmarks/bench_score_arms.py --stores results/_stores/math-*/grads \\
        results/_stores/code-*/grads --task-a math --task-b code --threads 2 \\
        [--freed-memory keep|return|glibc]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stores", nargs="+", required=True, help="the tasks' grads/ folders")
    p.add_argument("--task-a", required=True)
    p.add_argument("--task-b", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="timings per way (the least kept)")
    p.add_argument("--freed-memory", default="keep", choices=("keep", "return", "glibc"),
                   help="the C heap's policy for freed blocks (qkov_pipeline.jobs."
                        "set_freed_memory): keep, as the workflow's scoring jobs since "
                        "session 19; return, as before; glibc: its default")
    args = p.parse_args(argv)
    if args.freed_memory != "glibc":
        from qkov_pipeline.jobs import set_freed_memory
        set_freed_memory(args.freed_memory)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from interference._tables import BLOCKS
    from interference.gradients import FisherCollector
    from interference.scores import QKOVInterferenceMetric
    from interference.scores.arms import arm_heatmap, reference_scores, score_arms

    fc = FisherCollector.from_saved([Path(s) for s in args.stores])
    metric = QKOVInterferenceMetric(fc.config, fc, device="cpu")
    a, b = args.task_a, args.task_b
    ids_r = fc.sample_ids(a, "reference")

    def arm_by_arm():
        out = {}
        for arm in ("main", "control"):
            heat = arm_heatmap(metric, arm, a, b)
            out[arm] = (heat, reference_scores(metric, heat["meta"], a, ids_r))
        return out

    def one_pass():
        return score_arms(metric, ("main", "control"), a, b, a, ids_r)

    def rows_floor():
        sets = [(a, metric.scored_ids(a)), (b, metric.scored_ids(b)),
                (a, fc.sample_ids(a, "control")), (a, ids_r)]
        for block in BLOCKS:
            for layer in fc.layers:
                for task, ids in sets:
                    metric._rows(task, ids, layer, block)

    seconds, results = {}, {}
    for name, fn in (("rows_floor", rows_floor), ("one_pass", one_pass),
                     ("arm_by_arm", arm_by_arm)):
        best = None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            results[name] = fn()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        seconds[name] = best
    same = all(np.array_equal(results["one_pass"][arm][0][blk]["scores"],
                              results["arm_by_arm"][arm][0][blk]["scores"]) and
               np.array_equal(results["one_pass"][arm][1][blk],
                              results["arm_by_arm"][arm][1][blk])
               for arm in ("main", "control") for blk in BLOCKS)
    row = {"benchmark": "score_arms", "threads": args.threads,
           "freed_memory": args.freed_memory,
           "layers": len(fc.layers), "n_a": len(metric.scored_ids(a)),
           "n_b": len(metric.scored_ids(b)), "n_control": len(fc.sample_ids(a, "control")),
           "n_reference": len(ids_r), "gradient_format": fc.gradient_manager.gradient_format,
           **{f"{k}_s": round(v, 2) for k, v in seconds.items()},
           "arm_by_arm_over_one_pass": round(seconds["arm_by_arm"] / seconds["one_pass"], 2),
           "one_pass_over_rows_floor": round(seconds["one_pass"] / seconds["rows_floor"], 2),
           "bitwise_equal": bool(same), "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__}
    print(json.dumps(row))
    if not same:
        raise SystemExit("score_arms differs from the arms one by one")
    return row


if __name__ == "__main__":
    main()
