"""Per-sample gradients of the attention weights (SPEC section 3).

Two engines, equal to float tolerance (tests/test_engine.py):

- ``loop``: one forward and backward per sample, on the sample's real tokens only, with
  gradients switched on for the attention parameters alone. Exact by construction (a
  sample's gradient cannot see its batch); on CPU as fast as vmap or hooks
  (shared/notes: 0.33 s vs 0.41 s per GPT-2 sample). Works for every objective.
- ``hooks``: one batched forward and backward of Σ_k L_k over a right-padded batch;
  forward hooks keep each attention module's input x [n, T, in] and output, the backward
  asks autograd for the outputs' gradients δ [n, T, out] only (no weight gradient is
  formed: plain training would sum over the batch what is formed per sample here), and
  the per-sample weight gradient is Σ_t δ_t x_tᵀ (``einsum('nto,nti->noi')``), formed in
  float32 one module at a time. With right padding and a causal mask
  no real token sees a pad, so this equals the per-sample loop; it is what makes GPU
  collection run at training speed. Causal-LM objectives only.

``engine='auto'`` picks ``hooks`` for causal LMs and ``loop`` otherwise: hooks ran at 0.63
of an ordinary batched step on 2 CPU cores (loop 0.48) and 0.90 on an H200 in float32
(loop 0.05), GPT-2-small, 256 tokens (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.autograd.graph import get_gradient_edge

from ..architectures import QKOVIndexer
from ..device import attention_backends, host_values, start_host_copy, to_device
from ..placement import on_one_device
from .kernels import square_sum, weight_grads
from .objectives import Objective, frozen, head_token_nll, plain_lm_head, token_nll


# A micro-batch is right-padded to a multiple of this many tokens (device type -> multiple;
# never beyond the call's longest sample). On a GPU each new batch length costs kernels
# chosen and memory mapped anew (about 0.15 s per length on an H200, so real data of 35
# lengths paid some 5 s in a pass; benchmarks/RESULTS.md, session 13); pads change no
# sample's gradient (their δ is 0). On the CPU nothing is gained: batches keep their length.
PAD_MULTIPLE = {"cuda": 32}
# Per-sample squared norms of a wide projection's weight gradient g = Σ_t δ_t x_tᵀ [out, in]
# are taken from float64 Gram matrices, ‖g‖² = Σ_{t,s} (δ_t·δ_s)(x_t·x_s), without forming
# g, on these devices, where GRAM_NORM_RATIO · T · (in + out) <= in · out (a LLaMA-7B
# projection at 256 tokens; not GPT-2-small's): on an H200 the formed gradients of the
# stored samples cost some 3 s of B2's 7B chunk (benchmarks/RESULTS.md, session 14).
GRAM_NORM_DEVICES = {"cuda"}
GRAM_NORM_RATIO = 4
# On these devices the engines read a micro-batch's losses and checks on the host only once
# the next micro-batch is queued (the copy itself is started at once; not for a Fisher
# state's ``into``, nor where a capture's dense per-sample gradients are kept): the device
# does not wait for the host's launches between micro-batches (B3 on an H200: the per-batch
# read held the queue 8 ms of each 33 ms micro-batch, session 17; the dense rows' read,
# 0.68-0.69x -> 0.81-0.94x of an ordinary step on an H100, session 28; RESULTS.md).
LAG_DEVICES = {"cuda"}
# On these devices a formed per-sample weight gradient's squared norm (a stored sample's,
# for its store) is the float64 sum of the squares of its rows' norms, each taken in the
# gradient's dtype (:func:`_row_norms2`): within float32 rounding of the float64 norm of
# the whole (at most 2 ulp of a float32 square, about 1e-8 over a weight's many rows), at
# an eighth of its time on the CPU, whose float64 copy of each gradient took 0.5 s of a
# 7 s collect of 16 samples (RESULTS.md, session 24). Elsewhere, and for biases, the
# float64 norm.
ROW_NORM_DEVICES = {"cpu"}
_FLOAT32_MAX_SQ = float(torch.finfo(torch.float32).max) ** 2


def _row_norms2(g: torch.Tensor) -> torch.Tensor | None:
    """[n] float64 Σ_rows ‖g_k[row]‖² of per-sample gradients g [n, ..., last], each row's
    norm in g's dtype; None where one is not finite (a row beyond the dtype's range, or a
    NaN/Inf in g: the float64 norm of the whole then decides, as before)."""
    n2 = torch.linalg.vector_norm(g.reshape(len(g), -1, g.shape[-1]), dim=-1).double()
    n2 = n2.square_().sum(-1)
    return n2 if bool(torch.isfinite(n2).all()) else None


class NonFiniteGradientError(FloatingPointError):
    """A loss or gradient is NaN or Inf; the message names the sample and the layer."""


@dataclass
class SampleGradient:
    """g_i of one sample: ``vector`` [P] float32 in the indexer's canonical order.

    ``factors`` (hooks engine with ``factors=True``): what the factored store keeps, the
    sample's own tokens only (padding excluded): ``T`` (its real tokens), ``x``
    {input group (its first module's path): [T, d_in] model dtype}, ``delta`` {module path:
    [T, d_out] model dtype} and ``grads`` {param name: float32 per-sample gradient} (for
    the projections that the store keeps dense). ``vector`` is None where the engine formed
    no row (``rows=False``); ``norm`` is then ||g_i||_2 (float64 sums of the squares).
    """

    sample_id: str
    vector: torch.Tensor | None
    loss: float
    n_tokens: int
    factors: dict | None = None
    norm: float | None = None


@contextlib.contextmanager
def attention_grads_only(model: nn.Module, names: list[str]):
    """Eval mode, gradients on for ``names`` only; restores both on exit (one walk over the
    parameters each way; the modules are walked only when the model was training)."""
    was_training = model.training
    params = list(model.named_parameters())
    saved = [p.requires_grad for _, p in params]
    wanted = set(names)
    try:
        if was_training:
            model.eval()
        for n, p in params:
            p.requires_grad_(n in wanted)
            p.grad = None
        yield
    finally:
        for (_, p), req in zip(params, saved):
            p.requires_grad_(req)
            p.grad = None
        if was_training:
            model.train(True)


def _first_bad_cell(indexer: QKOVIndexer, vec: torch.Tensor) -> str:
    for (layer, block), e in indexer.entries.items():
        if not torch.isfinite(vec[e.offset:e.offset + e.numel]).all():
            return f"layer {layer} block {block}"
    return "unknown location"


def _coverage(indexer: QKOVIndexer) -> dict[str, torch.Tensor | None]:
    """Parameter name -> the flat indices (with repeats) of its values that the canonical
    vector holds, or None where it holds each value once (the norm of g_i sums them)."""
    params = dict(indexer.model.named_parameters())
    pieces: dict[str, list[torch.Tensor]] = {}
    for e in indexer.entries.values():
        for p in e.parts:
            shape = params[p.name].shape
            flat = torch.arange(shape.numel(), device=params[p.name].device).view(shape)
            pieces.setdefault(p.name, []).append(p.take(flat).reshape(-1))
    out = {}
    for name, got in pieces.items():
        flat = torch.cat(got)
        n = params[name].numel()
        whole = flat.numel() == n and bool((torch.bincount(flat, minlength=n) == 1).all())
        out[name] = None if whole else flat
    return out


def _nonfinite_loss_message(model: nn.Module, sid: str, loss: float) -> str:
    """Name the sample and where the non-finite values come from: the first weights that
    hold NaN/Inf (their names carry the layer), else say the weights are finite."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        where = f"non-finite weights in {bad[:3]}" + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    else:
        where = ("every weight is finite: the forward pass overflowed (try float32 / "
                 "model.dtype) or the sample's inputs are invalid")
    return f"sample {sid!r}: loss is {loss}; {where}"


def _right_pad(sample_list: list[dict], device, longest: int | None = None) -> dict:
    """Re-pad unpadded causal-LM samples to the right: ids/labels/mask [n, T], T the longest
    sample's length rounded up to ``PAD_MULTIPLE`` of the device type, at most ``longest``
    (the longest sample of the caller's call, a length the model is known to take)."""
    T = padded_length(max(int(s["input_ids"].numel()) for s in sample_list),
                      torch.device(device).type, longest)
    packed = torch.zeros(3, len(sample_list), T, dtype=torch.long)   # ids, labels, mask
    ids, labels, mask = packed
    labels.fill_(-100)
    for k, s in enumerate(sample_list):
        t = s["input_ids"].numel()
        ids[k, :t], labels[k, :t], mask[k, :t] = s["input_ids"], s["labels"], 1
    # one copy, pinned and non-blocking to a GPU: a plain copy waits for the queued work
    ids, labels, mask = to_device(packed, device)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def padded_length(t: int, device_type: str, longest: int | None = None) -> int:
    """A micro-batch's length for samples of at most ``t`` tokens on ``device_type``:
    ``t`` rounded up to ``PAD_MULTIPLE[device_type]`` (none: ``t``), at most ``longest``."""
    m = PAD_MULTIPLE.get(device_type, 1)
    padded = -(-t // m) * m
    return max(t, min(padded, longest)) if longest is not None else padded


_PADDING: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def padding_of(model: nn.Module) -> str:
    """How a right-padded batch must run for each sample to get its own gradient, probed
    once per model with 6 real tokens and 2 right pads (token 0, as ``_right_pad`` writes):

    'causal'  without any attention mask the pads leave the real tokens' logits unchanged
              (within 1e-4 of the largest): the hooks engine runs its batches unmasked,
              so attention can take its causal kernel (a 16-layer chunk of the 7B shape
              on padded samples, H200: forward 7.0 -> 4.5-5.8 s, backward 8.7 -> 4.7-5.5
              s; benchmarks/RESULTS.md, B2 session 6). The pads' own outputs never reach
              a real token's loss, so their δ is 0 and they add nothing to any per-sample
              gradient.
    'masked'  the pads move the real logits unless masked: batches pass the mask.
    'leaks'   they move them even when masked (CPM-Ant, ProphetNet's predict streams):
              'auto' takes the loop engine (:func:`pads_leak`).

    A forward that refuses the probe counts as 'masked' (as before the probe existed).
    Causality and leaking are properties of the family's code, not of its weights or
    dtype, so a 16-bit model is probed through a float32 copy shrunk to 2 layers with its
    own attention implementation (architectures.proof.shrunk_copy): a bfloat16 LLaMA-2-7B
    shape on an H200 moved its logits by more than 2e-2 of the largest with and without
    two masked pads, while its float32 copy did not (most likely the rounding of two
    attention kernels through 32 layers). Where no copy can be built the model itself is
    probed at 2e-2 and never counts as 'causal'."""
    if model in _PADDING:
        return _PADDING[model]
    probe, tol = model, 1e-4
    p = next(model.parameters())
    if p.dtype in (torch.float16, torch.bfloat16):
        from ..architectures.proof import shrunk_copy
        # built where the model is (a GPU initialises a 7B shape's copy in milliseconds)
        probe = shrunk_copy(model, dtype=torch.float32, attn_implementation=None,
                            device=p.device if p.device.type != "meta" else "cpu")
        if probe is None:
            probe, tol = model, 2e-2
    verdict = _probe_padding(probe, tol)
    if tol > 1e-4 and verdict == "causal":   # a 16-bit model probed itself: keep the mask
        verdict = "masked"
    _PADDING[model] = verdict
    return verdict


def pads_leak(model: nn.Module) -> bool:
    """True when masked right pads still change the real tokens' logits
    (:func:`padding_of` is 'leaks'): the hooks engine's padded batch would then not give
    each sample's gradient alone, so 'auto' takes the loop engine."""
    return padding_of(model) == "leaks"


def _probe_padding(model: nn.Module, tol: float) -> str:
    """:func:`padding_of`'s verdict for ``model`` at ``tol`` of the largest logit."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    was_training = model.training
    try:
        p = next(model.parameters())
        ids = torch.arange(1, 7, device=p.device)[None] % min(
            int(model.get_input_embeddings().num_embeddings), 97)
        mask = (torch.arange(8, device=p.device) < 6).long()[None]
        model.eval()
        with torch.no_grad():
            alone = model(input_ids=ids, attention_mask=mask[:, :6]).logits[0, :6].float()

            def moved(pad_id: int, **kw) -> bool:
                padded = torch.cat([ids, torch.full_like(ids[:, :2], pad_id)], 1)
                out = model(input_ids=padded, **kw).logits[0, :6].float()
                return bool((alone - out).abs().max() > tol * alone.abs().max())

            if moved(pad if isinstance(pad, int) else 0, attention_mask=mask):
                return "leaks"
            try:
                return "masked" if moved(0) else "causal"
            except Exception:  # noqa: BLE001 - a forward that needs its mask
                return "masked"
    except Exception:  # noqa: BLE001 - a forward that needs other inputs: no probe
        return "masked"
    finally:
        model.train(was_training)


class _HookCapture:
    """Forward hooks on the attention modules keeping each one's input x [n, T, in] and
    output; :meth:`backward` then takes the outputs' gradients δ [n, T, out] in one backward
    that forms no weight gradient, and :meth:`form` the per-sample weight (and bias)
    gradients [n, *param.shape] in float32 from x and δ, one module at a time.

    What :meth:`form` keeps of each parameter's g (``_keep``), by ``reduce``:
    None: g itself (``grads``); 'squares': Σ_k g_k² (float64, ``sq``) and its sum over
    the parameter's entries (0-d float64, ``sq_total``: finite iff every sample's g is, as
    float32 squares cannot overflow float64; :meth:`sample_finite` names the sample);
    'norms': Σ of g_k² over the entries the indexer
    covers (float64 [n], ``norm2``), and g itself for the parameters in ``keep`` only.

    A module applied more than once per forward (a looped layer, ProphetNet's main and
    predict streams) or to inputs [n, ..., in] has its applications' tokens concatenated,
    x [n, Σ tokens, in] and δ likewise (Σ over them is its per-sample gradient); such
    modules are listed in ``stacked`` (no per-sample factors of their own tokens).
    """

    def __init__(self, model: nn.Module, names: list[str], reduce: str | None = None,
                 covered: dict | None = None, keep: set | None = None,
                 modules: dict | None = None):
        modules = modules or dict(model.named_modules())
        self.reduce, self.covered, self.keep = reduce, covered or {}, keep or set()
        self.by_module: dict[str, list[str]] = {}
        for name in names:
            path, kind = name.rsplit(".", 1)
            self.by_module.setdefault(path, []).append(kind)
        self.conv1d = {p: type(modules[p]).__name__ == "Conv1D" for p in self.by_module}
        self.grads: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.sq_total: dict[str, torch.Tensor] = {}
        self.norm2: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        # path -> [(gradient edge, shape, dtype)] of its applications' outputs
        self.outputs: dict[str, list[tuple]] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self.stacked: set[str] = set()
        self._groups: dict[str, str] | None = None
        self._views: tuple | None = None
        self._x_grams: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id(x) -> (x, XXᵀ)
        self.handles = [modules[p].register_forward_hook(self._hook(p)) for p in self.by_module]

    def input_groups(self) -> dict[str, str]:
        """module path -> the first module (in model order) that read the same input tensor
        (LLaMA's q/k/v_proj read one hidden state: its x is kept once). Found once per
        forward: every sample of the micro-batch shares it."""
        if self._groups is None:
            self._groups = self._find_input_groups()
        return self._groups

    def sample_views(self) -> tuple[dict, dict, dict, dict]:
        """(input groups, {group: x_k}, {path: δ_k}, {param: g_k}), each a tuple of the
        samples' views [T, ...] (the kept x, δ and per-sample gradients unbound once per
        micro-batch, not indexed once per sample)."""
        if self._views is None:
            groups = self.input_groups()
            self._views = (groups,
                           {g: self.inputs[g].unbind(0) for g in set(groups.values())},
                           {p: d.unbind(0) for p, d in self.deltas.items()},
                           {n: g.unbind(0) for n, g in self.grads.items()})
        return self._views

    def _find_input_groups(self) -> dict[str, str]:
        groups, seen = {}, []
        for path in self.by_module:
            x = self.inputs[path]
            for leader in seen:
                y = self.inputs[leader]
                if (y.data_ptr(), y.shape, y.stride(), y.dtype) == \
                        (x.data_ptr(), x.shape, x.stride(), x.dtype):
                    groups[path] = leader
                    break
            else:
                groups[path] = path
                seen.append(path)
        return groups

    def _hook(self, path):
        def fwd(mod, inputs, output):
            if not output.requires_grad:   # applied without gradients: adds nothing
                return
            x = inputs[0].detach()
            self._groups = self._views = None
            # the output's place in the graph, not its values (held until the backward)
            edge = (get_gradient_edge(output), output.shape, output.dtype, output.device)
            if path in self.inputs or x.dim() != 3:   # applied again, or [n, ..., in]
                self.stacked.add(path)
                x = x.reshape(x.shape[0], -1, x.shape[-1])
                old = self.inputs.get(path)
                self.inputs[path] = x if old is None else torch.cat([old, x], 1)
                self.outputs.setdefault(path, []).append(edge)
                return
            self.inputs[path], self.outputs[path] = x, [edge]
        return fwd

    def backward(self, loss: torch.Tensor):
        """δ [n, T, out] of every module's output from one backward of ``loss``: autograd
        forms the activations' gradients only, no weight gradient (the per-sample ones are
        formed from x and δ by :meth:`form`)."""
        paths = [p for p in self.by_module if p in self.outputs]
        outs = [o for p in paths for o in self.outputs[p]]
        grads = iter(torch.autograd.grad(loss, [e for e, _, _, _ in outs], allow_unused=True))
        for p in paths:
            ds = [g.detach() if g is not None else torch.zeros(shape, dtype=dtype, device=dev)
                  for (_, shape, dtype, dev), g in zip(self.outputs[p], grads)]
            self.deltas[p] = ds[0] if p not in self.stacked else torch.cat(
                [d.reshape(d.shape[0], -1, d.shape[-1]) for d in ds], 1)
        self.outputs = {}

    def form(self, path: str):
        """The per-sample gradients of ``path``'s parameters, each through ``_keep`` (or, for
        a wide weight whose norms are all that is wanted, only its norms: :meth:`_gram_norm2`)."""
        x, delta = self.inputs[path], self.deltas[path]
        kinds, weight = self.by_module[path], f"{path}.weight"
        gram = "weight" in kinds and self._gram_norm_applies(weight, x, delta)
        if gram:
            self.norm2[weight] = self._gram_norm2(x, delta)
        elif "weight" in kinds:
            self._keep(weight, weight_grads(x, delta, transposed=self.conv1d[path]))
        if "bias" in kinds:
            wide = torch.float64 if delta.dtype == torch.float64 else torch.float32
            self._keep(f"{path}.bias", delta.sum(1, dtype=wide))

    def _gram_norm_applies(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> bool:
        """Whether ``name``'s per-sample squared norms come from Gram matrices: only its
        norms are wanted (reduce 'norms', g not kept), over every entry once, on a device
        of GRAM_NORM_DEVICES, for a projection wide against its tokens."""
        t, d_in, d_out = x.shape[1], x.shape[-1], delta.shape[-1]
        return (self.reduce == "norms" and name not in self.keep and
                self.covered.get(name) is None and x.device.type in GRAM_NORM_DEVICES and
                GRAM_NORM_RATIO * t * (d_in + d_out) <= d_in * d_out)

    def _gram_norm2(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """[n] float64 ‖Σ_t δ_t x_tᵀ‖² = Σ_{t,s} (δ_t·δ_s)(x_t·x_s) from x [n, T, in] and
        δ [n, T, out], in float64 (XXᵀ made once for the modules that read one x; pads
        have δ = 0 and add nothing). A norm at or beyond float32's largest square is
        reported infinite, as the formed float32 gradient's would be, so the sample is
        refused as non-finite, naming its layer."""
        hit = self._x_grams.get(id(x))
        if hit is None or hit[0] is not x:
            xd = x.double()
            hit = self._x_grams[id(x)] = (x, xd @ xd.transpose(1, 2))
        dd = delta.double()
        n2 = ((dd @ dd.transpose(1, 2)) * hit[1]).sum((1, 2))
        return torch.where(n2 < _FLOAT32_MAX_SQ, n2, torch.inf)

    def sample_finite(self, name: str) -> list[bool]:
        """Whether each sample's per-sample gradient of parameter ``name`` is finite
        (formed again from x and δ: the error path of reduce 'squares')."""
        reduce, self.reduce = self.reduce, None
        try:
            self.form(name.rsplit(".", 1)[0])
            return torch.isfinite(self.grads.pop(name).flatten(1)).all(1).tolist()
        finally:
            self.reduce = reduce

    def form_all(self):
        for path in self.by_module:
            self.form(path)
        self._x_grams.clear()           # XXᵀ serves the forming only

    def _keep(self, name: str, g: torch.Tensor):
        """Per-sample gradients g [n, *shape] of parameter ``name``: kept, or reduced at
        once (see the class)."""
        if self.reduce is None:
            self.grads[name] = g
        elif self.reduce == "squares":
            # exact float64 squares added in sample order, no float64 copy of g; their
            # sum is one launch reading P values (isfinite is four more, and a per-sample
            # check reads n x P): the host tests it, and only then is a sample named
            self.sq[name] = acc = square_sum(g)
            self.sq_total[name] = acc.sum()
        else:
            idx = self.covered.get(name)
            n2 = _row_norms2(g) if idx is None and g.dim() > 2 and \
                g.device.type in ROW_NORM_DEVICES else None
            if n2 is None:
                flat = g.flatten(1) if idx is None else g.flatten(1).index_select(1, idx)
                n2 = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64).square()
            self.norm2[name] = n2
            if name in self.keep:
                self.grads[name] = g

    def remove(self):
        for h in self.handles:
            h.remove()


class PerSampleGradients:
    """Computes g_i for every sample of a batch.

    Args:
        model: the transformer (kept in its dtype and device).
        indexer: maps parameters to the canonical vector [P].
        objective: per-sample loss.
        progress: show a tqdm bar over samples.
        factors: also yield each sample's x and δ (``SampleGradient.factors``; hooks).
        rows: form each sample's row g_i [P] (``SampleGradient.vector``). With ``factors``
            and ``rows=False`` no row is formed: each parameter's per-sample gradients are
            reduced to the samples' squared norms as soon as they exist (``norm``), and
            kept only for the parameters of modules that ``dense_for(path, T)`` says a
            T-token sample keeps dense. ``covered``: :func:`_coverage` of the indexer
            (computed here when not given; a caller making many engines passes it once).
    """

    def __init__(self, model: nn.Module, indexer: QKOVIndexer, objective: Objective,
                 progress: bool = False, desc: str = "per-sample gradients",
                 engine: str = "auto", micro_batch: int = 8, factors: bool = False,
                 rows: bool = True, dense_for=None, covered: dict | None = None):
        self.model, self.indexer, self.objective = model, indexer, objective
        self.factors, self.rows = bool(factors), bool(rows) or not factors
        self.dense_for = dense_for
        self.progress, self.desc = progress, desc
        self._names = indexer.param_names
        self.engine = self.choose_engine(model, objective, engine)
        self.micro_batch = int(micro_batch)
        # right-padded batches of a causal model run unmasked (padding_of)
        self._mask_pads = self.engine == "hooks" and padding_of(model) != "causal"
        if self.factors and self.engine != "hooks":
            raise ValueError("factored per-sample gradients need the 'hooks' engine (x and δ of "
                             f"each projection); engine is {self.engine!r}")
        self._covered = None if self.rows else (covered if covered is not None
                                                else _coverage(indexer))

    @staticmethod
    def choose_engine(model: nn.Module, objective: Objective, engine: str = "auto") -> str:
        if engine not in ("auto", "loop", "hooks"):
            raise ValueError(f"engine must be 'auto', 'loop' or 'hooks', got {engine!r}")
        batched_ok = type(objective).__name__ == "CausalLMObjective"
        if engine == "hooks" and not batched_ok:
            raise ValueError(f"engine 'hooks' supports causal-LM objectives only, not "
                             f"{type(objective).__name__}; use engine='loop'")
        if engine == "auto":
            return "hooks" if batched_ok and not pads_leak(model) else "loop"
        return engine

    def __call__(self, batch: dict, sample_ids: list[str]):
        """Yield one SampleGradient per sample, in batch order."""
        samples = self.objective.split(batch)
        if self.engine == "hooks":
            yield from self._hooks(samples, sample_ids)
            return
        params = dict(self.model.named_parameters())
        iterator = zip(sample_ids, samples)
        if self.progress:
            from tqdm.auto import tqdm
            iterator = tqdm(iterator, total=len(samples), desc=self.desc, leave=False)
        with attention_grads_only(self.model, self._names):
            for sid, sample in iterator:
                try:
                    loss = self.objective.loss(self.model, sample)
                except ValueError as err:
                    raise ValueError(f"sample {sid!r}: {err}") from None
                if not torch.isfinite(loss):
                    raise NonFiniteGradientError(
                        _nonfinite_loss_message(self.model, sid, loss.item()))
                grads = torch.autograd.grad(loss, [params[n] for n in self._names],
                                            allow_unused=True)
                tensors = {n: (g if g is not None else torch.zeros_like(params[n]))
                           for n, g in zip(self._names, grads)}
                vec = self.indexer.flatten({n: t.float() for n, t in tensors.items()})
                if not torch.isfinite(vec).all():
                    raise NonFiniteGradientError(
                        f"sample {sid!r}: non-finite gradient at "
                        f"{_first_bad_cell(self.indexer, vec)}")
                n_tok = int(sample["labels"].ne(-100).sum()) if "labels" in sample else 1
                yield SampleGradient(sid, vec.detach(), float(loss.detach()), n_tok)

    def _micro_batches(self, samples: list[dict], sample_ids: list[str], reduce=None,
                       form: bool = True):
        """Forward (hooks) and backward of each micro-batch, per-sample gradients formed
        (``form``; else the caller forms them) and kept or reduced (``reduce``: see
        :class:`_HookCapture`): yields (ids, capture, losses, n_tok, real) (losses, n_tok,
        real on the device)."""
        device = next(self.model.parameters()).device
        longest = max((int(s["input_ids"].numel()) for s in samples), default=0)
        chunks = range(0, len(samples), self.micro_batch)
        if self.progress:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc=self.desc, leave=False)
        with attention_grads_only(self.model, self._names):
            for start in chunks:
                ids = sample_ids[start:start + self.micro_batch]
                part = samples[start:start + self.micro_batch]
                b = _right_pad(part, device, longest)
                keep = set()
                if reduce == "norms" and self.dense_for is not None:
                    lengths = {int(s["input_ids"].numel()) for s in part}
                    keep = {n for n in self._names
                            if any(self.dense_for(n.rsplit(".", 1)[0], t) for t in lengths)}
                capture = _HookCapture(self.model, self._names, reduce, self._covered, keep,
                                       self._modules)
                try:
                    with attention_backends(device):     # no per-shape plans on CUDA
                        losses, n_tok = self._batch_losses(b)
                finally:
                    capture.remove()
                capture.backward(losses.sum())
                if form:
                    capture.form_all()
                yield ids, capture, losses, n_tok, b["attention_mask"].sum(1)

    def square_sums(self, batch: dict, sample_ids: list[str], into: torch.Tensor | None = None):
        """Fisher samples (hooks engine): each micro-batch's Σ_k g_k ⊙ g_k added into a running
        total ([P] float64 in the canonical order, on the model's device), then (the total,
        per-sample losses, predicted tokens) yielded per micro-batch; once the loop ends, the
        total holds every sample's squares.

        No per-sample row is formed: each projection's per-sample gradients are squared and
        summed as soon as they exist, and each (layer, block)'s sums go into ``total`` as
        soon as its projections are formed (:meth:`_square_entries`), so memory holds one
        projection's gradients and a few projections' sums at a time besides ``total``.
        ``into``: the caller's [P] float64 sums (a Fisher state) to add each micro-batch's
        squares to instead of a new total, once all of them are known finite (a failed
        micro-batch leaves it as it was); it is what is yielded.

        Without ``into``, on a device of LAG_DEVICES, a micro-batch's losses and finiteness
        are read on the host only once the next micro-batch is queued (the device does not
        wait for the host between micro-batches); the total yielded may then already hold
        the next micro-batch's squares. A failure discards the new total either way.

        Finiteness is read from each parameter's sum of squares (one number a parameter);
        only when one is not finite is the sample found (lagged, by running its micro-batch
        again: its capture is gone by then)."""
        if self.engine != "hooks":
            raise ValueError("square_sums needs the 'hooks' engine")
        samples = self.objective.split(batch)
        total, pending, done = into, None, 0
        lag = into is None and next(self.model.parameters()).device.type in LAG_DEVICES
        for ids, cap, losses, n_tok, _ in self._micro_batches(samples, sample_ids, "squares",
                                                              form=False):
            part_samples, done = samples[done:done + len(ids)], done + len(ids)
            if into is None:
                if total is None:
                    total = torch.zeros(self.indexer.total_size, dtype=torch.float64,
                                        device=losses.device)
                parts = ()
                for e in self._square_entries(cap):
                    self._add_squares(total[e.offset:e.offset + e.numel], cap, e)
            else:       # held until checked: small blocks, not a second [P]
                parts = [(e, self.indexer.gather(cap.sq, e.layer, e.block).reshape(-1))
                         for e in self._square_entries(cap)]
            names = [n for n in self._names if n in cap.sq_total]
            # one [2n + parameters] float64 copy: losses, predicted tokens, sums of squares
            info = start_host_copy(torch.cat([
                losses.detach().double(), n_tok.double(),
                torch.stack(on_one_device([cap.sq_total[n] for n in names], losses.device))]))
            if lag:
                del cap        # x, δ and squares: not alive through the next forward
                if pending is not None:
                    yield total, *self._checked_squares(*pending)
                pending = (ids, part_samples, names, info)
                continue
            loss_of, tok_of = self._checked_squares(ids, cap, names, info)
            for e, part in parts:
                total[e.offset:e.offset + e.numel].add_(part.to(total.device))
            del cap, parts      # x, δ and squares: not alive through the next forward
            yield total, loss_of, tok_of
        if pending is not None:
            yield total, *self._checked_squares(*pending)

    def _checked_squares(self, ids: list[str], cap_or_samples: "_HookCapture | list[dict]",
                         names: list[str], info) -> tuple[list[float], list[int]]:
        """(losses, predicted tokens) of a Fisher micro-batch from its host copy ``info``
        (losses, tokens, then each parameter's sum of squares); the error naming the first
        bad sample and parameter, found from the micro-batch's capture, or from its samples
        run again where the capture is gone."""
        info, n = host_values(info), len(ids)
        loss_of, tok_of = info[:n], info[n:2 * n]
        self._check_batch(ids, loss_of, tok_of)
        bad = [name for name, s in zip(names, info[2 * n:]) if not math.isfinite(s)]
        if bad:
            raise self._nonfinite_squares(ids, cap_or_samples, bad[0])
        return loss_of, [int(t) for t in tok_of]

    def _nonfinite_squares(self, ids: list[str], cap_or_samples, name: str
                           ) -> NonFiniteGradientError:
        """The error for parameter ``name``'s non-finite squares in micro-batch ``ids``,
        naming the sample whose gradient of ``name`` is not finite."""
        again = not isinstance(cap_or_samples, _HookCapture)
        if not again:
            ok = cap_or_samples.sample_finite(name)
        else:                                  # the capture is gone: run the samples again
            with contextlib.closing(self._micro_batches(cap_or_samples, ids, "squares",
                                                        form=False)) as runs:
                ok = next(runs)[1].sample_finite(name)
        if all(ok):       # a float64 overflow, or (run again) a nondeterministic one
            return NonFiniteGradientError(
                f"the squares of {name}'s gradients in samples {ids} do not sum to a finite "
                f"number, yet each sample's gradient is finite"
                f"{' when their micro-batch is run again' if again else ''}")
        return NonFiniteGradientError(f"sample {ids[ok.index(False)]!r}: non-finite gradient "
                                      f"of {name}")

    def _square_entries(self, cap: "_HookCapture"):
        """Form ``cap``'s projections in model order and yield each (layer, block) entry once
        all its parameters' squares (``cap.sq``, parameter-shaped float64) are formed; a
        parameter's squares are dropped when no later (layer, block) reads them."""
        for path, ready, done in self._square_plan:
            cap.form(path)
            yield from ready
            for name in done:
                del cap.sq[name]

    def _add_squares(self, dest: torch.Tensor, cap: "_HookCapture", e) -> None:
        """``dest`` (the entry's slice of a canonical total) += the entry's squares, added
        through views of ``dest`` (no head-major copy, no cat) where they share its device."""
        if all(cap.sq[p.name].device == dest.device for p in e.parts):
            self.indexer.add_gathered(dest, cap.sq, e.layer, e.block)
        else:                                  # a model placed over several devices
            dest.add_(self.indexer.gather(cap.sq, e.layer, e.block).reshape(-1).to(dest.device))

    @functools.cached_property
    def _modules(self) -> dict[str, nn.Module]:
        """path -> module of the model, walked once per engine, not once per micro-batch."""
        return dict(self.model.named_modules())

    @functools.cached_property
    def _square_plan(self) -> list[tuple[str, list, list[str]]]:
        """[(module path, the entries complete once it is formed, the parameters no later
        entry reads)] in the order :class:`_HookCapture` forms its modules."""
        paths = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in self._names))
        pos = {p: k for k, p in enumerate(paths)}
        last = lambda names: max(pos[n.rsplit(".", 1)[0]] for n in names)  # noqa: E731
        ready, done = [[] for _ in paths], [[] for _ in paths]
        freed_at = {}          # parameter -> where the last entry reading it is complete
        for e in self.indexer.entries.values():
            at = last(p.name for p in e.parts)
            ready[at].append(e)
            for p in e.parts:
                freed_at[p.name] = max(freed_at.get(p.name, at), at)
        for name, at in freed_at.items():
            done[at].append(name)
        return list(zip(paths, ready, done))

    def _hooks(self, samples: list[dict], sample_ids: list[str]):
        """Batched engine: micro-batches of right-padded samples, Σ_k L_k backward once.
        One device-to-host transfer per micro-batch (losses, token counts, each row's sum).

        On a device of LAG_DEVICES (and without factors), a micro-batch's rows are checked
        and yielded once the next micro-batch's forward and backward are queued, and that
        one's gradients are formed only after: its activations live beside the previous
        rows [m, P] instead of beside its own per-sample gradients, the same bytes, so the
        memory plan (collect.pass_memory) holds, while the device works through the host's
        read instead of waiting for its next launches."""
        if not self.rows:
            yield from self._factored(samples, sample_ids)
            return
        lag = not self.factors and next(self.model.parameters()).device.type in LAG_DEVICES
        pending = None
        for ids, capture, losses, n_tok, real in self._micro_batches(samples, sample_ids,
                                                                     form=not lag):
            if pending is not None:
                yield from self._dense_samples(*pending)
                pending = None       # its rows: freed before this micro-batch's gradients
            if lag:
                capture.form_all()
            rows = self.indexer.flatten_rows(capture.grads)
            # a row holds a NaN/Inf iff its float64 sum does (float32 values cannot
            # overflow it): one read of the rows, tested on the host
            info = start_host_copy(torch.stack([
                losses.detach().double(), n_tok.double(), real.double(),
                rows.sum(1, dtype=torch.float64).to(losses.device)]))
            pending = (ids, capture if self.factors else None, rows, info)
            del capture, rows    # only ``pending`` keeps the rows (and factors' capture)
            if not lag:
                yield from self._dense_samples(*pending)
                pending = None
        if pending is not None:
            yield from self._dense_samples(*pending)

    def _dense_samples(self, ids: list[str], capture: "_HookCapture | None",
                       rows: torch.Tensor, info):
        """:meth:`_hooks`'s SampleGradients of one micro-batch (rows [m, P]), checked."""
        loss_of, tok_of, real_of, sums = host_values(info)
        self._check_batch(ids, loss_of, tok_of)
        for k, sid in enumerate(ids):
            if not math.isfinite(sums[k]):
                raise NonFiniteGradientError(
                    f"sample {sid!r}: non-finite gradient at "
                    f"{_first_bad_cell(self.indexer, rows[k].cpu())}")
            factors = self._factors_of(capture, k, int(real_of[k])) if self.factors else None
            yield SampleGradient(sid, rows[k].detach(), loss_of[k], int(tok_of[k]), factors)

    def _factored(self, samples: list[dict], sample_ids: list[str]):
        """Stored samples of a factored store: x, δ and the norm of g_i, no row [P] (each
        parameter's per-sample gradients are reduced to squared norms when formed). On a
        device of LAG_DEVICES a micro-batch's samples are yielded once the next one is
        queued, unless its capture holds dense per-sample gradients (two micro-batches of
        those would exceed what the memory plan allows)."""
        pending = None
        for ids, capture, losses, n_tok, real in self._micro_batches(samples, sample_ids,
                                                                     "norms"):
            names = [n for n in self._names if n in capture.norm2]
            norm2 = torch.stack(on_one_device([capture.norm2[n] for n in names],
                                              losses.device))             # [params, n]
            info = start_host_copy(torch.cat([torch.stack([
                losses.detach().double(), n_tok.double(), real.double()]),
                norm2.sum(0, keepdim=True)]))
            if pending is not None:
                yield from self._factored_samples(*pending)
            pending = (ids, capture, names, norm2, info)
            if losses.device.type not in LAG_DEVICES or capture.grads:
                yield from self._factored_samples(*pending)
                pending = None
            del capture, norm2   # only ``pending`` keeps them through the next forward
        if pending is not None:
            yield from self._factored_samples(*pending)

    def _factored_samples(self, ids, capture, names, norm2, info):
        """:meth:`_factored`'s SampleGradients of one micro-batch, checked."""
        loss_of, tok_of, real_of, total = host_values(info)
        self._check_batch(ids, loss_of, tok_of)
        for k, sid in enumerate(ids):
            if not math.isfinite(total[k]):
                bad = {n for n, v in zip(names, norm2[:, k].tolist()) if not math.isfinite(v)}
                where = next((f"layer {l} block {b}" for (l, b), e in
                              self.indexer.entries.items()
                              if any(p.name in bad for p in e.parts)), "unknown location")
                raise NonFiniteGradientError(f"sample {sid!r}: non-finite gradient at {where}")
            yield SampleGradient(sid, None, loss_of[k], int(tok_of[k]),
                                 self._factors_of(capture, k, int(real_of[k])),
                                 norm=math.sqrt(total[k]))

    def _factors_of(self, capture: "_HookCapture", k: int, t: int) -> dict:
        """Sample ``k``'s factors: its own ``t`` tokens (right padding) of x and δ, and its
        per-sample gradients that the capture kept."""
        if capture.stacked:
            raise ValueError(f"per-sample factors need each module applied once per forward "
                             f"to [n, T, in]; {sorted(capture.stacked)[:3]} are not: use "
                             "a dense gradient store")
        groups, xs, ds, gs = capture.sample_views()
        padded = next(iter(xs.values()))[k].shape[0] != t      # one T per micro-batch
        own = (lambda v: v[k][:t]) if padded else (lambda v: v[k])  # noqa: E731
        return {"T": t, "groups": groups, "x": {g: own(v) for g, v in xs.items()},
                "delta": {p: own(v) for p, v in ds.items()},
                "grads": {n: v[k] for n, v in gs.items()}}

    def _batch_losses(self, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample losses [n] float32, predicted tokens [n]) of a right-padded batch,
        on the device, without a host sync (checked after the backward: _check_batch)."""
        mask = {"attention_mask": b["attention_mask"]} if self._mask_pads else {}
        # position t predicts label t+1: the labels shift, the logits stay whole (a slice
        # [:, :-1] of them would be copied by the reshape, and again in the backward)
        labels = torch.nn.functional.pad(b["labels"][:, 1:], (0, 1), value=-100)
        keep = labels != -100
        n_tok = keep.sum(1)
        target = labels.reshape(-1).clamp_min(0)
        head = plain_lm_head(self.model)
        if head is not None and frozen(head):                      # no [n, T, V] logits
            hidden = self.model.base_model(input_ids=b["input_ids"], **mask).last_hidden_state
            at = head.weight.device       # the head's, on a model placed over several
            nll = head_token_nll(hidden.reshape(-1, hidden.shape[-1]).to(at), head,
                                 target.to(at)).to(labels.device)
        else:
            logits = self.model(input_ids=b["input_ids"], **mask).logits      # [n, T, V]
            nll = token_nll(logits.reshape(-1, logits.shape[-1]), target)
        nll = nll.view(labels.shape)
        per = (nll * keep).sum(1)
        return (per / n_tok if self.objective.loss_reduction == "mean" else per), n_tok

    def _check_batch(self, ids: list[str], losses: list[float], n_tok: list[float]):
        """A sample without predicted tokens, then a non-finite loss, is an error naming it."""
        for sid, n in zip(ids, n_tok):
            if n == 0:
                raise ValueError(f"sample {sid!r}: sample has no predicted tokens")
        for sid, loss in zip(ids, losses):
            if not math.isfinite(loss):
                raise NonFiniteGradientError(_nonfinite_loss_message(self.model, sid, loss))
