set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=src:/tmp/site
PURELIB=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 -m compileall -q -j 0 /tmp/site $PURELIB src > /dev/null
python3 -X importtime -c "import interference.models" 2> $OUT/imp_models.txt
python3 - > $OUT/tok.txt 2>&1 <<'PY'
import time, yaml, cProfile, pstats
t0=time.perf_counter()
import interference.models as M
t1=time.perf_counter()
from interference.data.tasks import load_task
t2=time.perf_counter()
c=M._default_corpus()
t3=time.perf_counter()
tok=M.train_bpe(c,512)
t4=time.perf_counter()
m=yaml.safe_load(open('conf/model/llama2_7b.yaml'))
cfg=M.model_config(m)
t5=time.perf_counter()
print(dict(import_models=t1-t0, import_tasks=t2-t1, corpus=t3-t2, train=t4-t3, config=t5-t4))
t=time.perf_counter(); recs=load_task("math", n=400, seed=0); print("math400", time.perf_counter()-t)
t=time.perf_counter(); recs=load_task("code"); print("code", time.perf_counter()-t)
t=time.perf_counter(); recs=load_task("prose"); print("prose", time.perf_counter()-t)
pr=cProfile.Profile(); pr.enable(); load_task("math", n=400, seed=1); pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(12)
PY
sort -t'|' -k2 -n $OUT/imp_models.txt | tail -25 > $OUT/imp_top.txt
