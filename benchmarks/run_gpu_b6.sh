#!/usr/bin/env bash
# Issue 15 engine benchmarks on one GPU: B6 (same work as Kronfluence, both in one
# process), B3 (per-sample gradients vs an ordinary step, bf16 and fp32, with a profile)
# and the CUDA correctness check of the heatmap.
#
#   OUT=some/dir WHEELS=dir/with/wheels bash benchmarks/run_gpu_b6.sh
#
# Needs torch (CUDA), transformers, triton; Kronfluence comes from wheels in $WHEELS
# (no network): kronfluence-1.0.1, einops-0.8.2, einconv-0.1.0, opt_einsum-3.4.0, and
# accelerate if the image lacks it (`pip download kronfluence==1.0.1 einops==0.8.2
# einconv==0.1.0 opt-einsum==3.4.0 accelerate --no-deps -d wheels`). Kronfluence declares
# torchvision but never imports it: installed with --no-deps. No snakemake/hydra/mlflow.
# Output: $OUT/b6.txt (JSON lines + tables), $OUT/b3.jsonl, $OUT/b3_profile.txt,
# $OUT/check_cuda.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-shared/wheels}
export PYTHONPATH=src
if ! python3 -c "import kronfluence" 2>/dev/null; then
  SITE=${SITE:-/tmp/b6-site}
  python3 -m pip install -q --no-deps --no-index --target "$SITE" \
    "$WHEELS"/kronfluence-*.whl "$WHEELS"/einops-*.whl "$WHEELS"/einconv-*.whl \
    "$WHEELS"/opt_einsum-*.whl $(python3 -c "import accelerate" 2>/dev/null || ls "$WHEELS"/accelerate-*.whl)
  export PYTHONPATH="src:$SITE"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
for run in 1 2; do     # two runs: the spread is the noise
  python3 benchmarks/bench_kronfluence.py --device cuda --table 2>&1 | grep -v Warning | tee -a "$OUT/b6.txt"
done
python3 benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 16 --engines hooks | tee -a "$OUT/b3.jsonl"
python3 benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 32 --engines hooks | tee -a "$OUT/b3.jsonl"
python3 benchmarks/bench_gradients.py --device cuda --dtype float32 --n 64 --batch 16 --engines hooks | tee -a "$OUT/b3.jsonl"
python3 benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 32 --batch 16 --engines hooks --profile 25 > "$OUT/b3_profile.txt" 2>&1
python3 benchmarks/check_cuda.py | tee "$OUT/check_cuda.jsonl"
