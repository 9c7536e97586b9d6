#!/usr/bin/env bash
# Session 22, call 1: B2 through the workflow with this session's code ("new": the shipped
# tokenizer, one chunk's join without copies, top conflicts ranked in place) against the
# code at the session's start (5d3bfd6, "old": `git archive 5d3bfd6 | tar -x -C .probe/old`),
# alternating on one machine, each run with a Triton cache of its own (as on a fresh
# machine); then probe_stats.py on the first new run's split folder (4 and 16 threads, and
# a cProfile at 4). Wheels carried in .whl (snakemake, hydra, ...).
#   bash benchmarks/results/b2_h200/s22/dev1.sh
#   TAG=c2 ORDER="old_2 new_3" STATS=0 bash benchmarks/results/b2_h200/s22/dev1.sh
set -u
ORDER=${ORDER:-new_1 old_1 new_2}; STATS=${STATS:-1}; P=/tmp/${TAG:-}
R=${P}res; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $R/pip.log 2>&1 || { tail $R/pip.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $R/card.txt
nproc; grep -m1 "model name" /proc/cpuinfo
export PYTHONPATH=/tmp/site
for run in $ORDER; do
  v=${run%_*}; r=${run#*_}; ROOT=.; [ $v = old ] && ROOT=.probe/old
  mkdir -p $R/b2_$run
  TRITON_CACHE_DIR=${P}tc_$run SITE=/tmp/site OUT=$R/b2_$run WORK=${P}w_$run timeout 150 bash $ROOT/benchmarks/run_gpu_b2.sh > $R/b2_$run/run.log 2>&1; echo "b2 $v $r rc $?"
  grep -A14 "^B2 through" $R/b2_$run/run.log | grep "end to end\|collect+score\|longest\|host speed"
  grep -h "finished in" ${P}w_$run/results/logs/*/*.log ${P}w_$run/results/logs/*/*/*/*/*.log ${P}w_$run/results/logs/*/*/*/*.log ${P}w_$run/results/logs/*/*/*/*/*/*.log 2>/dev/null | cut -c1-60 | tr '\n' ' '; echo
  (cd ${P}w_$run && find results/logs snakemake.log -type f | tar czf $R/b2_$run/logs.tgz -T -) 2>/dev/null
  tar czf $OUT/all.tgz -C $R .
done
if [ "$STATS" = 1 ]; then
  S=${P}w_new_1/results/b2_7b/llama2_7b/math__code/split0
  for th in 4 16 4; do
    OMP_NUM_THREADS=$th PYTHONPATH=src:/tmp/site timeout 60 python3 benchmarks/results/b2_h200/s22/probe_stats.py $S 2>/dev/null | tail -1 | tee -a $R/stats_probe.jsonl
  done
  OMP_NUM_THREADS=4 PYTHONPATH=src:/tmp/site timeout 60 python3 benchmarks/results/b2_h200/s22/probe_stats.py $S --profile > $R/stats_profile.txt 2>&1
  tail -1 $R/stats_profile.txt
  tar czf $OUT/all.tgz -C $R .
fi
