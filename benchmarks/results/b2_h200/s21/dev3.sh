#!/usr/bin/env bash
# Session 21, call 3: B2 through the workflow, the session-20 code (d58c155, "old": a full
# tree in .probe/old, `git archive d58c155 | tar -x -C .probe/old`) against this session's
# (kernels compiled in a thread beside the first pass), alternating on one machine, each run
# with a Triton cache of its own (as on a fresh machine); then check_cuda.py.
set -u
R=/tmp/res; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $R/pip.log 2>&1 || { tail $R/pip.log; exit 1; }
grep -m1 "model name" /proc/cpuinfo
export PYTHONPATH=/tmp/site
for r in 1 2; do
  for v in old new; do
    ROOT=.; [ $v = old ] && ROOT=.probe/old
    mkdir -p $R/b2_${v}_$r
    TRITON_CACHE_DIR=/tmp/tc_${v}_$r SITE=/tmp/site OUT=$R/b2_${v}_$r WORK=/tmp/w_${v}_$r timeout 140 bash $ROOT/benchmarks/run_gpu_b2.sh > $R/b2_${v}_$r/run.log 2>&1; echo "b2 $v $r rc $?"
    grep -A14 "^B2 through" $R/b2_${v}_$r/run.log | grep "end to end\|collect+score\|longest\|host speed"
    grep -h "Fisher samples" /tmp/w_${v}_$r/results/logs/chunk_scores/*/*/*/*/*.log | cut -c1-120
    (cd /tmp/w_${v}_$r && find results/logs snakemake.log -type f | tar czf $R/b2_${v}_$r/logs.tgz -T -) 2>/dev/null
    tar czf $OUT/all.tgz -C $R .
  done
done
echo "== check_cuda"; PYTHONPATH=src:/tmp/site timeout 70 python3 benchmarks/check_cuda.py > $R/check_cuda.txt 2>&1; echo "rc $?"; tail -c 700 $R/check_cuda.txt
tar czf $OUT/all.tgz -C $R .
