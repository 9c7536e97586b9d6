"""Session 23: what reading Q, K and V's shared input once per layer would save in the
scoring job's rebuild (not done): per set of rows (A, B, A', R) and layer, the time of all
four blocks' rebuilds against one read, pad and float conversion of the q/k/v input x,
which the rebuild now does three times (once each for Q, K and V).

    PYTHONPATH=src python benchmarks/results/default_cpu/probe_shared_input_s23.py RESULTS
"""
import sys, time
from pathlib import Path
from qkov_pipeline.jobs import set_freed_memory
set_freed_memory("keep")
import torch
torch.set_num_threads(2)
from interference.gradients import FisherCollector
import interference.gradients.factored as F
stores = Path(sys.argv[1]) / "_stores"
fc = FisherCollector.from_saved([next(stores.glob("math*/grads")), next(stores.glob("code*/grads"))])
st = fc.gradient_manager
sets = [("math", fc.sample_ids("math","scored")), ("code", fc.sample_ids("code","scored")),
        ("math", fc.sample_ids("math","control")), ("math", fc.sample_ids("math","reference"))]
lay = st.layout
for rep in range(2):
    tx = tall = 0.0
    for layer in range(10, 16):
        for task, ids in sets:
            t0 = time.perf_counter()
            for b in "QKVO":
                st.block(task, ids, layer, b, device="cpu")
            tall += time.perf_counter() - t0
            # the x of the q group, as Q, K and V each read and convert it
            recs = [st._locate(task, s).record(s, lay.keys_for(layer, "Q", st._locate(task, s).T[s]))[1] for s in ids]
            group = [k for k in recs[0] if k[0] == "x"][0]
            t0 = time.perf_counter()
            x = F._padded([r[group] for r in recs], "cpu").float()
            tx += time.perf_counter() - t0
    print(f"6 layers: all blocks of 4 sets {tall:.2f} s; one x read+pad+float per set {tx:.2f} s -> saving 2 of 3: {2*tx:.2f} s ({2*tx/tall:.0%})")
