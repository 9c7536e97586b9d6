import sys, time, yaml
t0 = time.time()
import torch
t1 = time.time()
from interference import models
from interference.data.tasks import load_task
t2 = time.time()
code = load_task("code"); t3 = time.time()
math = load_task("math", n=400, seed=0); t4 = time.time()
prose = load_task("prose"); t5 = time.time()
texts = [r["prompt"] + r["answer"] for r in code + math + prose]
tok = models.train_bpe(texts, 512); t6 = time.time()
mcfg = yaml.safe_load(open("conf/model/llama2_7b.yaml"))
cfg = models.model_config(mcfg); t7 = time.time()
m = models.random_model(models.random_config(mcfg), 0, torch.bfloat16, "meta"); t8 = time.time()
print(f"import torch {t1-t0:.2f} models+tasks {t2-t1:.2f} code {t3-t2:.2f} math {t4-t3:.2f} prose {t5-t4:.2f} "
      f"train {t6-t5:.2f} config {t7-t6:.2f} meta model {t8-t7:.2f}", flush=True)
from interference.architectures.proof import prove_first_contact
for n in [int(x) for x in sys.argv[1:]]:
    torch.set_num_threads(n)
    t = time.time(); prove_first_contact(m); print(f"proof threads {n}: {time.time()-t:.2f} s", flush=True)
