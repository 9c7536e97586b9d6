#!/bin/bash
# B3, every engine: prev = the tree before the dense-rows lag, new = the working tree
B="benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 16 --repeat 9 --engines hooks,factored,fisher"
L=$OUT/b3_dense_ab.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $L
for r in 1 2 3; do
  for t in prev new; do
    P=src; [ $t != new ] && P=.probe/ab/$t/src
    echo "== $t round $r" >> $L
    PYTHONPATH=$P timeout 100 python3 $B 2>/dev/null | tail -1 >> $L
  done
done
grep -o '== .*\|"[a-z]*_over_ordinary": [0-9.]*' $L
for t in prev new; do
  P=src; [ $t != new ] && P=.probe/ab/$t/src
  echo "== peak $t" | tee -a $L; PYTHONPATH=$P timeout 100 python3 .probe/ab/peak.py 2>/dev/null | tail -1 | tee -a $L
done
