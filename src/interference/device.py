"""Where the library computes: the one rule for choosing a torch device, the automatic
device-memory budget, whether the Triton kernels can run, and moving operands onto a device
while the previous ones are used (and small results off it without waiting)."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger("interference.device")

DEVICES = ("auto", "cpu", "cuda")
AUTO_SHARE = 0.8        # share of a card's free memory that an automatic budget takes
# The fused attention kernels (torch.nn.attention.SDPBackend names) a collection's forward
# may take per device type; a type not listed keeps torch's choice. cuDNN's, which torch
# prefers on Hopper, builds an execution plan the first time a process meets each batch
# shape: 8.7 s of host time in a fresh process's first collection of the B2 samples on an
# H200 (every micro-batch shape once), 0.2 s in its second (benchmarks/RESULTS.md, B2
# session 16). Flash and memory-efficient attention need no plan; the math kernel is the
# fallback every input has.
ATTENTION_BACKENDS = {"cuda": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")}


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1: the tests without a
    GPU), which compiles nothing and runs one kernel at a time in a process."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device) -> bool:
    """The project's Triton kernels can run on ``device`` (a torch.device): CUDA with triton
    installed, or triton's CPU interpreter (:func:`triton_interpreting`). Nothing is
    imported to find out."""
    if not _has_triton():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


def resolve_device(want: str | None = "auto", what: str = "device") -> str:
    """'cpu' or 'cuda' for a requested device: ``auto`` (or None) is CUDA when a CUDA device
    is visible, else the CPU; a CUDA device (``cuda``, ``cuda:1``) without a visible one is
    an error naming ``what`` (the setting that asked for it). Any other torch device string
    (``cuda:1`` where CUDA is visible, ``mps``) is returned as given."""
    want = str(want) if want else "auto"
    if want == "cpu":
        return "cpu"
    import torch

    if want.split(":")[0] == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{what}={want} but no CUDA device is visible; use auto or cpu")
    if want not in DEVICES:
        return want
    return "cuda" if torch.cuda.is_available() else "cpu"


def attention_backends(device):
    """A context in which ``scaled_dot_product_attention`` takes only the kernels
    :data:`ATTENTION_BACKENDS` allows on ``device``'s type (a null context elsewhere). The
    backward of an attention runs the kernel its forward took."""
    import torch

    names = ATTENTION_BACKENDS.get(torch.device(device).type)
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, n) for n in names])


def free_memory_mb(device) -> float | None:
    """Memory this process can still allocate on a CUDA device, in MiB: the card's free
    memory (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator holds
    reserved but unallocated (after a large collection that can be most of the card);
    None elsewhere."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + cached) / 2 ** 20


def memory_budget_mb(value, device, what: str = "device_memory_mb") -> float | None:
    """A device-memory budget in MiB from a setting: a number > 0 as given, None (no limit)
    as given, 'auto': ``AUTO_SHARE`` of the card's free memory now on CUDA, no limit on
    the CPU (host memory is not what a device budget bounds)."""
    if value is None:
        return None
    if isinstance(value, str) and value == "auto":
        free = free_memory_mb(device)
        return None if free is None else AUTO_SHARE * free
    try:
        mb = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of MiB > 0, 'auto' or None, "
                         f"got {value!r}") from None
    if not mb > 0:
        raise ValueError(f"{what} must be > 0, 'auto' or None, got {value}")
    return mb


def to_device(t, device):
    """``t`` on ``device``; a host tensor bound for CUDA goes through pinned memory with a
    non-blocking copy on the current stream (so a copy on a side stream overlaps with work
    on the main one)."""
    import torch

    device = torch.device(device)
    if t is None or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def start_host_copy(t):
    """Start copying ``t`` to the host without waiting for the device: (host tensor, the
    CUDA event after the copy, or None where the copy was synchronous); read it with
    :func:`host_values`, e.g. once the next batch's work is queued."""
    import torch

    if not t.is_cuda:
        return t.cpu(), None
    host = t.to("cpu", non_blocking=True)       # pinned, asynchronous
    done = torch.cuda.Event()
    done.record()
    return host, done


def host_values(copy) -> list:
    """The values of a :func:`start_host_copy`, once it has landed (``tolist``)."""
    host, done = copy
    if done is not None:
        done.synchronize()
    return host.tolist()


def in_background(work, device, what: str) -> threading.Thread:
    """Start ``work()`` in a daemon thread whose current CUDA device is ``device``'s (a torch
    device) and return the thread, to be joined. For work that only saves time later, as
    compiling kernels while gradients are collected: an error is logged, not raised (the
    real call meets it again and raises)."""
    def run():
        try:
            if device.type == "cuda" and device.index is not None:
                import torch

                torch.cuda.set_device(device)
            work()
        except Exception as err:   # noqa: BLE001 (logged: the later real call raises it)
            logger.warning("%s failed (%s: %s); the first real use will do it",
                           what, type(err).__name__, err)

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    return thread


def _tensors(obj):
    import torch

    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)


def prefetched(jobs, load, device, threaded: bool | None = None):
    """Yield ``(job, load(job))`` in order, loading job k + 1 while job k is used.

    ``threaded`` (default: on CUDA): ``load`` runs in one worker thread, in job order, its
    copies on a side CUDA stream; the main stream waits for a job's copies (an event)
    before its tensors are handed out, and each tensor is recorded on the main stream so
    the allocator does not reuse it early. Unthreaded: plain ``map``. The values are the
    same either way (only data movement overlaps)."""
    import torch

    device = torch.device(device)
    threaded = device.type == "cuda" if threaded is None else threaded
    jobs = list(jobs)
    if not threaded or len(jobs) < 2:
        for job in jobs:
            yield job, load(job)
        return
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None

    def work(job):
        if not cuda:
            return load(job), None
        with torch.cuda.device(device), torch.cuda.stream(side):
            out = load(job)
            done = torch.cuda.Event()
            done.record(side)
        return out, done

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(work, jobs[0])
        for k, job in enumerate(jobs):
            out, done = pending.result()
            if k + 1 < len(jobs):
                pending = pool.submit(work, jobs[k + 1])
            if cuda:
                main = torch.cuda.current_stream(device)
                main.wait_event(done)
                for t in _tensors(out):
                    if t.is_cuda:
                        t.record_stream(main)
            yield job, out
