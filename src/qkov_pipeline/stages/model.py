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
        kind = tok_cfg.get("kind") or "bpe"
        tokenizer = models.build_tokenizer(kind, vocab_size=tok_cfg.get("vocab_size", 512),
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
        model, tokenizer = models.load_pretrained(
            path, trust_remote_code=mcfg["trust_remote_code"], kind=mcfg["kind"],
            attn_implementation=mcfg["attn_implementation"])
        if tok_cfg.get("kind"):
            tokenizer = models.build_tokenizer(tok_cfg["kind"], path=tok_cfg.get("path"),
                                               vocab_size=tok_cfg.get("vocab_size", 512))
        if tokenizer is None:
            raise ValueError(f"{path} has no tokenizer; set model.tokenizer.kind")
        return model, tokenizer
    raise ValueError(f"unknown model.source {source!r}")


def load(model_dir: str | Path, mcfg: dict):
    """(model, tokenizer) from a prepared model folder, in the configured dtype."""
    from interference.models import load_pretrained

    model, tok = load_pretrained(Path(model_dir) / "hf", trust_remote_code=mcfg["trust_remote_code"],
                                 dtype=DTYPES[mcfg["dtype"]], kind=mcfg["kind"],
                                 attn_implementation=mcfg["attn_implementation"])
    return model.eval(), tok


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
            "tokenizer_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "bytes_per_gradient_float32": int(indexer.total_size) * 4}


def run(job) -> None:
    from interference.models import convert_to_safetensors
    from interference.results import write_json

    mcfg = job.slice["model"]
    out = Path(job.output.manifest).parent
    hf = out / "hf"
    if hf.exists():
        shutil.rmtree(hf)   # left over from an interrupted run
    with job.timed("build"):
        model, tokenizer = build(mcfg)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token: using eos %r", tokenizer.eos_token)
    with job.timed("save"):
        convert_to_safetensors(model, tokenizer, hf, overwrite=True)
    info = describe(model, tokenizer, mcfg)
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
