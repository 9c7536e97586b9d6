#!/usr/bin/env bash
# B2 through the workflow (issue 15): the LLaMA-2-7B shape with random bf16 weights
# (conf/experiment/b2_7b.yaml) end to end on the GPU(s) of one host, and one plain
# forward+backward over the same samples in the same run (benchmarks/bench_b2_workflow.py).
#
#   bash benchmarks/run_gpu_b2.sh                 # one GPU: one chunk job of every layer
#   GPUS=2 bash benchmarks/run_gpu_b2.sh          # two GPUs: two layer chunks side by side
#   EXP=b2_7b OUT=dir WORK=dir bash benchmarks/run_gpu_b2.sh
#   SITE=/path/site-packages bash ...             # snakemake + hydra carried as a folder
#   python benchmarks/bench_b2_workflow.py /tmp/x --dry-plan --gpu-gib 139.8   # plan only
#
# Output: $OUT/b2.jsonl (one JSON line per run) and a table on stdout: workflow wall time,
# model load on the critical path, end to end with the load excluded (bar <= 60 s on one
# H200), plain forward+backward of the same samples, their ratio, per chunk its device,
# passes, load / collect+score seconds and peak GPU memory, the largest job's peak resident
# memory (Snakemake's max_rss) and the results folder's size (no gradient stores).
#
# Needs on the device: torch (CUDA), transformers, triton, numpy, scipy, pandas, pyyaml,
# tokenizers, safetensors, tqdm (the image), plus snakemake 9 and hydra-core 1.3 with their
# dependencies (SITE, or already importable). MLflow is not needed (tracking off) and PuLP's
# solver is not used (greedy scheduler).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GPUS=${GPUS:-1}
EXP=${EXP:-b2_7b}
PY=${PY:-python3}
OUT=${OUT:-benchmarks/out}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/qkov-b2.XXXXXX")}
OVERRIDES=${OVERRIDES:-++tracking.mode=off}
# one chunk job per GPU (b2_7b.yaml: layer_chunks 1, no stores)
[ "$GPUS" -gt 1 ] && OVERRIDES="$OVERRIDES,++resources.collect.layer_chunks=$GPUS"
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$ROOT/src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# growable CUDA segments (as the chunk jobs set them): fewer "reserved but unallocated" GiB
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# byte-compile, once, what was installed without byte-code (a --no-compile install, as the
# device recipe carries wheels; uv's default, as the device image installed torch) and the
# project, as an ordinary pip install does: else every job of the workflow compiles its
# imports again where the environment sets PYTHONDONTWRITEBYTECODE (the device image: 4-5 s
# of compiling torch in each job; RESULTS.md, B2 session 16). Up-to-date files are skipped.
PURELIB=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ -w "$PURELIB" ] || PURELIB=
"$PY" -m compileall -q -j 0 ${SITE:+"$SITE"} ${PURELIB:+"$PURELIB"} src > /dev/null || true
"$PY" -c "import snakemake, hydra, torch; print('snakemake', snakemake.__version__, '| torch', torch.__version__, '|', torch.cuda.device_count(), 'GPU(s)', torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 2>/dev/null \
      | awk '{printf "%.1f", $1 / 1024}' || true)
"$PY" benchmarks/bench_b2_workflow.py "$WORK" --experiment "$EXP" --overrides "$OVERRIDES" \
    --dry-plan ${GIB:+--gpu-gib "$GIB"}
"$PY" benchmarks/bench_b2_workflow.py "$WORK" --experiment "$EXP" --gpus "$GPUS" \
    --overrides "$OVERRIDES" --smk-args "--scheduler greedy" | tee -a "$OUT/b2.jsonl"
echo "workdir: $WORK (snakemake.log, results/logs/chunk_scores/...)"
