export PYTHONPATH=src PYTHONPYCACHEPREFIX=/tmp/pyc
python3 -m compileall -q -j 0 src > /dev/null
A="--chunks 8 --metric-default --min-tokens 62 --phase-times --repeat 2"
summ() { python3 -c "
import json,sys
d=json.loads([l for l in open(sys.argv[1]) if l.startswith('{')][-1]); e=d['phase_seconds_earlier_runs'][0]; p=d['phase_seconds']
k=('forward (losses)','backward (deltas)','arm_results (scoring)')
print(sys.argv[2], 'runs', [round(x,2) for x in d['runs_s']], 'fwd/bwd/score run1', [e[x] for x in k], 'run2', [p[x] for x in k])" $1 $2; }
python3 benchmarks/check_b2_pass.py $A > $OUT/base.txt 2>&1; summ $OUT/base.txt base
CUDA_MODULE_LOADING=EAGER python3 benchmarks/check_b2_pass.py $A > $OUT/eager.txt 2>&1; summ $OUT/eager.txt eager_modules
TORCHDYNAMO_DISABLE=1 python3 benchmarks/check_b2_pass.py $A > $OUT/nodynamo.txt 2>&1; summ $OUT/nodynamo.txt no_dynamo
TORCH_LOGS=recompiles,graph_breaks python3 benchmarks/check_b2_pass.py $A --sdpa flash > $OUT/flash.txt 2>&1; summ $OUT/flash.txt sdpa_flash; grep -c -i "recompil\|graph break" $OUT/flash.txt
