"""One model over several devices (a job's GPUs): which blocks go where, random weights that
do not depend on where they are made, and tensors of several devices brought to one.

A model too large for one GPU (LLaMA-2-70B in bfloat16: 128.5 GiB of weights) is split by
whole blocks (embeddings, decoder layers, final norm, head) over the devices, balanced by
parameter bytes (accelerate's planner), and dispatched: each block runs where its weights
are, its inputs moved there by accelerate's hooks. Per-sample gradients need nothing else:
each projection's x and δ live on its layer's device and meet on one device only where
pieces of several layers are joined (:func:`on_one_device`).
"""
from __future__ import annotations

import logging
import zlib

import torch
from torch import nn

# share of each device's free memory the weights may take: the rest holds activations,
# per-sample factors and the Fisher sums of the job's layers
WEIGHT_SHARE = 0.9


def plan_placement(model: nn.Module, devices: list, dtype: torch.dtype,
                   free_bytes: dict | None = None) -> dict[str, str]:
    """{block name: device} placing ``model`` (on the meta device) over ``devices`` (torch
    device strings, e.g. ['cuda:0', 'cuda:1']): whole blocks (the model's
    ``_no_split_modules``), contiguous, balanced by parameter bytes of ``dtype``, within
    WEIGHT_SHARE of each device's free memory (``free_bytes``: device -> bytes; measured
    when None). Raises ModelDoesNotFitError when the devices together cannot hold it."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    from .models import ModelDoesNotFitError

    devices = [str(torch.device(d)) for d in devices]
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct, got {devices}")
    if free_bytes is None:
        free_bytes = {d: free_memory_bytes(d) or 0 for d in devices}
    # accelerate's planner fills GPU indices in order: device k of ``devices`` is index k
    # to it (whatever its type), mapped back to its name after
    key = dict(enumerate(devices))
    limit = {k: int(WEIGHT_SHARE * free_bytes[d]) for k, d in key.items()}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)       # "Device k is not available": not a GPU index here
    try:
        balanced = get_balanced_memory(model, max_memory=limit, no_split_module_classes=no_split,
                                       dtype=dtype, low_zero=False)
        balanced = {k: min(v, limit[k]) for k, v in balanced.items() if k in limit}
        placed = infer_auto_device_map(model, max_memory=balanced,
                                       no_split_module_classes=no_split, dtype=dtype)
        if any(v not in key for v in placed.values()):   # a balanced share too tight
            placed = infer_auto_device_map(model, max_memory=limit,
                                           no_split_module_classes=no_split, dtype=dtype)
    finally:
        quiet.setLevel(level)
    left = [name for name, v in placed.items() if v not in key]
    if left:
        n = sum(p.numel() for p in model.parameters())
        raise ModelDoesNotFitError(
            f"the model's weights ({n:,} parameters in {str(dtype).replace('torch.', '')}, "
            f"{n * dtype.itemsize / 2**30:.1f} GiB) do not fit {len(devices)} device(s) "
            f"{devices} ({sum(free_bytes.values()) / 2**30:.1f} GiB free, "
            f"{WEIGHT_SHARE:.0%} of it for weights): {left[0]} and {len(left) - 1} more "
            "block(s) left over. Give the job more GPUs (resources.collect.gpu), a 16-bit "
            "model.dtype, or a smaller model")
    return {name: key[v] for name, v in placed.items()}


def free_memory_bytes(device) -> int | None:
    """Bytes free on ``device`` now: a CUDA card's (device.free_memory_mb), the host's
    available memory for the CPU (collect.available_memory); None where unknown."""
    if torch.device(device).type == "cpu":
        from .gradients.collect import available_memory

        return available_memory()
    from .device import free_memory_mb

    free = free_memory_mb(torch.device(device))
    return None if free is None else int(free * 2**20)


def device_of(name: str, device_map: dict[str, str]) -> str:
    """The device of module ``name`` under ``device_map``: its longest placed prefix's, or,
    for a module holding placed blocks (the model itself), its first block's."""
    best = None
    for prefix in device_map:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        best = next((b for b in device_map if name == "" or b.startswith(name + ".")), None)
    if best is None:
        raise ValueError(f"module {name!r} has no device in the placement")
    return device_map[best]


def module_seed(seed: int, name: str) -> int:
    """The seed of module ``name``'s random weights: from ``seed`` and the name alone."""
    return zlib.crc32(f"{int(seed)}/{name}".encode()) + (int(seed) << 32)


