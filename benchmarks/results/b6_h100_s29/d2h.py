"""Session 29 probe: ways to move 96 dense rows (28.3M float32 values each, B6's model) from
one H100 to host memory. GB/s of the rows' float32 bytes."""
import os, time, torch
P, n = 28_311_552, 48
rows = [torch.randn(P, device="cuda") for _ in range(4)]
torch.cuda.synchronize()
gb = n * P * 4 / 1e9

def timed(name, fn):
    torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"{name:55s} {dt:6.2f} s  {gb/dt:6.2f} GB/s", flush=True)

def fresh_buffer_copy():          # today: reserve() a pageable buffer, row.copy_(vec)
    buf = torch.empty(n, P)
    for i in range(n): buf[i].copy_(rows[i % 4])
def fresh_to_cpu_each():          # no reserve: vec.to('cpu').clone()
    out = [rows[i % 4].to("cpu").clone() for i in range(n)]
def prefaulted_copy():
    buf = torch.empty(n, P); buf.zero_()
    t0 = time.perf_counter()
    for i in range(n): buf[i].copy_(rows[i % 4])
def pinned_buffer():
    buf = torch.empty(n, P, pin_memory=True)
    for i in range(n): buf[i].copy_(rows[i % 4], non_blocking=True)
def pinned_alloc_only():
    buf = torch.empty(n, P, pin_memory=True)
def staging_then_memcpy():
    buf = torch.empty(n, P)
    st = [torch.empty(P, pin_memory=True) for _ in range(2)]
    ev = [None, None]
    for i in range(n):
        s = st[i % 2]
        s.copy_(rows[i % 4], non_blocking=True)
        e = torch.cuda.Event(); e.record()
        e.synchronize()
        buf[i].copy_(s)
def staging_to_file(path="/tmp/rows.bin"):
    st = torch.empty(P, pin_memory=True)
    with open(path, "wb") as fh:
        for i in range(n):
            st.copy_(rows[i % 4])
            st.numpy().tofile(fh)
def today_to_file(path="/tmp/rows.bin"):
    with open(path, "wb") as fh:
        for i in range(n):
            fh.write(rows[i % 4].cpu().numpy().tobytes())
def bf16_gpu_convert_then_copy():
    buf = torch.empty(n, P, dtype=torch.bfloat16)
    for i in range(n): buf[i].copy_(rows[i % 4].to(torch.bfloat16))
def bf16_cross_copy():
    buf = torch.empty(n, P, dtype=torch.bfloat16)
    for i in range(n): buf[i].copy_(rows[i % 4])

torch.set_num_threads(16)
for r in range(2):
    print("round", r, "THP_MEM_ALLOC_ENABLE", os.environ.get("THP_MEM_ALLOC_ENABLE"))
    for name, fn in [("pageable reserved buffer, copy_ (today)", fresh_buffer_copy),
                     ("vec.to(cpu).clone() per row", fresh_to_cpu_each),
                     ("pre-faulted pageable buffer (zero_ counted)", prefaulted_copy),
                     ("pinned buffer alloc only", pinned_alloc_only),
                     ("pinned buffer alloc + non_blocking copies", pinned_buffer),
                     ("pinned staging x2 then memcpy to pageable", staging_then_memcpy),
                     ("to file: .cpu().numpy().tobytes() (today)", today_to_file),
                     ("to file: pinned staging, tofile", staging_to_file),
                     ("bf16: convert on GPU, copy into pageable", bf16_gpu_convert_then_copy),
                     ("bf16: cross-dtype copy_ into pageable", bf16_cross_copy)]:
        timed(name, fn)
os.remove("/tmp/rows.bin")
