#!/bin/bash
# B3 Fisher A/B on one card: old = e5df5b1 (before the view adds), mid = 11c548e (session 27), new = working tree, fused = new + the sums of squares by atomics in the Triton kernel
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/card.txt
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a $OUT/card.txt
B="benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 16 --repeat 9"
for r in 1 2; do
  for t in old mid new fused; do
    P=src; [ $t != new ] && P=.probe/ab/$t/src
    echo "== $t round $r"
    PYTHONPATH=$P timeout 120 python3 $B --engines fisher > $OUT/b3_${t}_$r.json 2>$OUT/b3_${t}_$r.err
    tail -c 600 $OUT/b3_${t}_$r.json
  done
done
echo "== all engines, new"
PYTHONPATH=src timeout 150 python3 $B --engines hooks,factored,fisher > $OUT/b3_all_new.json 2>$OUT/b3_all_new.err; tail -c 800 $OUT/b3_all_new.json
for t in mid new fused; do
  P=src; [ $t != new ] && P=.probe/ab/$t/src
  echo "== profile $t"
  PYTHONPATH=$P timeout 120 python3 benchmarks/results/b3_h100_s26/profile_b3_host.py 8 > $OUT/profile_$t.txt 2>&1; grep -E "^round|^== " $OUT/profile_$t.txt
done
