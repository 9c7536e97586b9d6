#!/usr/bin/env bash
# Issue 15's GPU bars on one card, in one call: B2 through the workflow (RUNS times, each
# with a Triton cache of its own, as on a fresh machine), B6 (ours and Kronfluence in one
# process), B3 in bf16 (interleaved rounds of every engine against an ordinary step) and the
# CUDA correctness checks.
#
#   WHEELS=.whl OUT=dir bash benchmarks/run_gpu_bars.sh
#   RUNS=1 BARS="b2 check" WHEELS=.whl OUT=dir bash benchmarks/run_gpu_bars.sh
#
# WHEELS: a folder of wheels installed (no index, no deps) into a site folder first:
# snakemake 9 and hydra-core 1.3 with their dependencies, kronfluence and einconv (the device
# image has torch, triton and transformers). Output in $OUT: card.txt, b2_<run>/ (run.log,
# b2.jsonl, the jobs' logs), b6.txt, b3.jsonl, check_cuda.txt, and all.tgz of them (the one
# file to fetch back), rewritten after every step so a call cut short keeps what finished.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}; RUNS=${RUNS:-2}; BARS=${BARS:-b2 b6 b3 check}
SITE=${SITE:-/tmp/bars-site}; SCRATCH=${SCRATCH:-/tmp/bars}
R=$SCRATCH/res; mkdir -p "$R" "$OUT"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl > "$R/pip.log" 2>&1 || { tail "$R/pip.log"; exit 1; }
fi
save() { tar czf "$OUT/all.tgz" -C "$R" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)" | tee -a "$R/card.txt"
case " $BARS " in *" b2 "*)
  for run in $(seq 1 "$RUNS"); do
    mkdir -p "$R/b2_$run"
    TRITON_CACHE_DIR=$SCRATCH/triton_$run SITE=$SITE OUT=$R/b2_$run WORK=$SCRATCH/work_$run \
      timeout 200 bash benchmarks/run_gpu_b2.sh > "$R/b2_$run/run.log" 2>&1
    echo "b2 run $run rc $?"
    grep -A14 "^B2 through" "$R/b2_$run/run.log" | grep "end to end\|plain\|ratio\|longest\|host speed"
    (cd "$SCRATCH/work_$run" && find results/logs snakemake.log -type f | tar czf "$R/b2_$run/logs.tgz" -T -) 2>/dev/null
    save
  done;;
esac
export PYTHONPATH=src:$SITE
case " $BARS " in *" b6 "*)
  echo "== B6"; timeout 110 python3 benchmarks/bench_kronfluence.py --device cuda --table 2>&1 \
    | grep -v Warning | tee "$R/b6.txt" | tail -12; save;;
esac
case " $BARS " in *" b3 "*)
  echo "== B3"; timeout 150 python3 benchmarks/bench_gradients.py --device cuda --dtype bfloat16 \
    --n 128 --batch 16 --engines hooks,factored,fisher --repeat 9 2>&1 | grep '^{' \
    | tee "$R/b3.jsonl" | cut -c1-400; save;;
esac
case " $BARS " in *" check "*)
  echo "== check_cuda"; timeout 100 python3 benchmarks/check_cuda.py > "$R/check_cuda.txt" 2>&1
  echo "rc $?"; tail -c 700 "$R/check_cuda.txt"; save;;
esac
