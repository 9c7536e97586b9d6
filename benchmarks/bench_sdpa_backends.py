"""Plain forward+backward of the B2 shape under each fused attention backend of
``torch.nn.functional.scaled_dot_product_attention`` (torch's own choice, flash, memory-
efficient, cuDNN): which one the engine's passes should ask for on this card.

    python benchmarks/bench_sdpa_backends.py [--n 364] [--tokens 256] [--min-tokens 62]

The LLaMA-2-7B shape with random bfloat16 weights (conf/model/llama2_7b.yaml) on cuda:0,
only the attention projections trainable (as the engine's passes and bench_b2_workflow's
plain pass), ``--n`` samples of random tokens in micro-batches of 8; with ``--min-tokens``
the lengths vary uniformly in [min-tokens, tokens] and each micro-batch is cut to its
longest sample (as the engine pads), so the kernels see many shapes. One warm-up
micro-batch per backend, then the timed pass; one JSON line per backend.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    import torch
    import yaml
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_b2_workflow import attention_trainable, timed_passes
    from interference.models import DTYPES, random_config, random_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=364)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--min-tokens", type=int, default=0)
    args = ap.parse_args(argv)
    mcfg = yaml.safe_load((ROOT / "conf" / "model" / "llama2_7b.yaml").read_text())
    model = random_model(random_config(mcfg), mcfg["seed"], DTYPES[mcfg["dtype"]], "cuda:0")
    attention_trainable(model)
    gen = torch.Generator().manual_seed(0)
    lengths = (torch.randint(args.min_tokens, args.tokens + 1, (args.n,), generator=gen)
               if args.min_tokens else torch.full((args.n,), args.tokens))
    ids = torch.randint(1, 512, (args.n, args.tokens), generator=gen)
    batches = [{"input_ids": x, "labels": x} for x in
               (ids[k:k + 8, :int(lengths[k:k + 8].max())].cuda() for k in range(0, args.n, 8))]

    backends = {"torch's choice": None, "flash": [SDPBackend.FLASH_ATTENTION],
                "efficient": [SDPBackend.EFFICIENT_ATTENTION],
                "cudnn": [SDPBackend.CUDNN_ATTENTION]}
    for label, chosen in backends.items():
        ctx = sdpa_kernel(chosen) if chosen else None
        if ctx:
            ctx.__enter__()
        try:
            seconds, err = timed_passes(model, batches), None
        except RuntimeError as e:      # a backend that cannot take these inputs
            seconds, err = None, str(e).splitlines()[0][:200]
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
        model.zero_grad(set_to_none=True)
        print(json.dumps({"backend": label, "seconds": seconds, "error": err, "n": args.n,
                          "tokens": args.tokens, "min_tokens": args.min_tokens,
                          "distinct_lengths": len({b["input_ids"].shape[1] for b in batches}),
                          "device": torch.cuda.get_device_name(0), "torch": torch.__version__}),
              flush=True)


if __name__ == "__main__":
    main()
