#!/usr/bin/env bash
# device call 1: B3 old vs new on one machine, check_cuda, B2 (new code)
set -u
mkdir -p $OUT/b2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
B3="benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 16 --engines hooks,factored,fisher"
for r in 1 2; do
  for v in new old; do
    SRC=src; [ $v = old ] && SRC=.probe/old/src
    echo "== B3 $v run $r"; PYTHONPATH=$SRC timeout 120 python3 $B3 2>&1 | grep '^{' | tee -a $OUT/b3_$v.jsonl
  done
done
echo "== check_cuda"; PYTHONPATH=src:/tmp/site timeout 150 python3 benchmarks/check_cuda.py 2>&1 | tail -3 | tee $OUT/check_cuda.txt
export PYTHONPATH=/tmp/site
SITE=/tmp/site OUT=$OUT/b2 WORK=/tmp/w timeout 200 bash benchmarks/run_gpu_b2.sh > $OUT/b2/run.log 2>&1; echo "b2 rc $?"
tail -25 $OUT/b2/run.log
(cd /tmp/w && find results/logs -name '*.log' | tar czf $OUT/b2/logs.tgz -T -) 2>/dev/null
echo "== profile new"; PYTHONPATH=src timeout 90 python3 benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 32 --batch 16 --engines factored,fisher --profile 25 > $OUT/b3_profile_new.txt 2>&1; grep -n "Self CPU time total\|Self CUDA time total\|^{" $OUT/b3_profile_new.txt
