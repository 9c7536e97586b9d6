"""The functional proof of a layout (SPEC section 2), run when a model is first prepared.

For one layer and each checked query head h, the proof changes S(B, l, h) alone and looks
at what the model computes, in float64:

- Q, K, V: head h's rows (and their bias entries) are rotated by a random orthogonal
  matrix that fixes the all-ones vector, so every norm over the whole projection (OLMo 2's
  q_norm, a LayerNorm) is unchanged and only head h's own values move. Expected: the
  attention probabilities change for head h only (Q) or for the heads of group kv(h) (K)
  and not at all (V); the O module's input (the context vectors, chunked per head) changes
  for h (Q) or group kv(h) (K, V) only; earlier layers do not change. Without attention
  probabilities (a model that does not return them) V is told from Q/K by its rotation
  keeping every changed context vector's norm.
- O: inputs whose only non-zero chunk is head h' go through the O module; after changing
  O's slice of head h only the output for h' = h may move.

``prove_layout`` runs it on a given model; ``prove_first_contact`` on a float64 copy of the
model's config shrunk to 2 layers (same widths and module code, random weights), which is
what ``interference.models.describe`` calls before anything is collected.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import time

import torch
import torch.nn as nn

from .config import QKOVConfig
from .generic import stack_role
from .indexer import REGISTER_HINT, QKOVIndexer
from .registry import weight2d

# relative change counted as zero / as a real move, by the dtype the proof runs in: in
# float64, zero up to float32 norms inside float64 models; float32 only for families whose
# code cannot run in float64 (``prove_copy``)
TOLERANCES = {torch.float64: (1e-6, 1e-4), torch.float32: (1e-5, 1e-3)}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
# config keys of feed-forward widths that shrunk_copy narrows to MLP_WIDTH (the attention
# layout never reads them): LLaMA-likes, GPT-2 (n_inner), OPT / BART (ffn_dim), T5 (d_ff)
MLP_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim",
            "d_ff", "ffn_hidden_size", "moe_intermediate_size",
            "shared_expert_intermediate_size")
MLP_WIDTH = 64


class LayoutProofError(ValueError):
    """The layout's head slices do not act as SPEC section 2 says on the model.
    ``too_small``: no wrong head moved, but an expected change was too small to tell."""

    def __init__(self, message: str, too_small: bool = False):
        super().__init__(message)
        self.too_small = too_small


@functools.lru_cache(maxsize=8)
def _rotation(n: int, seed: int = 0) -> torch.Tensor:
    """[n, n] float64 orthogonal matrix with R·1 = 1, random (seeded), far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    ones = torch.ones(n, 1, dtype=torch.float64) / n ** 0.5
    basis = torch.linalg.qr(torch.cat([ones, torch.randn(n, n - 1, generator=gen,
                                                         dtype=torch.float64)], 1))[0][:, 1:]
    m = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=gen, dtype=torch.float64))[0]
    if n == 2:   # the one orthogonal map of R² fixing 1 other than the identity: the swap
        m = -torch.ones(1, 1, dtype=torch.float64)
    return torch.eye(n, dtype=torch.float64) - basis @ basis.T + basis @ m @ basis.T


@contextlib.contextmanager
def _restored(model: nn.Module, names):
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    try:
        yield params
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


def _rotate_rows(model, idx: QKOVIndexer, layer: int, block: str, row: int, seed: int):
    """Rotate the rows of head slice ``row`` of (layer, block), weight and bias together."""
    part = idx.entry(layer, block).parts[0]
    module = model.get_submodule(part.name.rsplit(".", 1)[0])
    rows = part.index[row * part.size:(row + 1) * part.size]
    R = _rotation(part.size).to(module.weight.dtype)
    with torch.no_grad():
        w = weight2d(module).T if part.transposed else weight2d(module)
        w[rows] = R @ w[rows]
        if getattr(module, "bias", None) is not None:
            module.bias[rows] = R @ module.bias[rows]
    return [n for n in (f"{part.name.rsplit('.', 1)[0]}.weight",
                        f"{part.name.rsplit('.', 1)[0]}.bias") if n in dict(model.named_parameters())]


_STACK_ATTENTIONS = {"decoder_self": "decoder_attentions", "encoder": "encoder_attentions",
                     "decoder_cross": "cross_attentions"}


def _attentions(out, o_path: str):
    """The model output's attention probabilities of the mapped stack: ``attentions``, or
    for an encoder-decoder the encoder's, decoder's or cross-attention's by ``o_path``."""
    att = getattr(out, "attentions", None)
    role = stack_role(o_path)
    if att is None and role is not None:
        att = getattr(out, _STACK_ATTENTIONS[role], None)
    return att


