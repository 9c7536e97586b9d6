#!/usr/bin/env bash
# Session 21, call 4: as call 3 (dev3.sh: the session-20 code in .probe/old against this
# session's, each run with a Triton cache of its own), in the order new, old, new.
set -u
R=/tmp/res; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $R/pip.log 2>&1 || { tail $R/pip.log; exit 1; }
grep -m1 "model name" /proc/cpuinfo
export PYTHONPATH=/tmp/site
for rv in new_1 old_1 new_2; do r=${rv#*_}; v=${rv%_*}
  {
    ROOT=.; [ $v = old ] && ROOT=.probe/old
    mkdir -p $R/b2_${v}_$r
    TRITON_CACHE_DIR=/tmp/tc_${v}_$r SITE=/tmp/site OUT=$R/b2_${v}_$r WORK=/tmp/w_${v}_$r timeout 125 bash $ROOT/benchmarks/run_gpu_b2.sh > $R/b2_${v}_$r/run.log 2>&1; echo "b2 $v $r rc $?"
    grep -A14 "^B2 through" $R/b2_${v}_$r/run.log | grep "end to end\|collect+score\|longest\|host speed"
    grep -h "Fisher samples" /tmp/w_${v}_$r/results/logs/chunk_scores/*/*/*/*/*.log | cut -c1-120
    (cd /tmp/w_${v}_$r && find results/logs snakemake.log -type f | tar czf $R/b2_${v}_$r/logs.tgz -T -) 2>/dev/null
    tar czf $OUT/all.tgz -C $R .
  }
done
tar czf $OUT/all.tgz -C $R .
