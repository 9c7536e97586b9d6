"""Per-sample objectives: the loss of ONE sample alone (SPEC section 3).

Like kronfluence's ``Task``, an objective is the one seam between a model family and the
engine: ``split(batch)`` turns a padded batch into per-sample inputs (padding removed),
``loss(model, sample)`` returns that sample's scalar loss. Register new ones with
``@register_objective``; a class may define ``accepts(model)`` (picked by
``default_objective``) and ``for_model(model, **kwargs)`` (built from the model's config).

Registered objectives and their batches (n samples, T padded positions):

=================== ================================================= =====================
name                batch keys                                        models
=================== ================================================= =====================
causal_lm           input_ids, attention_mask, [labels]               *ForCausalLM, GPT-2
masked_lm           input_ids, attention_mask, [token_type_ids,       *ForMaskedLM (BERT)
                    special_tokens_mask, labels]
pair_cosine         input_ids, attention_mask, segment_ids            encoders without a
                                                                      head (BertModel,
                                                                      all-MiniLM)
image_classification pixel_values [n, C, H, W] (or [n, F, C, H, W]),  *ForImage/Video-
                    labels [n]                                        Classification (ViT)
=================== ================================================= =====================

Every batch may carry ``sample_ids`` (n dataset ids). Random parts (masked-LM masking) are
seeded by (seed, sample id) alone, never by the batch.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

OBJECTIVES: dict[str, type["Objective"]] = {}


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 for the loss, or float64 where it already is (never downcast)."""
    return t if t.dtype == torch.float64 else t.float()


