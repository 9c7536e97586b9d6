#!/usr/bin/env bash
set -u
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import json, bench_b2_workflow as b; print(json.dumps(b.host_speed()))" | tee $OUT/host.json
PYTHONPATH=src timeout 150 python3 benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 16 --engines hooks,factored,fisher --repeat 9 2>&1 | grep '^{' | tee -a $OUT/b3_new.jsonl
PYTHONPATH=.probe/old/src timeout 100 python3 benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 128 --batch 16 --engines factored,fisher --repeat 9 2>&1 | grep '^{' | tee -a $OUT/b3_old.jsonl