def _are_probabilities(a) -> bool:
    """True for attention probabilities [1, H, T, T'] whose rows sum to 1 (YOSO returns
    its context as 'attentions': not probabilities, so not observed)."""
    return (isinstance(a, torch.Tensor) and a.dim() == 4 and
            bool(torch.allclose(a.sum(-1), torch.ones((), dtype=a.dtype), atol=1e-3)))


def _forward(model, inputs, o_paths):
    """(attention probabilities {layer: [H, T, T]} or None, O inputs {layer: [T, H·d_v]}).

    An O module that runs more than once per forward (ALBERT's layer applied at every
    depth, ProphetNet's main and predict streams) is observed at its FIRST application:
    its input there depends on no later application."""
    ctx, order, hooks = {}, [], []

    def keep(layer, module, args):
        if layer not in ctx:   # [T, H·d_v]; channels first [H·d_v, T] for an nn.Conv1d
            x = args[0].detach()[0]
            ctx[layer] = (x.T if isinstance(module, nn.Conv1d) else x).clone()
        order.append(layer)

    for layer, path in o_paths.items():
        hooks.append(model.get_submodule(path).register_forward_pre_hook(
            lambda m, a, layer=layer: keep(layer, m, a)))
    try:
        with torch.no_grad():
            try:
                out = model(**inputs, output_attentions=True)
                att = _attentions(out, next(iter(o_paths.values()), ""))
            except (TypeError, ValueError):
                out, att = model(**inputs), None
    finally:
        for h in hooks:
            h.remove()
    probs = None   # layer id -> [H, T, T]; None when not returned one per attention call
    if att and all(_are_probabilities(a) for a in att):
        if len(att) == len(o_paths):
            probs = {l: a[0] for l, a in zip(sorted(o_paths), att)}
        elif len(att) == len(order):   # one per application: the first one's
            probs = {l: att[order.index(l)][0] for l in o_paths}
    return probs, ctx


def _moved(a: torch.Tensor, b: torch.Tensor, where: str) -> set[int]:
    """Heads (leading axis) whose values moved; LayoutProofError on an in-between size."""
    zero, clear = TOLERANCES.get(b.dtype, TOLERANCES[torch.float64])
    d = (a - b).abs().flatten(1).amax(1) / (b.abs().max() + 1e-300)
    if bool(((d > zero) & (d < clear)).any()):
        raise LayoutProofError(f"{where}: changes of relative size {d.tolist()} are neither "
                               f"zero (<= {zero}) nor clear (>= {clear}) in {b.dtype}",
                               too_small=True)
    return {int(h) for h in torch.nonzero(d >= clear).flatten()}


def default_inputs(model: nn.Module, n_tokens: int = 6, seed: int = 11) -> dict:
    """One sample's forward inputs from ``model.main_input_name`` and its config."""
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    name = getattr(model, "main_input_name", "input_ids")
    cfg = getattr(cfg, "vision_config", None) or cfg if name == "pixel_values" else cfg
    dtype = next(model.parameters()).dtype
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 8)
        size = size if isinstance(size, (list, tuple)) else (size, size)
        shape = (1, getattr(cfg, "num_channels", 3), *size)
        if hasattr(cfg, "num_frames"):
            shape = (1, cfg.num_frames, *shape[1:])
        return {"pixel_values": torch.randn(*shape, generator=g, dtype=dtype)}
    vocab = int(getattr(cfg, "vocab_size", 100) or 100)
    low = min(5, vocab - 1)
    return {"input_ids": torch.randint(low, max(low + 1, min(vocab, 1000)), (1, n_tokens),
                                       generator=g)}


def _common_scale_out(new: torch.Tensor, old: torch.Tensor, want: set[int]) -> torch.Tensor:
    """``new`` [H, T, d_v] divided by one factor per token when that factor alone explains
    every head outside ``want`` (a norm over all heads' context before O, BitNet's
    attn_sub_norm: a changed head rescales the others); else ``new`` unchanged. A head that
    really moved outside ``want`` leaves a residual, so nothing is divided out."""
    others = [g for g in range(new.shape[0]) if g not in want]
    if not others:
        return new
    zero = TOLERANCES.get(old.dtype, TOLERANCES[torch.float64])[0]
    a, b = new[others], old[others]
    den = (b * b).sum((0, 2))
    scale = torch.where(den > 0, (a * b).sum((0, 2)) / den.clamp_min(1e-300), 1.0)   # [T]
    residual = (a - scale[None, :, None] * b).abs().max() / (old.abs().max() + 1e-300)
    if residual <= zero and bool(((scale - 1).abs() > zero).any()):
        return new / scale[None, :, None]
    return new