class _TokenNLL(torch.autograd.Function):
    """-log softmax(logits)[target] per row, float32, without the [rows, V] log-probabilities
    that ``F.cross_entropy`` keeps for its backward and the two [rows, V] gradients its
    backward forms: saves the logits (alive anyway) and their log-sum-exp, and forms the
    gradient softmax - onehot once, a block of rows at a time."""

    @staticmethod
    def forward(ctx, logits, target):                       # [rows, V], [rows]
        lse = torch.cat([torch.logsumexp(upcast(c), -1)
                         for c in logits.split(_block_rows(logits))])
        ctx.save_for_backward(logits, target, lse)
        return lse - upcast(logits.gather(-1, target[:, None])[:, 0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):                            # [rows]
        logits, target, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        blocks = (t.split(_block_rows(logits)) for t in (logits, target, lse, grad_out, grad))
        for x, t, l, go, out in zip(*blocks):
            g = (upcast(x) - l[:, None]).exp_()
            g.scatter_add_(-1, t[:, None], g.new_full((len(x), 1), -1.0))
            out.copy_(g.mul_(go[:, None]))
        return grad, None


def _block_rows(t: torch.Tensor) -> int:
    """Rows of ``t`` [rows, V] per block (:func:`block_rows`)."""
    return block_rows(t.shape[-1], t.is_cuda)


def block_rows(vocab: int, cuda: bool) -> int:
    """Rows of [rows, ``vocab``] logits per block of the loss: about 32 MB in float32 (256 MB
    on a GPU, where each block's kernel launches cost more than its memory)."""
    return max(1, (1 << (28 if cuda else 25)) // (4 * vocab))


def token_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood per row, float32 [rows] (float64 logits: float64).

    logits [rows, V] (any float dtype), target [rows] in [0, V). Equals
    ``F.cross_entropy(upcast(logits), target, reduction='none')`` (tests/test_engine.py),
    with at most the logits and one gradient of their size in memory instead of up to four
    (a micro-batch of 8 x 128 tokens over SmolLM2's 49,152 words: 200 MB each)."""
    return _TokenNLL.apply(logits, target)


class _HeadTokenNLL(torch.autograd.Function):
    """token_nll(hidden @ weightᵀ + bias, target) without the [rows, V] logits: each block of
    rows' logits are formed, reduced to -log softmax[target] and, when a gradient is wanted,
    to that row's gradient w.r.t. ``hidden`` ((softmax - onehot) @ weight), then freed. Only
    the [rows, d] gradient is kept for the backward (it scales it by the incoming one)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target):   # [rows, d], [V, d], [V] | None, [rows]
        nll = hidden.new_empty(len(hidden), dtype=upcast(hidden[:0]).dtype)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        step = block_rows(weight.shape[0], hidden.is_cuda)
        for k in range(0, len(hidden), step):
            x = upcast(F.linear(hidden[k:k + step], weight, bias))        # [b, V], fresh
            t = target[k:k + step, None]
            lse = torch.logsumexp(x, -1)
            nll[k:k + step] = lse - x.gather(-1, t)[:, 0]
            if grad is not None:      # x becomes softmax - onehot in place
                x.sub_(lse[:, None]).exp_().scatter_add_(-1, t, x.new_full(t.shape, -1.0))
                torch.mm(x.to(weight.dtype), weight, out=grad[k:k + step])
            del x                     # one block alive at a time, not two
        if grad is not None:
            ctx.save_for_backward(grad)
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):                            # [rows]
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None, None


def head_token_nll(hidden: torch.Tensor, head: nn.Linear, target: torch.Tensor
                   ) -> torch.Tensor:
    """``token_nll(head(hidden), target)`` [rows] without ever holding the [rows, V] logits
    (hidden [rows, d] in the model dtype, ``head`` the output projection, frozen): the
    forward forms each block's logits, loss and gradient w.r.t. ``hidden`` and keeps the
    gradient only ([rows, d]; SmolLM2's logits for 8 x 125 tokens are 197 MB, their gradient
    as much again). Equals the two-step path within float rounding (tests/test_engine.py)."""
    if not frozen(head):
        raise ValueError("head_token_nll needs a frozen output projection (no gradient of "
                         "its weight is formed)")
    return _HeadTokenNLL.apply(hidden, head.weight, head.bias, target)


def frozen(module: nn.Module) -> bool:
    """Whether no parameter of ``module`` wants a gradient."""
    return not any(p.requires_grad for p in module.parameters())


# model types whose causal-LM logits are exactly ``lm_head(base_model(...).last_hidden_state)``
# (no scaling or soft-capping of the logits in transformers' *ForCausalLM.forward)
PLAIN_HEAD_TYPES = frozenset({
    "gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt_neox", "phi", "phi3",
    "opt", "gemma", "gptj", "olmo", "olmo2", "stablelm", "starcoder2", "smollm3"})


def plain_lm_head(model: nn.Module) -> nn.Linear | None:
    """The output projection of a causal LM whose logits are ``head(model.base_model(
    input_ids, attention_mask).last_hidden_state)`` (``PLAIN_HEAD_TYPES``), else None."""
    cfg = getattr(model, "config", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if (getattr(cfg, "model_type", None) not in PLAIN_HEAD_TYPES or get_head is None
            or getattr(model, "base_model", model) is model
            or not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))):
        return None
    head = get_head()
    return head if type(head) is nn.Linear else None


def register_objective(cls):
    OBJECTIVES[cls.name] = cls
    return cls


def sample_ids_of(batch: dict, task: str, n: int, start: int) -> list[str]:
    """Dataset ids of the batch's samples: ``batch['sample_ids']`` or ``'{task}:{k}'``."""
    ids = batch.get("sample_ids")
    if ids is None:
        return [f"{task}:{start + k}" for k in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"batch has {n} samples but {len(ids)} sample_ids")
    if len(set(ids)) != n:
        raise ValueError("batch['sample_ids'] contains duplicates")
    return ids


class Objective:
    """Base class. ``loss_reduction``: 'mean' | 'sum' over the sample's loss terms."""

    name = ""

    def __init__(self, loss_reduction: str = "mean", seed: int = 0):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.seed = seed

    def batch_size(self, batch: dict) -> int:
        raise NotImplementedError

    def split(self, batch: dict) -> list[dict]:
        raise NotImplementedError

    def loss(self, model: nn.Module, sample: dict) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"objective": self.name, "loss_reduction": self.loss_reduction}


@register_objective
class CausalLMObjective(Objective):
    """Cross-entropy of next-token prediction over the sample's own tokens.

    Batch: ``input_ids`` [n, T], ``attention_mask`` [n, T] (1 = real token, contiguous; left
    or right padding), optional ``labels`` [n, T] (-100 = not predicted; default: the ids).
    Each sample is run alone on its real tokens only, so its gradient cannot depend on
    the batch it came in.
    """

    name = "causal_lm"

    def batch_size(self, batch):
        return int(batch["input_ids"].shape[0])

    def split(self, batch):
        # on the host: a boolean index of a GPU tensor waits for the device, twice a sample
        ids = torch.as_tensor(batch["input_ids"]).cpu()
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [n, T], got shape {tuple(ids.shape)}")
        mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids))).cpu().bool()
        labels = torch.as_tensor(batch["labels"]).cpu() if "labels" in batch else None
        if mask.shape != ids.shape or (labels is not None and labels.shape != ids.shape):
            raise ValueError(f"input_ids {tuple(ids.shape)}, attention_mask "
                             f"{tuple(mask.shape)} and labels must have the same shape")
        # each sample's real tokens are one run (left or right padding): sliced from one
        # copy of the batch (2 views a sample, not 6 ops); other masks keep what they mark
        pos = torch.arange(ids.shape[1])
        count = mask.sum(1)
        first = torch.where(mask, pos, ids.shape[1]).amin(1)
        last = torch.where(mask, pos, -1).amax(1)
        ids = ids.clone()
        labels = ids.clone() if labels is None else torch.where(mask, labels, -100)
        if not bool(((last - first + 1 == count) | (count == 0)).all()):
            return [{"input_ids": ids[k][mask[k]], "labels": labels[k][mask[k]]}
                    for k in range(ids.shape[0])]
        return [{"input_ids": ids[k, a:a + c], "labels": labels[k, a:a + c]}
                for k, (a, c) in enumerate(zip(first.tolist(), count.tolist()))]

    def loss(self, model, sample):
        ids = sample["input_ids"].to(_device(model))[None]
        labels = sample["labels"].to(ids.device)[1:]
        logits = upcast(model(input_ids=ids).logits[0, :-1])
        keep = labels != -100
        n = int(keep.sum())
        if n == 0:
            raise ValueError("sample has no predicted tokens (all labels are -100 or it has "
                             "fewer than 2 tokens)")
        nll = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
        return nll / n if self.loss_reduction == "mean" else nll


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _unpad(batch: dict, key: str = "input_ids") -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(batch[key])
    if ids.ndim != 2:
        raise ValueError(f"{key} must be [n, T], got shape {tuple(ids.shape)}")
    mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids))).bool()
    if mask.shape != ids.shape:
        raise ValueError(f"{key} {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} "
                         f"must have the same shape")
    return ids, mask


