"""Session 22: the stratified bootstrap with scaled weights (interference.stats.bootstrap,
one pass over B's rows for both of its means) against the former loop (each batch's rows
normalised into a new array, then two weighted means), alternating in one process on the
same cubes; the draws of the two agree to 1e-11 (differences) and 1e-13 (means) relative.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/results/b2_h200/s22/ab_bootstrap.py

Shapes: B2's (100 task-A samples x 100 disruptors per group x 4096 cells, 200 draws) and
the default run's (48 x 48 x 720, 1000 draws).
"""
import json
import time

import numpy as np

from interference.stats.bootstrap import (BATCH_ELEMENTS, BootstrapDraws, bootstrap_weights,
                                          stratified_bootstrap)
from interference.stats.disruption import normalise


def former(cube_b, cube_r, n_bootstrap, seed):
    """The loop before session 22 (share normalisation), kept here for the comparison."""
    n_a, n_b, m = cube_b.shape
    n_r = cube_r.shape[1]
    rng = np.random.default_rng(seed)
    w_i = bootstrap_weights(rng, n_a, n_bootstrap)
    w_b = bootstrap_weights(rng, n_b, n_bootstrap)
    w_r = bootstrap_weights(rng, n_r, n_bootstrap)
    flat_b, flat_r = cube_b.reshape(n_a, n_b * m), cube_r.reshape(n_a, n_r * m)
    batch = int(np.clip(BATCH_ELEMENTS // max((n_b + n_r) * m, 1), 1, 1024))
    diff, avg = np.empty((n_bootstrap, m)), np.empty((n_bootstrap, m))
    for lo in range(0, n_bootstrap, batch):
        d = slice(lo, min(lo + batch, n_bootstrap))
        b = d.stop - d.start
        s_b = (w_i[d] @ flat_b).reshape(b, n_b, m)
        s_r = (w_i[d] @ flat_r).reshape(b, n_r, m)
        mean_b = np.matmul(w_b[d, None, :], normalise(s_b, "share"))[:, 0]
        mean_r = np.matmul(w_r[d, None, :], normalise(s_r, "share"))[:, 0]
        diff[d] = mean_b - mean_r
        avg[d] = np.matmul(w_b[d, None, :], s_b)[:, 0]
    return BootstrapDraws(mean_diff=diff, avg_b=avg)


rng = np.random.default_rng(0)
for name, (n_a, n, m, n_boot) in {"b2": (100, 100, 4096, 200),
                                  "default": (48, 48, 720, 1000)}.items():
    cb, cr = rng.gamma(2.0, 1.0, (n_a, n, m)), rng.gamma(2.0, 1.0, (n_a, n, m))
    times = {"former": [], "now": []}
    for _ in range(3):
        for label, fn in (("former", former), ("now", stratified_bootstrap)):
            t = time.perf_counter()
            out = fn(cb, cr, n_bootstrap=n_boot, seed=1)
            times[label].append(time.perf_counter() - t)
            if label == "former":
                want = out
            else:
                np.testing.assert_allclose(out.mean_diff, want.mean_diff, rtol=1e-11,
                                           atol=1e-11 * np.abs(want.mean_diff).max())
                np.testing.assert_allclose(out.avg_b, want.avg_b, rtol=1e-13)
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({"shape": name, "n_a": n_a, "n": n, "m": m, "draws": n_boot,
                      "former_s": [round(x, 2) for x in times["former"]],
                      "now_s": [round(x, 2) for x in times["now"]],
                      "ratio_best": round(best["former"] / best["now"], 2)}))
