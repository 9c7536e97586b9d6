"""prepare_model: build or convert the model once and cache it as safetensors.

Output folder ``_models/<name>-<hash>/``: ``hf/`` (config, model.safetensors, tokenizer)
and ``model.json`` (geometry, sizes, provenance), written last.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

logger = logging.getLogger("qkov.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(mcfg: dict):
    """(model, tokenizer) as the model config asks; nothing is downloaded."""
    from interference import models

    source = mcfg["source"]
    tok_cfg = mcfg.get("tokenizer") or {}
    if source == "smollm2":
        return models.load_smollm2(cache_dir=None, attn_implementation=mcfg["attn_implementation"])
    if source == "minilm":
        return models.load_minilm(attn_implementation=mcfg["attn_implementation"])
    if source == "tiny":
        family = mcfg["family"]
        overrides = dict(mcfg.get("overrides") or {})
        if family in models.TINY_FAMILIES:
            model = models.tiny_model(family, mcfg["vocab_size"], mcfg["seed"], **overrides)
        else:
            from interference.tiny_families import FAMILIES_EXTRA, tiny_model_extra

            if family not in FAMILIES_EXTRA:
                raise ValueError(f"model.family={family!r} is not a tiny family; choose from "
                                 f"{models.TINY_FAMILIES + FAMILIES_EXTRA}")
            model = tiny_model_extra(family, mcfg["vocab_size"], mcfg["seed"], **overrides)
        if not tok_cfg.get("kind"):
            return model, None   # e.g. vision models: no tokenizer
        tokenizer = models.build_tokenizer(tok_cfg["kind"], vocab_size=tok_cfg.get("vocab_size", 512),
                                           path=tok_cfg.get("path"))
        if len(tokenizer) > mcfg["vocab_size"]:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                             f"{mcfg['vocab_size']}")
        return model, tokenizer
    if source in ("local", "hf"):
        path = mcfg.get("path")
        if not path:
            raise ValueError(f"model.source={source} needs model.path")
        if source == "hf":
            from huggingface_hub import snapshot_download

            try:
                path = snapshot_download(path, local_files_only=True)
            except Exception as err:
                raise ValueError(f"model {mcfg['path']!r} is not in the local Hugging Face "
                                 f"cache and nothing is downloaded at run time ({err}); download "
                                 "it beforehand or use source: local with a folder") from None
        model, tokenizer = load_folder(path, mcfg, torch.float32)
        if tok_cfg.get("kind"):
            tokenizer = models.build_tokenizer(tok_cfg["kind"], path=tok_cfg.get("path"),
                                               vocab_size=tok_cfg.get("vocab_size", 512))
        return model, tokenizer
    raise ValueError(f"unknown model.source {source!r}")


AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "base": "AutoModel",
                "masked_lm": "AutoModelForMaskedLM",
                "image_classification": "AutoModelForImageClassification"}


def load_folder(folder: str | Path, mcfg: dict, dtype):
    """(model, tokenizer or None) from a local folder: safetensors only, nothing downloaded,
    remote code only when model.trust_remote_code is true."""
    import transformers

    from interference.models import load_pretrained

    if mcfg["kind"] in ("causal_lm", "base"):
        model, tok = load_pretrained(folder, trust_remote_code=mcfg["trust_remote_code"],
                                     dtype=dtype, kind=mcfg["kind"],
                                     attn_implementation=mcfg["attn_implementation"])
        return model.eval(), tok
    auto = getattr(transformers, AUTO_CLASSES[mcfg["kind"]])
    model = auto.from_pretrained(str(folder), dtype=dtype, use_safetensors=True,
                                 local_files_only=True,
                                 trust_remote_code=mcfg["trust_remote_code"],
                                 attn_implementation=mcfg["attn_implementation"]).eval()
    has_tok = any((Path(folder) / f).is_file()
                  for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    tok = transformers.AutoTokenizer.from_pretrained(
        str(folder), local_files_only=True,
        trust_remote_code=mcfg["trust_remote_code"]) if has_tok else None
    return model, tok


def load(model_dir: str | Path, mcfg: dict):
    """(model, tokenizer or None) from a prepared model folder, in the configured dtype."""
    return load_folder(Path(model_dir) / "hf", mcfg, DTYPES[mcfg["dtype"]])


def save(model, tokenizer, out_dir: Path) -> None:
    """Safetensors weights (+ tokenizer) into out_dir, atomically."""
    from interference.models import convert_to_safetensors

    if tokenizer is not None:
        convert_to_safetensors(model, tokenizer, out_dir, overwrite=True)
        return
    from interference.results import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)


def describe(model, tokenizer, mcfg: dict) -> dict:
    from interference.architectures import QKOVConfig, QKOVIndexer

    qcfg = QKOVConfig.from_model(model, include_bias=mcfg.get("include_bias", False))
    indexer = QKOVIndexer(model, qcfg)
    cfg = model.config
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return {"class": type(model).__name__, "qkov_config": qcfg.to_dict(),
            "layers": list(indexer.layers), "n_attention_params": int(indexer.total_size),
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "max_positions": int(max_pos) if max_pos else None,
            "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
            "has_tokenizer": tokenizer is not None,
            "tokenizer_size": len(tokenizer) if tokenizer is not None else None,
            "pad_token_id": getattr(tokenizer, "pad_token_id", None),
            "eos_token_id": getattr(tokenizer, "eos_token_id", None),
            "bytes_per_gradient_float32": int(indexer.total_size) * 4}


def run(job) -> None:
    from interference.results import write_json

    mcfg = job.slice["model"]
    out = Path(job.output.manifest).parent
    hf = out / "hf"
    if hf.exists():
        shutil.rmtree(hf)   # left over from an interrupted run
    with job.timed("build"):
        model, tokenizer = build(mcfg)
    if tokenizer is not None and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token: using eos %r", tokenizer.eos_token)
    info = describe(model, tokenizer, mcfg)   # an unknown layout fails here, before any output
    with job.timed("save"):
        save(model, tokenizer, hf)
    info.update(source=mcfg["source"], name=mcfg["name"], config_hash=job.config_hash)
    logger.info("model %s: %s, %d layers, %d heads, %d kv heads, head_dim %d, %d attention "
                "parameters (%.1f MB per float32 gradient)", mcfg["name"], info["class"],
                len(info["layers"]), info["qkov_config"]["num_heads"],
                info["qkov_config"]["num_kv_heads"], info["qkov_config"]["head_dim"],
                info["n_attention_params"], info["bytes_per_gradient_float32"] / 2**20)
    write_json(job.output.manifest, info)
    job.metric("model.n_params", info["n_params"])
    job.metric("model.n_attention_params", info["n_attention_params"])
    job.artifact(job.output.manifest)