def _optional(batch: dict, key: str, shape) -> torch.Tensor | None:
    if batch.get(key) is None:
        return None
    t = torch.as_tensor(batch[key])
    if t.shape != shape:
        raise ValueError(f"batch[{key!r}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def sample_seed(seed: int, sample_id: str) -> int:
    """A 63-bit RNG seed from (seed, sample id) alone: sha256, so it is stable across
    processes and Python versions (``hash()`` is salted per process)."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def content_id(ids: torch.Tensor) -> str:
    """Id of an unlabelled sample from its own tokens (used when the batch has no ids)."""
    return "tokens:" + hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


@register_objective
class MaskedLMObjective(Objective):
    """Masked-LM cross-entropy of one sample (BERT-style models with an MLM head).

    Which tokens are predicted is drawn per sample from ``sample_seed(seed, sample_id)``:
    each eligible token (real, not special) is chosen with probability
    ``mlm_probability`` (at least one per sample: the eligible token with the smallest
    draw) and replaced by the mask token; the loss is the mean (or sum) cross-entropy
    of the original ids at the chosen positions. No 80/10/10 random/keep replacement:
    every chosen token becomes the mask token, so the loss is a deterministic function of
    (seed, sample id, tokens) and never of the batch.

    Batch: ``input_ids`` [n, T], ``attention_mask`` [n, T], ``sample_ids`` (else the
    sample's token hash is its id), optional ``token_type_ids`` [n, T],
    ``special_tokens_mask`` [n, T] (1 = never masked; e.g. from a tokenizer with
    ``return_special_tokens_mask=True``), optional ``labels`` [n, T]: when given, the
    batch is taken as already masked (ids as given, -100 = not predicted).

    Args:
        mlm_probability: chance that an eligible token is predicted.
        mask_token_id: default ``model.config.mask_token_id`` (set it, or pass
            ``tokenizer.mask_token_id``).
        special_token_ids: ids never masked (default with ``for_model``: the config's pad,
            bos, eos, sep, cls and mask ids).
    """

    name = "masked_lm"

    def __init__(self, loss_reduction: str = "mean", seed: int = 0,
                 mlm_probability: float = 0.15, mask_token_id: int | None = None,
                 special_token_ids=None):
        super().__init__(loss_reduction, seed)
        if not 0 < mlm_probability <= 1:
            raise ValueError(f"mlm_probability must be in (0, 1], got {mlm_probability}")
        self.mlm_probability = float(mlm_probability)
        self.mask_token_id = mask_token_id
        self.special_token_ids = sorted(set(special_token_ids or ()))

    @classmethod
    def accepts(cls, model):
        return type(model).__name__.endswith("ForMaskedLM")

    @classmethod
    def for_model(cls, model, **kwargs):
        cfg = getattr(model, "config", None)
        names = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
                 "cls_token_id", "mask_token_id")
        special = {getattr(cfg, n) for n in names if isinstance(getattr(cfg, n, None), int)}
        kwargs.setdefault("special_token_ids", special)
        kwargs.setdefault("mask_token_id", getattr(cfg, "mask_token_id", None))
        return cls(**kwargs)

    def batch_size(self, batch):
        return int(torch.as_tensor(batch["input_ids"]).shape[0])

    def positions(self, sample_id: str, ids: torch.Tensor, eligible: torch.Tensor
                  ) -> torch.Tensor:
        """Bool [t]: the positions of this sample that are masked and predicted."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, sample_id))
        draw = torch.rand(ids.shape[0], generator=g, dtype=torch.float64)
        if not eligible.any():
            raise ValueError("sample has no maskable token (all special or padding)")
        chosen = eligible & (draw < self.mlm_probability)
        if not chosen.any():
            chosen[torch.where(eligible, draw, torch.full_like(draw, 2.0)).argmin()] = True
        return chosen

    def split(self, batch):
        ids, mask = _unpad(batch)
        sids = batch.get("sample_ids")
        tt = _optional(batch, "token_type_ids", ids.shape)
        special = _optional(batch, "special_tokens_mask", ids.shape)
        labels = _optional(batch, "labels", ids.shape)
        samples = []
        for k in range(ids.shape[0]):
            keep = mask[k]
            x = ids[k][keep]
            s = {"input_ids": x}
            if tt is not None:
                s["token_type_ids"] = tt[k][keep]
            if labels is not None:
                s["labels"], s["premasked"] = labels[k][keep], True
            else:
                sid = str(sids[k]) if sids is not None else content_id(x)
                eligible = torch.ones_like(x, dtype=torch.bool)
                if special is not None:
                    eligible &= ~special[k][keep].bool()
                for t in self.special_token_ids:
                    eligible &= x != t
                try:
                    chosen = self.positions(sid, x, eligible)
                except ValueError as err:
                    raise ValueError(f"sample {sid!r}: {err}") from None
                s["labels"] = torch.where(chosen, x, torch.full_like(x, -100))
            samples.append(s)
        return samples

    def _mask_id(self, model):
        mid = self.mask_token_id
        if mid is None:
            mid = getattr(getattr(model, "config", None), "mask_token_id", None)
        if mid is None:
            raise ValueError("masked_lm needs the mask token id: pass "
                             "MaskedLMObjective(mask_token_id=tokenizer.mask_token_id) or set "
                             "model.config.mask_token_id")
        return int(mid)

    def loss(self, model, sample):
        dev = _device(model)
        ids, labels = sample["input_ids"].to(dev), sample["labels"].to(dev)
        keep = labels != -100
        n = int(keep.sum())
        if n == 0:
            raise ValueError("sample has no predicted tokens (all labels are -100)")
        if not sample.get("premasked"):
            ids = torch.where(keep, torch.full_like(ids, self._mask_id(model)), ids)
        kw = {"token_type_ids": sample["token_type_ids"].to(dev)[None]} \
            if "token_type_ids" in sample else {}
        # the first T positions: Perceiver's decoder answers max_position_embeddings
        logits = upcast(model(input_ids=ids[None], **kw).logits[0, :ids.shape[0]])
        nll = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
        return nll / n if self.loss_reduction == "mean" else nll

    def describe(self):
        return {**super().describe(), "seed": self.seed, "mlm_probability": self.mlm_probability,
                "mask_replacement": "all chosen tokens -> mask token"}


@register_objective
class PairCosineObjective(Objective):
    """Within-sample pair loss of a sentence encoder without an LM head (all-MiniLM):
    L = 1 - cos(emb(prompt), emb(answer)).

    Batch: ``input_ids`` [n, T], ``attention_mask`` [n, T] and ``segment_ids`` [n, T]:
    0 marks the prompt (problem) tokens, 1 the answer (solution) tokens; padding
    (attention_mask 0) is ignored whatever its segment id. Each segment is encoded ALONE
    as its own sequence (its tokens in order, so tokenise the two texts separately, each
    with its own [CLS] ... [SEP], and concatenate) and mean-pooled over its tokens, as
    sentence-transformers encodes a sentence. Only pretrained parameters are used: no
    head, nothing random, nothing from other samples of the batch.
    """

    name = "pair_cosine"

    @classmethod
    def accepts(cls, model):
        cfg = getattr(model, "config", None)
        get_out = getattr(model, "get_output_embeddings", None)
        return (type(model).__name__.endswith("Model") and hasattr(model, "encoder")
                and getattr(model, "main_input_name", "input_ids") == "input_ids"
                and not getattr(cfg, "is_decoder", False)
                and not getattr(cfg, "is_encoder_decoder", False)
                and (get_out is None or get_out() is None))

    def batch_size(self, batch):
        return int(torch.as_tensor(batch["input_ids"]).shape[0])

    def split(self, batch):
        ids, mask = _unpad(batch)
        if batch.get("segment_ids") is None:
            raise ValueError("pair_cosine needs batch['segment_ids'] [n, T]: 0 = prompt "
                             "tokens, 1 = answer tokens")
        seg = _optional(batch, "segment_ids", ids.shape)
        samples = []
        for k in range(ids.shape[0]):
            keep = mask[k]
            x, s = ids[k][keep], seg[k][keep]
            if not bool(((s == 0) | (s == 1)).all()):
                raise ValueError(f"sample {k}: segment_ids of real tokens must be 0 or 1")
            if not (s == 0).any() or not (s == 1).any():
                raise ValueError(f"sample {k}: needs both prompt (segment 0) and answer "
                                 f"(segment 1) tokens")
            samples.append({"prompt_ids": x[s == 0], "answer_ids": x[s == 1]})
        return samples

    @staticmethod
    def embed(model, ids: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden state of ``ids`` [t] encoded alone: [d]."""
        hidden = model(input_ids=ids.to(_device(model))[None]).last_hidden_state[0]
        return upcast(hidden).mean(0)

    def loss(self, model, sample):
        a = self.embed(model, sample["prompt_ids"])
        b = self.embed(model, sample["answer_ids"])
        return 1 - F.cosine_similarity(a, b, dim=0)


@register_objective
class ImageClassificationObjective(Objective):
    """Cross-entropy of one image's label (ViT and other ``*ForImageClassification``).

    Batch: ``pixel_values`` [n, C, H, W] (video models: [n, F, C, H, W]), ``labels`` [n]
    (class ids), optional ``sample_ids``. The model head is the pretrained (or, in tests,
    the tiny model's own) classifier; each image is run alone.
    """

    name = "image_classification"

    @classmethod
    def accepts(cls, model):
        return (getattr(model, "main_input_name", None) == "pixel_values"
                and type(model).__name__.endswith(("ForImageClassification",
                                                   "ForVideoClassification")))

    def batch_size(self, batch):
        return int(torch.as_tensor(batch["pixel_values"]).shape[0])

    def split(self, batch):
        pv = torch.as_tensor(batch["pixel_values"])
        if "labels" not in batch:
            raise ValueError("image_classification needs batch['labels'] [n] (class ids)")
        labels = torch.as_tensor(batch["labels"]).long()
        if labels.shape != (pv.shape[0],):
            raise ValueError(f"labels must be [n] = [{pv.shape[0]}], got {tuple(labels.shape)}")
        return [{"pixel_values": pv[k], "labels": labels[k]} for k in range(pv.shape[0])]

    def loss(self, model, sample):
        dev = _device(model)
        dtype = next(model.parameters()).dtype
        pv = sample["pixel_values"].to(dev, dtype)[None]
        logits = upcast(model(pixel_values=pv).logits)
        return F.cross_entropy(logits, sample["labels"].to(dev)[None], reduction="sum")


def default_objective(model: nn.Module, **kwargs) -> Objective:
    """The objective for a model's family: causal LM for ``*ForCausalLM``/LM-head models,
    else the first registered objective whose ``accepts(model)`` is true (masked_lm,
    pair_cosine, image_classification); ``model.qkov_objective`` (a name) overrides."""
    name = getattr(model, "qkov_objective", None)
    if name is None:
        cls_name = type(model).__name__
        if cls_name.endswith(("ForCausalLM", "LMHeadModel")):
            name = "causal_lm"
        else:
            for cand in OBJECTIVES.values():
                if getattr(cand, "accepts", None) and cand.accepts(model):
                    name = cand.name
                    break
    if name is None:
        raise ValueError(f"no per-sample objective known for {type(model).__name__}; pass "
                         f"objective=... (registered: {sorted(OBJECTIVES)})")
    cls = OBJECTIVES[name]
    if hasattr(cls, "for_model"):
        return cls.for_model(model, **kwargs)
    return cls(**kwargs)
