#!/usr/bin/env bash
# Sharded gradient collection on ONE machine with several GPUs: the tiny workflow with
# resources.collect.shards=2, each shard job asking for one GPU; Snakemake runs as many
# GPU jobs at once as --resources gpu=N allows and each job takes a GPU of its own (a lock
# per GPU, see qkov_pipeline.stages.gradients.acquire_gpu). Prints, per shard, the device
# it used and when it collected, and whether shards overlapped in time on different GPUs.
#
#   benchmarks/multi_gpu_shards.sh [WORKDIR]          # default: a fresh temporary folder
#   GPUS=4 SHARDS=4 benchmarks/multi_gpu_shards.sh    # other sizes
#   PY=python3 OVERRIDES=", ++tracking.mode=off" SMK_ARGS="--scheduler greedy" \
#       benchmarks/multi_gpu_shards.sh                # a machine without MLflow or PuLP
#
# Needs: the project's .venv with a CUDA build of torch, and >= GPUS visible GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GPUS=${GPUS:-2}
SHARDS=${SHARDS:-2}
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/qkov-multi-gpu.XXXXXX")}
PY=${PY:-$ROOT/.venv/bin/python}
OVERRIDES=${OVERRIDES:-}
SMK_ARGS=${SMK_ARGS:-}
mkdir -p "$WORK"

"$PY" - "$GPUS" <<'PYEOF'
import sys, torch
need = int(sys.argv[1])
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"torch {torch.__version__}: {n} CUDA device(s)", *[torch.cuda.get_device_name(k) for k in range(n)], sep="\n  ")
if n < need:
    sys.exit(f"need {need} visible GPUs, found {n}")
PYEOF

echo "workflow in $WORK"
t0=$(date +%s)
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m snakemake -s "$ROOT/Snakefile" -d "$WORK" \
    --cores "$((2 * GPUS + 2))" --resources gpu="$GPUS" $SMK_ARGS --config experiment=tiny \
    overrides="[++resources.collect.shards=$SHARDS, resources.collect.gpu=1, resources.collect.device=cuda$OVERRIDES]" \
    > "$WORK/snakemake.log" 2>&1 || { tail -n 60 "$WORK/snakemake.log"; exit 1; }
echo "workflow done in $(( $(date +%s) - t0 )) s (log: $WORK/snakemake.log)"

"$PY" - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = []
for store in sorted((work / "results" / "_stores").glob("*/store.json")):
    info = json.loads(store.read_text())
    for s in info.get("shards", []):
        d = s["device_info"]
        rows.append((info["task"], s["index"], s["device"], d.get("gpu"), d.get("name"),
                     d.get("host"), d.get("how"), s["started"], s["finished"], s["n"]))
if not rows:
    sys.exit("no shards found (was resources.collect.shards > 1?)")
t0 = min(r[7] for r in rows)
print(f"\n{'task':6} {'shard':5} {'device':7} {'GPU':4} {'name':24} {'collecting (s after first start)':34} samples")
for task, i, dev, gpu, name, host, how, a, b, n in rows:
    print(f"{task:6} {i:<5} {dev:7} {str(gpu):4} {str(name)[:24]:24} {a - t0:7.1f} .. {b - t0:7.1f}{'':18} {n}")
overlap = [(x, y) for k, x in enumerate(rows) for y in rows[k + 1:]
           if x[7] < y[8] and y[7] < x[8]]
print(f"\nhost {rows[0][5]}; GPUs chosen by: {rows[0][6]}")
for x, y in overlap:
    same = "SAME GPU" if x[2] == y[2] else "different GPUs"
    print(f"  {x[0]} shard {x[1]} ({x[2]}) and {y[0]} shard {y[1]} ({y[2]}) collected at the same time: {same}")
if not overlap:
    print("  no two shards collected at the same time (too few GPU slots?)")
bad = [(x, y) for x, y in overlap if x[2] == y[2]]
sys.exit(1 if bad else 0)
PYEOF
