#!/bin/bash
# Session 29: B6 (same work as Kronfluence) and B3 (three engines) with session 28's code, check_cuda, and
# dense rows into a host store with the read lag on and off. On the GPU machine:
#   OUT=dir WHEELS=dir-with-kronfluence-wheels bash benchmarks/results/b6_h100_s29/run.sh
set -u
exec > $OUT/log.txt 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
SITE=/tmp/b6-site
python3 -c "import accelerate" 2>/dev/null && ACC= || ACC=$(ls ${WHEELS:-.whl6}/accelerate-*.whl)
python3 -m pip install -q --no-deps --no-index --target $SITE ${WHEELS:-.whl6}/kronfluence-*.whl ${WHEELS:-.whl6}/einops-*.whl ${WHEELS:-.whl6}/einconv-*.whl ${WHEELS:-.whl6}/opt_einsum-*.whl $ACC
export PYTHONPATH="src:$SITE"
for r in 1 2; do
  echo "== B6 run $r $(date -u +%T)"
  timeout 200 python3 benchmarks/bench_kronfluence.py --device cuda --table 2>&1 | grep -vE "Warning|return self|scaler ="
done
echo "== B3 $(date -u +%T)"
PYTHONPATH=src timeout 200 python3 benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 16 --repeat 9 --engines hooks,factored,fisher 2>&1 | grep -v loss_type
echo "== check_cuda $(date -u +%T)"
PYTHONPATH=src timeout 120 python3 benchmarks/check_cuda.py 2>&1 | tail -20
echo "== end $(date -u +%T)"
echo "== dense rows into a host store, lag on/off $(date -u +%T)"
PYTHONPATH=src timeout 200 python3 benchmarks/results/b6_h100_s29/dense_host_lag.py 2>&1 | tail -6
echo "== end2 $(date -u +%T)"
