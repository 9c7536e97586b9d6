#!/usr/bin/env bash
# Session 21, calls 3-5: B2 through the workflow, the session-20 code (d58c155, "old": a full
# tree in .probe/old, `git archive d58c155 | tar -x -C .probe/old`) against this session's
# (kernels compiled in a thread beside the first pass), alternating on one machine, each run
# with a Triton cache of its own (as on a fresh machine); then check_cuda.py (CHECK=1).
#   bash dev3.sh                                                  # call 3
#   TAG=c4 ORDER="new_3 old_3" CHECK=0 bash dev3.sh               # call 5 (dev4.sh)
# Call 4 ran ORDER="new_1 old_1 new_2" without a TAG on call 3's machine, found call 3's
# work folders up to date and ran nothing.
set -u
ORDER=${ORDER:-old_1 new_1 old_2 new_2}; CHECK=${CHECK:-1}; P=/tmp/${TAG:-}
R=${P}res; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $R/pip.log 2>&1 || { tail $R/pip.log; exit 1; }
grep -m1 "model name" /proc/cpuinfo
export PYTHONPATH=/tmp/site
for run in $ORDER; do
  v=${run%_*}; r=${run#*_}; ROOT=.; [ $v = old ] && ROOT=.probe/old
  mkdir -p $R/b2_$run
  TRITON_CACHE_DIR=${P}tc_$run SITE=/tmp/site OUT=$R/b2_$run WORK=${P}w_$run timeout 140 bash $ROOT/benchmarks/run_gpu_b2.sh > $R/b2_$run/run.log 2>&1; echo "b2 $v $r rc $?"
  grep -A14 "^B2 through" $R/b2_$run/run.log | grep "end to end\|collect+score\|longest\|host speed"
  grep -h "Fisher samples" ${P}w_$run/results/logs/chunk_scores/*/*/*/*/*.log | cut -c1-120
  (cd ${P}w_$run && find results/logs snakemake.log -type f | tar czf $R/b2_$run/logs.tgz -T -) 2>/dev/null
  tar czf $OUT/all.tgz -C $R .
done
if [ "$CHECK" = 1 ]; then
  echo "== check_cuda"; PYTHONPATH=src:/tmp/site timeout 70 python3 benchmarks/check_cuda.py > $R/check_cuda.txt 2>&1; echo "rc $?"; tail -c 700 $R/check_cuda.txt
  tar czf $OUT/all.tgz -C $R .
fi
