#!/usr/bin/env bash
set -u
mkdir -p $OUT/b2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
echo "== check_cuda"; PYTHONPATH=src:/tmp/site timeout 150 python3 benchmarks/check_cuda.py 2>&1 | tail -2 | tee $OUT/check_cuda.txt
B3="benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 16 --engines hooks,factored,fisher --repeat 9"
for r in 1 2; do
  for v in new old; do
    SRC=src; [ $v = old ] && SRC=.probe/old/src
    echo "== B3 $v run $r"; PYTHONPATH=$SRC timeout 150 python3 $B3 2>&1 | grep '^{' | tee -a $OUT/b3_$v.jsonl
  done
done
export PYTHONPATH=/tmp/site
SITE=/tmp/site OUT=$OUT/b2 WORK=/tmp/w timeout 200 bash benchmarks/run_gpu_b2.sh > $OUT/b2/run.log 2>&1; echo "b2 rc $?"
grep -A14 "^B2 through" $OUT/b2/run.log | grep -v '^{'
(cd /tmp/w && find results/logs -name '*.log' | tar czf $OUT/b2/logs.tgz -T -) 2>/dev/null
