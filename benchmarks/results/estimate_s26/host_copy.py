"""The rate at which a chunk plan with its factored rows on the host moves them
(collect.HOST_COPY_BYTES_S): B2's one run with its rows on the host (one H100, session 25,
`chunk_memory_mb=30000`: 6 passes, 87.9 s of collect and score) against the estimate of its
passes alone; the difference over the rows moved twice (to the host as collected, back to
the card as scored). Tokens recovered exactly from the run's old estimate (calibrate.py);
stored tokens taken in proportion to the stored samples; factored rows are linear in tokens.

    PYTHONPATH=src python benchmarks/results/estimate_s26/host_copy.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from calibrate import ROOT, b2_tokens, experiment  # noqa: E402

from interference.gradients.collect import (estimate, layer_bytes,  # noqa: E402
                                            pass_flops_per_token, stored_format)
from qkov_pipeline import plan as qp  # noqa: E402

cfg, model, idx = experiment("b2_7b")
n = sum(p.numel() for p in model.parameters())
roles = {t: qp._roles_of(cfg, t) for t in qp.pair_tasks(cfg)}
sizes = [k for r in roles.values() for k in r.values() if k]
stored_n = sum(k for r in roles.values() for role, k in r.items() if role != "fisher" and k)
run = ROOT / "benchmarks/results/placement/rows_on_host_h100_s25/b2_rows_on_host.jsonl"
c = json.loads(run.read_text().splitlines()[0])["chunks"][0]
tokens, n_micro = b2_tokens(c, n, sizes)
stored_tokens = tokens * stored_n / sum(sizes)
fmt = stored_format(model, cfg["resources"]["collect"].get("gradient_format", "auto"))
per_1000 = layer_bytes(idx, [1000], cfg["fisher"]["store_dtype"], fmt, cfg["model"]["dtype"])
rows = sum(per_1000.values()) / 1000 * stored_tokens
passes_s = estimate([pass_flops_per_token(model, idx, p) for p in c["passes"]], [tokens],
                    "cuda:0", "bfloat16", 1, n_micro)
extra = c["seconds_collect_and_score"] - passes_s
print(f"tokens {tokens:.0f} (stored {stored_tokens:.0f}), {fmt} rows {rows / 2**30:.1f} GiB; "
      f"passes estimated {passes_s:.1f} s, measured {c['seconds_collect_and_score']:.1f} s: "
      f"{extra:.1f} s more, {2 * rows / extra / 1e9:.1f} GB/s for the rows moved twice")
