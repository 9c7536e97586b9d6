#!/usr/bin/env bash
# Session 21, call 1: the current code (d58c155) on one H200: B2 through the workflow, B6,
# B3 in bf16 (interleaved rounds), the CUDA checks. Wheels carried in .whl (snakemake,
# hydra, kronfluence, ...).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1 || { tail $OUT/pip.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/card.txt
nproc; grep -m1 "model name" /proc/cpuinfo
mkdir -p $OUT/b2
SITE=/tmp/site OUT=$OUT/b2 WORK=/tmp/w timeout 220 bash benchmarks/run_gpu_b2.sh > $OUT/b2/run.log 2>&1; echo "b2 rc $?"
grep -A14 "^B2 through" $OUT/b2/run.log | grep -v '^{'
(cd /tmp/w && find results/logs snakemake.log -type f | tar czf $OUT/b2/logs.tgz -T -) 2>/dev/null
export PYTHONPATH=src:/tmp/site
echo "== B6"; timeout 110 python3 benchmarks/bench_kronfluence.py --device cuda --table 2>&1 | grep -v Warning | tee $OUT/b6.txt | tail -12
echo "== B3"; timeout 150 python3 benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 16 --engines hooks,factored,fisher --repeat 9 2>&1 | grep '^{' | tee $OUT/b3.jsonl | cut -c1-400
echo "== check_cuda"; timeout 100 python3 benchmarks/check_cuda.py > $OUT/check_cuda.txt 2>&1; echo "rc $?"; tail -3 $OUT/check_cuda.txt
