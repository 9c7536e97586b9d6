import time, torch, yaml, sys
from interference.models import random_model, random_config, DTYPES
mcfg = yaml.safe_load(open("conf/model/llama2_7b.yaml"))
cfg = random_config(mcfg)
for k in range(2):
    torch.cuda.synchronize(); t = time.time()
    m = random_model(cfg, 0, torch.bfloat16, "cuda:0"); torch.cuda.synchronize()
    print("7B random build s", round(time.time() - t, 2), torch.cuda.memory_allocated() / 2**30)
    del m; torch.cuda.empty_cache()