@torch.no_grad()
def make_random_weights(model: nn.Module, seed: int, device_map: dict[str, str]) -> nn.Module:
    """Give ``model`` (parameters on the meta device, buffers real) random weights in place:
    every module's parameters are made on its device (``device_map``, see
    :func:`device_of`), then set by the model's own ``_init_weights`` from the module's own
    seed (:func:`module_seed`), children before parents as ``nn.Module.apply`` visits them.
    The weights thus depend on (seed, module name, device type) only: not on which device
    of a type holds a module, nor on the order modules are made. Tied weights are tied
    again after (the input embedding's values, as transformers ties them). A parameter
    the model's ``_init_weights`` leaves unset (it was filled with NaN) is an error naming
    it."""
    made: dict[int, nn.Parameter] = {}          # tied parameters stay one parameter
    for name, module in model.named_modules():
        dev = device_of(name, device_map)
        for k, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                made[id(p)] = nn.Parameter(torch.full(p.shape, float("nan"), dtype=p.dtype,
                                                      device=dev), requires_grad=p.requires_grad)
            module._parameters[k] = made[id(p)]
        for k, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[k] = b.to(dev)
    init = getattr(model, "_init_weights")
    for name, module in _post_order(model):
        dev = torch.device(device_of(name, device_map))
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(module_seed(seed, name))
            init(module)
    tie = getattr(model, "tie_weights", None)
    if tie is not None:
        tie()                 # tied weights (GPT-2's head is its embedding) one tensor again
    unset = [n for n, p in model.named_parameters() if p.isnan().any()]
    if unset:
        raise ValueError(f"{type(model).__name__}._init_weights left {len(unset)} parameter(s) "
                         f"unset, e.g. {unset[:3]}: random weights of this family need a newer "
                         "transformers (5.x initialises every module in _init_weights)")
    return model


def _post_order(module: nn.Module, prefix: str = ""):
    """(name, module) of every module, children before their parent (nn.Module.apply's
    order)."""
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, module


def dispatch(model: nn.Module, device_map: dict[str, str]) -> nn.Module:
    """``model`` (its blocks already on their devices) run across them: accelerate's hooks
    move each block's inputs to its device; the outputs stay where they are made.
    ``model.hf_device_map`` says where each block is (:func:`placement_summary`)."""
    from accelerate import dispatch_model

    if len(set(device_map.values())) > 1:
        # main_device: where inputs start; a 'cpu' entry is a device that computes, not an
        # offload of weights to be streamed to a GPU
        model = dispatch_model(model, device_map=device_map,
                               main_device=device_map[next(iter(device_map))])
    model.hf_device_map = dict(device_map)
    return model


def placement_summary(model: nn.Module) -> dict[str, dict] | None:
    """{device: {"blocks": [first block, last block], "n_blocks", "gib"}} of a model placed
    over several devices (its ``hf_device_map``; the GiB of its blocks' weights on each, a
    tied weight counted with each block holding it), in placement order; None for a model
    on one device (for logs and manifests)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    if len(set(map(str, device_map.values()))) < 2:
        return None
    out: dict[str, dict] = {}
    for name, dev in device_map.items():
        entry = out.setdefault(str(dev), {"blocks": [name, name], "n_blocks": 0, "gib": 0.0})
        entry["blocks"][1] = name
        entry["n_blocks"] += 1
        entry["gib"] += sum(p.numel() * p.element_size()
                            for p in model.get_submodule(name).parameters()) / 2**30
    return out


def place(model: nn.Module, devices: list, free_bytes: dict | None = None) -> nn.Module:
    """A model in memory placed over ``devices`` (:func:`plan_placement` in its dtype; each
    block moved, then :func:`dispatch`)."""
    dtype = next(model.parameters()).dtype
    device_map = plan_placement(model, devices, dtype, free_bytes)
    for name, dev in device_map.items():
        model.get_submodule(name).to(dev)
    return dispatch(model, device_map)


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices holding ``model``'s parameters, in the order its parameters come."""
    return list(dict.fromkeys(p.device for p in model.parameters()))


def on_one_device(pieces: list[torch.Tensor], device=None) -> list[torch.Tensor]:
    """``pieces`` on one device (``device``, else the first piece's): a no-op for pieces
    already there, a copy for those of a model's other devices."""
    if not pieces:
        return pieces
    device = pieces[0].device if device is None else torch.device(device)
    return [p if p.device == device else p.to(device) for p in pieces]