def _check_rows(model, idx, inputs, layer, h, block, base, seed) -> None:
    cfg = idx.config.at_layer(layer)
    p = cfg.group_size
    want = {h} if block == "Q" else {g for g in range(cfg.num_heads) if g // p == h // p}
    row = cfg.kv_head(h) if block in "KV" else h
    probs0, ctx0 = base
    part = idx.entry(layer, block).parts[0]
    with _restored(model, [part.name] + [n for n in (part.name[:-6] + "bias",)
                                         if n in dict(model.named_parameters())]):
        _rotate_rows(model, idx, layer, block, row, seed)
        probs, ctx = _forward(model, inputs, idx_o_paths(idx))
    where = f"L{layer} {block} head {h}"
    chunks = lambda c: c.reshape(-1, cfg.num_heads, cfg.v_head_dim).transpose(0, 1)
    seen = {}
    for lower in (l for l in ctx0 if l < layer):
        if not torch.equal(ctx[lower], ctx0[lower]):
            seen["earlier layer"] = f"L{lower} changed"
    new, old = chunks(ctx[layer]), chunks(ctx0[layer])
    got_ctx = _moved(_common_scale_out(new, old, want), old, where + " context")
    if got_ctx != want:
        seen["context heads changed"] = sorted(got_ctx)
    if probs0 is not None:
        got_p = _moved(probs[layer], probs0[layer], where + " attention probabilities")
        if got_p != (set() if block == "V" else want):
            seen["attention heads changed"] = sorted(got_p)
    else:   # V turns its heads' context by its rotation R (the context is linear in V,
        # and stays so through a norm after it: YOSO); Q and K do not
        raw_new, raw_old = chunks(ctx[layer])[sorted(want)], chunks(ctx0[layer])[sorted(want)]
        R = _rotation(cfg.v_head_dim).to(raw_old.dtype)
        zero = TOLERANCES.get(raw_old.dtype, TOLERANCES[torch.float64])[0]
        turned = bool(((raw_new - raw_old @ R.T).abs().max()
                       <= zero * (raw_old.abs().max() + 1e-300)))
        if turned != (block == "V"):
            seen["context turned by the V rotation"] = turned
    if seen:
        expect = (f"attention probabilities of heads {sorted(want)} and context of heads "
                  f"{sorted(want)}" if block != "V" else
                  f"no attention probability, context of heads {sorted(want)}")
        small = "earlier layer" not in seen and got_ctx <= want and (
            probs0 is None or got_p <= (set() if block == "V" else want))
        raise LayoutProofError(f"{where}: expected {expect} to change, saw {seen}",
                               too_small=small)


def idx_o_paths(idx: QKOVIndexer) -> dict[int, str]:
    """Layer -> path of its O module."""
    return {l: idx.entry(l, "O").parts[0].name.rsplit(".", 1)[0] for l in idx.layers}


def _output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for x [n, T, in]; the first element when it returns a tuple (I-BERT's
    QuantLinear returns (output, scaling factor)); an nn.Conv1d reads [n, in, T]."""
    if isinstance(module, nn.Conv1d):
        return module(x.transpose(1, 2)).transpose(1, 2)
    y = module(x)
    return y[0] if isinstance(y, tuple) else y


def _check_o(model, idx, layer, h, seed) -> None:
    cfg = idx.config.at_layer(layer)
    H, dv = cfg.num_heads, cfg.v_head_dim
    o_mod = model.get_submodule(idx_o_paths(idx)[layer])
    S = idx.head_param_indices(layer, "O", h)
    g = torch.Generator().manual_seed(seed)
    dtype = o_mod.weight.dtype
    clear = TOLERANCES.get(dtype, TOLERANCES[torch.float64])[1]
    x = torch.zeros(H, 3, H * dv, dtype=dtype)   # probe hp: random inputs of head hp only
    for hp in range(H):
        x[hp, :, hp * dv:(hp + 1) * dv] = torch.randn(3, dv, generator=g, dtype=dtype)
    with torch.no_grad():   # one batch of H probes: the weight is read once, not H times
        y0 = _output(o_mod, x)
    with _restored(model, list(S)) as params, torch.no_grad():
        for name, ix in S.items():
            flat = params[name].view(-1)
            flat[ix] += torch.randn(len(ix), generator=g, dtype=dtype)
        change = (_output(o_mod, x) - y0).abs().flatten(1).amax(1)
    moved = set((change > clear * (y0.abs().flatten(1).amax(1) + 1)).nonzero()[:, 0].tolist())
    if moved != {h}:
        raise LayoutProofError(f"L{layer} O head {h}: expected only inputs of head {h} to "
                               f"move the output, saw heads {sorted(moved)}")


def checked_heads(cfg: QKOVConfig, limit: int = 16) -> list[int]:
    """All heads up to ``limit``; beyond, the first and last of the first, second and
    last groups and the middle head."""
    H, p = cfg.num_heads, cfg.group_size
    if H <= limit:
        return list(range(H))
    return sorted({0, 1, p - 1, p, min(2 * p - 1, H - 1), H // 2, H - p, H - 1})


def prove_layout(model: nn.Module, config: QKOVConfig | None = None, inputs: dict | None = None,
                 layer: int | None = None, heads: list[int] | None = None) -> dict:
    """Run the proof on ``model`` (best in float64; its weights are restored afterwards).

    Returns {layout, layer, heads, observables, n_forwards, seconds}; raises
    LayoutProofError naming the family, what was expected and what was seen.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one sample of a few tokens: threads only wait on each other
    try:
        return _prove(model, config, inputs, layer, heads)
    finally:
        torch.set_num_threads(threads)


def _prove(model, config, inputs, layer, heads) -> dict:
    t0 = time.perf_counter()
    model.eval()
    idx = QKOVIndexer(model, config)
    cfg = idx.config
    layer = idx.layers[-1] if layer is None else layer
    heads = checked_heads(cfg) if heads is None else list(heads)
    inputs = default_inputs(model) if inputs is None else inputs
    base = _forward(model, inputs, idx_o_paths(idx))
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    try:
        for h in heads:
            for block in "QKV":
                _check_rows(model, idx, inputs, layer, h, block, base, seed=1000 + h)
            _check_o(model, idx, layer, h, seed=2000 + h)
    except LayoutProofError as err:
        raise LayoutProofError(
            f"attention layout {idx.adapter.name!r} of {family} ({type(model).__name__}) "
            f"failed its functional proof: {err}. The head slices were misread, so no "
            f"gradient is collected. {REGISTER_HINT}", too_small=err.too_small) from None
    return {"layout": idx.adapter.name, "family": family, "layer": layer, "heads": heads,
            "observables": "probs+context" if base[0] is not None else "context",
            "n_forwards": 1 + 3 * len(heads), "seconds": time.perf_counter() - t0}


def shrunk_copy(model: nn.Module, n_layers: int = 2, seed: int = 0,
                dtype: torch.dtype = torch.float64,
                attn_implementation: str | None = "eager",
                device: torch.device | str = "cpu") -> nn.Module | None:
    """A ``dtype`` (float64), random-init, eval-mode model of the same class and config
    with at most ``n_layers`` layers (per-layer lists cut to match), at most 512 tokens of
    vocabulary and feed-forward widths (:data:`MLP_KEYS`) of at most
    :data:`MLP_WIDTH`: the attention widths and heads unchanged, so the layout and what
    its proof looks at are the model's (the proof of a LLaMA-2-7B shape on one CPU thread:
    28 s instead of 54 s). ``attn_implementation``: 'eager' (probabilities
    returned), or None for the model's own. ``device``: where it is built and initialised
    (a 7B shape's copy takes about 1.2 s of CPU initialisation). When the narrow
    feed-forward cannot be built the widths are kept; None when no copy can be built."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    small = copy.deepcopy(cfg)
    key = next((k for k in LAYER_KEYS if isinstance(getattr(small, k, None), int)), None)
    if key is None:
        return None
    old = getattr(small, key)
    setattr(small, key, min(n_layers, old))
    for name, value in list(vars(small).items()):
        if isinstance(value, list) and len(value) == old and old > n_layers:
            setattr(small, name, value[:n_layers])
    if isinstance(getattr(small, "vocab_size", None), int) and small.vocab_size > 512:
        small.vocab_size = 512           # the layout does not depend on the vocabulary
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
                     "cls_token_id", "mask_token_id", "decoder_start_token_id"):
            if isinstance(getattr(small, name, None), int) and getattr(small, name) >= 512:
                setattr(small, name, 511)
    if attn_implementation is not None:
        small._attn_implementation = attn_implementation
    small._experts_implementation = "eager"
    if hasattr(small, "quantization_config"):
        delattr(small, "quantization_config")
    wide = [k for k in MLP_KEYS
            if isinstance(getattr(small, k, None), int) and getattr(small, k) > MLP_WIDTH
            or k == "n_inner" and hasattr(small, k) and getattr(small, k) is None]
    configs = [small]
    if wide:
        narrow = copy.deepcopy(small)
        for k in wide:
            setattr(narrow, k, MLP_WIDTH)
        configs.insert(0, narrow)
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    for conf in configs:
        try:
            with torch.random.fork_rng(devices=cuda), device:
                torch.manual_seed(seed)
                return type(model)(conf).to(dtype).eval()
        except Exception:   # noqa: BLE001 - the next config, then: prove the model
            continue
    return None


def float64_copy(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A float64 (or ``dtype``), eval-mode copy with eager attention and eager MoE experts
    (the grouped matmul kernels take no float64)."""
    probe = copy.deepcopy(model)
    cfg = getattr(probe, "config", None)
    if cfg is not None:
        for key in ("_attn_implementation", "_experts_implementation"):
            try:
                setattr(cfg, key, "eager")
            except (AttributeError, ValueError, TypeError):
                pass
    return probe.to(dtype).eval()


SHARPEN, RETRIES = 4.0, 3   # Q and K scale per retry when changes were too small to tell


def _sharpen(model: nn.Module, idx: QKOVIndexer, factor: float) -> None:
    """Scale every head's Q and K rows (and bias entries) of every mapped layer by
    ``factor``: attention logits x factor², sharper probabilities; no slice moves."""
    with torch.no_grad():
        for (layer, block), entry in idx.entries.items():
            if block not in "QK":
                continue
            part = entry.parts[0]
            module = model.get_submodule(part.name.rsplit(".", 1)[0])
            w = weight2d(module).T if part.transposed else weight2d(module)
            w[part.index] *= factor
            if getattr(module, "bias", None) is not None:
                module.bias[part.index] *= factor


def _prove_or_sharpen(probe: nn.Module, config, heads) -> dict:
    """``prove_layout``; while it fails only because an expected change was too small to
    tell (near-uniform attention of small random weights), up to ``RETRIES`` times more,
    each with the Q and K rows scaled by ``SHARPEN`` again (logits x 16 per retry)."""
    for retry in range(RETRIES + 1):
        try:
            out = prove_layout(probe, config, heads=heads)
            return {**out, "sharpened": SHARPEN ** retry} if retry else out
        except LayoutProofError as err:
            if not err.too_small or retry == RETRIES:
                raise
        _sharpen(probe, QKOVIndexer(probe, config), SHARPEN)


def prove_copy(model: nn.Module, config: QKOVConfig | None = None,
               heads: list[int] | None = None) -> dict:
    """The proof on a float64 copy of ``model``; when the family's code cannot run in
    float64 (its forward raises, e.g. a float32 constant or mask inside the module), on a
    float32 copy with the looser float32 ``TOLERANCES``. The result's ``dtype`` says
    which; ``sharpened`` is set when the retry of ``_prove_or_sharpen`` was needed."""
    try:
        return {**_prove_or_sharpen(float64_copy(model), config, heads), "dtype": "float64"}
    except LayoutProofError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as err64:
        try:
            out = _prove_or_sharpen(float64_copy(model, torch.float32), config, heads)
        except LayoutProofError:
            raise
        except Exception:   # noqa: BLE001 - fails in float32 too: report the float64 error
            raise err64 from None
        return {**out, "dtype": "float32",
                "float64_error": f"{type(err64).__name__}: {str(err64)[:200]}"}


def prove_first_contact(model: nn.Module, include_bias: bool = False,
                        attention_stack: str | None = None) -> dict:
    """The proof (``prove_copy``: float64, float32 where the family cannot run in float64)
    on the shrunk copy, or when it cannot be built on a copy of the model itself; its
    layout and geometry must equal the model's. ``attention_stack``: the stack of an
    encoder-decoder (QKOVConfig.from_model)."""
    real = QKOVConfig.from_model(model, include_bias=include_bias,
                                 attention_stack=attention_stack)
    probe = shrunk_copy(model)
    target = "shrunk copy"
    if probe is None:
        probe, target = model, "model"
    cfg = QKOVConfig.from_model(probe, include_bias=include_bias,
                                attention_stack=attention_stack)
    same = lambda c: (c.layout, c.num_heads, c.num_kv_heads, c.head_dim, c.v_head_dim,
                      c.hidden_dim)
    if same(cfg) != same(real):
        raise LayoutProofError(f"the {target} reads as {same(cfg)}, the model as {same(real)}")
    return {**prove_copy(probe, cfg), "on": target}
