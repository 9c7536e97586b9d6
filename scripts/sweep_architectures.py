#!/usr/bin/env python
"""Coverage sweep: every model type of transformers' masked-LM, causal-LM and
image-classification auto mappings, built tiny and offline, detected, proven and compared
with a float64 brute force; the table goes into docs/architectures.md.

For each family: ``tiny_auto_model`` (config class defaults shrunk to 2 layers, width 32,
random weights; nothing is downloaded), ``QKOVConfig.from_model`` (registered adapters,
then the generic discovery), ``prove_layout`` on a float64 copy (every head of the last
layer) and ``heatmap_vs_brute`` (tests/reference_layouts.py: the engine's default heatmap
against per-sample float64 autograd, each sample alone on its real tokens, and explicit
loops, relative error <= 1e-5).

Usage (80 s at load average 3, 5.5 min at load average 8-12, on 2 cores; HF_HUB_OFFLINE=1
is forced):
    python scripts/sweep_architectures.py [--families gptj mpt ...] [--json out.json]
                                          [--doc docs/architectures.md]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"
TOL = 1e-5            # heatmap vs float64 brute force, relative to the largest score
TOL32 = 1e-4          # the same with a float32 brute force (family cannot run in float64)
TOL_ROUNDING = 1e-3   # float32 engine bound when the float64 engine meets TOL
PER_HEAD = ("proven", "proof failed", "forward failed", "engine failed",
            "brute-force mismatch", "several attention stacks", "geometry not read",
            "projections not read")
# families that have per-head q/k/v/o projections which the discovery does not read (so
# they stay in the denominator), checked by reading their attention modules
NOT_READ = {
    "xlnet": "q/k/v/o are raw Parameters [d, H, d_h], not Linear modules",

    "cvt": "projection_query/key/value after a convolution, per-stage heads",
    "hiera": "qkv + proj per stage: hierarchical stages with different heads",
    "levit": "qkv inside a Linear+BatchNorm block, per-stage heads",
}

# why a refused family is out of reach, put before its error in the table
EXPLAINED = {
    "diffllama": "differential attention combines heads h and h + H/2 and V's halves",
    "mra": "multi-resolution approximation: Q's change leaves a short sequence's context",
    "convbert": "head_ratio halves the heads; the span convolution reads every head's query",
    "siglip2": "needs patchified pixels, pixel masks and spatial shapes (image objective)",
    "blt": "global, local and cross-attention stacks of different widths",
    "mobilevit": "the tiny random model's activations vanish through its convolution "
                 "stages (1e-37 at the last): its attention is too flat to prove",
    **{f: "hierarchical stages whose head counts differ (one head count per model)"
       for f in ("swin", "pvt", "pvt_v2", "segformer")},
}


class _Timeout(Exception):
    pass


def _short(err: BaseException, n: int = 160) -> str:
    text = str(err).split("Generic discovery: ")[-1].split(" Register an adapter")[0]
    text = text.split("The head slices were misread")[0]
    return f"{type(err).__name__}: {' '.join(text.split())}"[:n].replace("|", "/")


def _latent(config) -> bool:
    """True for latent (MLA) attention; a per-layer attribute (Gemma 4 style) counts."""
    for key in ("kv_lora_rank", "q_lora_rank"):
        try:
            if getattr(config, key, None):
                return True
        except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError: per layer
            return True
    return False


def check_family(family: str) -> dict:
    """{family, kind, status, layout, observables, err, reason, seconds} of one family."""
    from interference.architectures import QKOVConfig
    from interference.architectures.proof import prove_copy
    from interference.tiny_families import auto_families, tiny_auto_model

    kind = auto_families()[family][0]
    row = {"family": family, "kind": kind, "layout": "", "observables": "", "err": None}
    try:
        model, kind = tiny_auto_model(family)
    except Exception as e:  # noqa: BLE001 - any failure is a refusal with its reason
        return {**row, "status": "config not buildable offline", "reason": _short(e)}
    if _latent(model.config):
        return {**row, "status": "latent attention (MLA)",
                "reason": "keys/values through a shared low-rank latent: no per-head K/V rows"}
    try:
        cfg = QKOVConfig.from_model(model)
    except KeyError as e:
        msg = str(e)
        status = ("several attention stacks" if "attention stacks" in msg or
                  "more than one attention module" in msg else "no per-head attention")
        if status == "no per-head attention" and family in NOT_READ:
            return {**row, "status": "projections not read", "reason": NOT_READ[family]}
        return {**row, "status": status, "reason": _short(e)}
    except Exception as e:  # noqa: BLE001 - e.g. a per-layer head_dim (Gemma 4)
        status = "several attention stacks" if "ambiguous" in str(e) else "geometry not read"
        return {**row, "status": status, "reason": _short(e)}
    row["layout"] = cfg.layout
    try:
        proof = prove_copy(model)
        row["observables"] = proof["observables"] + (
            " (float32)" if proof["dtype"] == "float32" else "") + (
            f" (Q, K x{proof['sharpened']:g})" if proof.get("sharpened") else "")
    except Exception as e:  # noqa: BLE001
        status = ("proof failed" if type(e).__name__ == "LayoutProofError" else
                  "geometry not read" if "implies" in str(e) else "forward failed")
        return {**row, "status": status, "reason": _short(e)}
    return {**row, **_compare(model, kind, proof["dtype"])}


def _compare(model, kind: str, dtype: str) -> dict:
    """{status, err, reason}: the engine's heatmap against the brute force (TOL; TOL32 with
    a float32 reference where the family cannot run in float64). A float32 engine above
    TOL but within TOL_ROUNDING whose float64 copy meets TOL counts as proven, marked
    'float32 rounding' (the slices and the contraction are exact; the float32 forward of
    the tiny random model is not)."""
    import torch
    from interference.architectures.proof import float64_copy
    from reference_layouts import NonFiniteReference, heatmap_vs_brute

    ref = torch.float32 if dtype == "float32" else torch.float64
    try:
        try:
            err = heatmap_vs_brute(model, kind, n_fisher=2, n_scored=2, ref_dtype=ref)
        except NonFiniteReference:
            if ref == torch.float32:
                raise
            ref = torch.float32   # NaN gradients of the float64 code (ProphetNet's masks)
            err = heatmap_vs_brute(model, kind, n_fisher=2, n_scored=2, ref_dtype=ref)
    except Exception as e:  # noqa: BLE001
        return {"status": "engine failed", "err": None, "reason": _short(e)}
    tol = TOL32 if ref == torch.float32 else TOL
    if err <= tol:
        return {"status": "proven", "err": err,
                "reason": f"float32 reference, tolerance {TOL32:g}" if ref != torch.float64
                else ""}
    if ref != torch.float64:
        return {"status": "brute-force mismatch", "err": err,
                "reason": f"relative error {err:.1e} > {TOL32:g} (float32 reference)"}
    try:
        err64 = heatmap_vs_brute(float64_copy(model), kind, n_fisher=2, n_scored=2)
    except Exception as e:  # noqa: BLE001 - the float64 engine cannot run
        return {"status": "brute-force mismatch", "err": err,
                "reason": f"relative error {err:.1e} > {TOL:g}; float64 engine: {_short(e, 80)}"}
    if err64 <= TOL and err <= TOL_ROUNDING:
        return {"status": "proven", "err": err, "reason": f"float32 rounding: float64 engine "
                f"{err64:.1e} <= {TOL:g}, float32 engine {err:.1e} <= {TOL_ROUNDING:g}"}
    leak = _padding_leak(float64_copy(model), kind)
    return {"status": "brute-force mismatch", "err": err,
            "reason": f"relative error {err:.1e} > {TOL:g} (float64 engine: {err64:.1e})"
            + (f"; padding changes the real tokens' logits by {leak:.1e} (relative): the "
               "per-sample gradient depends on how the batch is padded" if leak > TOL else "")}


def _padding_leak(model, kind: str) -> float:
    """Largest relative change of the logits of 6 real tokens when 2 padding tokens
    (attention mask 0) follow them; 0 for image models. Nonzero: the model is not
    padding-invariant (Nyström landmarks, Funnel's pooling)."""
    import torch

    if kind == "image_classification":
        return 0.0
    pad = getattr(model.config, "pad_token_id", None)
    ids = torch.arange(5, 11)[None]
    padded = torch.cat([ids, torch.full((1, 2), pad if isinstance(pad, int) else 0)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 2)], 1).long()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=torch.ones(1, 6).long()).logits[0, :6]
        b = model(input_ids=padded, attention_mask=mask).logits[0, :6]
    return float((a - b).abs().max() / a.abs().max())


