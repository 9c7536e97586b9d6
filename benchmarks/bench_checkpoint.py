"""A local checkpoint (``model.source: local``) through prepare_model and a job's load.

    python benchmarks/bench_checkpoint.py /tmp/ckpt --shape qwen2_0_5b            # CPU
    python benchmarks/bench_checkpoint.py /tmp/ckpt --shape llama2_7b --device cuda

Writes a random-weights checkpoint of the shape in bfloat16 safetensors into the folder
(once; reused when there), then, each in a fresh process, measures:

- prepare_model both ways: ``read+copy`` (the weights read in float32 and saved again
  under ``_models/``, what prepare_model did before session 24, still
  ``build_from_config(mcfg)`` + ``save_prepared``) and ``link`` (built from the config on
  the meta device, the safetensors hard-linked: ``build_from_config(mcfg, weights=False)``
  + ``save_prepared(..., weights_from=folder)``); wall time, the process's peak resident
  memory and the disk it took (free space before and after, synced);
- a job's load of the prepared model onto ``--device`` both ways: ``host, then .to``
  (before session 24 on a GPU) and ``straight`` (``load_prepared``: on a GPU the files are
  read onto the card); wall time and peak host memory.

Prints one JSON line per measurement and a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

SHAPES = {   # transformers LlamaConfig / Qwen2Config keyword arguments
    "qwen2_0_5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14,
                                       num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True)),
    "llama2_7b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=32, vocab_size=32000)),
}

MAKE = r"""
import sys, torch, transformers as T
from interference.models import random_model
cls, kwargs, folder, device = sys.argv[1], eval(sys.argv[2]), sys.argv[3], sys.argv[4]
model = random_model(getattr(T, cls)(**kwargs), 0, torch.bfloat16, device)
model.save_pretrained(folder, safe_serialization=True)
"""

CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
from pathlib import Path
import torch
from interference import models
what, folder, out, device = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
mcfg = dict(source="local", path=folder, name="ckpt", kind="causal_lm", dtype="bfloat16",
            attn_implementation="sdpa", trust_remote_code=False, include_bias=False,
            tokenizer={"kind": "bpe", "vocab_size": 512})
def free():
    os.sync()
    st = os.statvfs(out.parent)
    return st.f_bavail * st.f_frsize
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t1, before = time.perf_counter(), free()
if what in ("read+copy", "link"):
    link = what == "link"
    model, tok = models.build_from_config(mcfg, weights=not link)
    info = models.describe(model, tok)
    models.save_prepared(model, tok, out / "hf", weights_from=folder if link else None)
    (out / "model.json").write_text(json.dumps(info))
else:
    if what == "host, then .to":
        model, _ = models.load_folder(out / "hf", mcfg, torch.bfloat16, "cpu")
        model = model.to(device)
    else:
        model, _ = models.load_prepared(out, mcfg, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    assert next(model.parameters()).device.type == torch.device(device).type
seconds = time.perf_counter() - t1
print(json.dumps({"what": what, "device": device, "seconds": round(seconds, 2),
                  "process_s": round(time.perf_counter() - t0, 2),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "rss_after_imports_gib": round(rss0, 2),
                  "disk_gib": round((before - free()) / 2**30, 2)}))
"""


def run(code: str, *args: str) -> str:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stdout[-3000:] + res.stderr[-3000:])
    return res.stdout


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", help="where the checkpoint is written (reused when there)")
    ap.add_argument("--shape", default="qwen2_0_5b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    folder = Path(args.folder) / args.shape
    if not (folder / "config.json").is_file():
        cls, kwargs = SHAPES[args.shape]
        run(MAKE, cls, repr(kwargs), str(folder), args.device)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    rows = []
    for what in ("read+copy", "link"):
        out = Path(args.folder) / f"prepared-{what.replace('+', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        rows.append(json.loads(run(CHILD, what, str(folder), str(out), "cpu").splitlines()[-1]))
    out = Path(args.folder) / "prepared-link"
    for what in ("host, then .to", "straight"):
        rows.append(json.loads(run(CHILD, what, str(folder), str(out),
                                   args.device).splitlines()[-1]))
    for r in rows:
        print(json.dumps(dict(r, shape=args.shape, checkpoint_gib=round(size / 2**30, 2))))
    print(f"\ncheckpoint {args.shape}: {size / 2**30:.2f} GiB of bfloat16 safetensors")
    print("| step | device | seconds | peak host memory (GiB) | disk (GiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['device']} | {r['seconds']} | {r['peak_rss_gib']} | "
              f"{r['disk_gib']} |")


if __name__ == "__main__":
    main()
