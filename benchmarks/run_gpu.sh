#!/usr/bin/env bash
# GPU benchmark set (one H100/H200): CUDA correctness, B1 scoring, B3 per-sample gradients.
# Usage: OUT=some/dir bash benchmarks/run_gpu.sh   (results as JSON lines in $OUT/gpu.jsonl)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 benchmarks/check_cuda.py | tee -a "$OUT/gpu.jsonl"
python3 benchmarks/bench_scoring.py --device cuda --n 100 --baseline-pairs 1 | tee -a "$OUT/gpu.jsonl"
python3 benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 16 --engines hooks | tee -a "$OUT/gpu.jsonl"
python3 benchmarks/bench_gradients.py --device cuda --dtype float32 --n 64 --batch 16 --engines hooks | tee -a "$OUT/gpu.jsonl"
if [ -f benchmarks/bench_stats.py ]; then python3 benchmarks/bench_stats.py | tee -a "$OUT/gpu.jsonl"; fi
if [ "${B2:-}" = "rehearsal" ]; then python3 benchmarks/bench_7b.py --layers 4 | tee -a "$OUT/gpu.jsonl"; fi
if [ "${B2:-}" = "full" ]; then python3 benchmarks/bench_7b.py | tee -a "$OUT/gpu.jsonl"; fi