def run(families: list[str], limit_s: int = 120) -> list[dict]:
    """check_family for each family, ``limit_s`` seconds at most each."""
    def alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    rows = []
    for family in families:
        t0 = time.perf_counter()
        signal.alarm(limit_s)
        try:
            row = check_family(family)
        except _Timeout:
            row = {"family": family, "status": "forward failed", "layout": "",
                   "observables": "", "err": None, "reason": f"over {limit_s} s"}
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if row["status"] != "proven" and family in EXPLAINED:
            row["reason"] = f"{EXPLAINED[family]}; {row['reason']}"
        rows.append(row)
        print(f"{family:28s} {row['status']:26s} {row['layout']:20s} {row['err']} "
              f"{row['reason'][:90]}", flush=True)
    return rows


def table(rows: list[dict], version: str, seconds: float) -> str:
    """The markdown block between the sweep markers of docs/architectures.md."""
    proven = [r for r in rows if r["status"] == "proven"]
    per_head = [r for r in rows if r["status"] in PER_HEAD]
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [BEGIN, "", f"transformers {version}; {len(rows)} families; sweep time "
             f"{seconds:.0f} s wall on 2 shared cores, load average {os.getloadavg()[1]:.0f} "
             f"(`python scripts/sweep_architectures.py`).", "",
             f"**Proven: {len(proven)} of {len(per_head)} families whose attention has "
             f"per-head q/k/v/o projections ({100 * len(proven) / max(1, len(per_head)):.0f} %)**"
             f"; by status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".",
             "", "Proven: " + ", ".join(f"`{r['family']}`" for r in proven) + ".", "",
             "| family | kind | status | layout | proof observed | heatmap rel. error | reason |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = f"{r['err']:.1e}" if r.get("err") is not None else ""
        lines.append(f"| {r['family']} | {r.get('kind', '')} | {r['status']} | {r['layout']} | "
                     f"{r['observables']} | {err} | {r['reason']} |")
    return "\n".join(lines + ["", END])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="*", help="model types (default: all)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--doc", type=Path, help="rewrite the sweep block of this markdown file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    from interference.results import write_json
    from interference.tiny_families import auto_families

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)   # tiny models: one thread is fastest on a shared machine
    t0 = time.perf_counter()
    rows = run(args.families or list(auto_families()))
    seconds = time.perf_counter() - t0
    if args.json:
        write_json(args.json, {"transformers": transformers.__version__, "seconds": seconds,
                               "rows": rows})
    if args.doc:
        text = args.doc.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{args.doc} has no {BEGIN} ... {END} block")
        head, rest = text.split(BEGIN, 1)
        args.doc.write_text(head + table(rows, transformers.__version__, seconds)
                            + rest.split(END, 1)[1])
    n = sum(r["status"] == "proven" for r in rows)
    print(f"{n} proven of {len(rows)} families in {seconds:.0f} s")


if __name__ == "__main__":
    main()
