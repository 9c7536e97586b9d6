"""prepare_model: build or convert the model once and cache it as safetensors.

Building, loading, saving and describing a model from its config (conf/model) is
interference.models (build_from_config, load_prepared, save_prepared, describe).

Output folder ``_models/<name>-<hash>/``: ``hf/`` (config, model.safetensors, tokenizer;
a checkpoint folder's weight files hard-linked where the file system allows, else copied,
never read into memory; random weights: the config only) and ``model.json`` (geometry,
sizes, provenance, the tokenizer's digest, a checkpoint's linked files), written last. The
data are tokenised meanwhile, by the tokenizer each data job builds from the same model
config (stages.tokenizer); the jobs that meet both check the digests agree.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger("qkov.model")


def run(job) -> None:
    from interference.models import (build_from_config, checkpoint_folder, describe,
                                      save_prepared, with_pad_token)
    from interference.results import write_json

    mcfg = job.slice["model"]
    out = Path(job.output.manifest).parent
    hf = out / "hf"
    if hf.exists():
        shutil.rmtree(hf)   # left over from an interrupted run
    # a checkpoint folder's weights are not read here: its files are linked (or copied)
    # into hf/ and each job reads them straight onto its device
    folder = checkpoint_folder(mcfg) if mcfg["source"] in ("local", "hf") else None
    with job.timed("build"):
        model, tokenizer = build_from_config(mcfg, weights=folder is None)
    tokenizer = with_pad_token(tokenizer)   # as the data jobs' (stages.tokenizer)
    info = describe(model, tokenizer, mcfg.get("include_bias", False),   # an unknown layout
                    attention_stack=mcfg.get("attention_stack"))  # fails here, before output
    with job.timed("save"):
        checkpoint = save_prepared(model, tokenizer, hf, weights_from=folder)
    if checkpoint is not None:
        info["checkpoint"] = checkpoint
        logger.info("checkpoint %s: %s", checkpoint["folder"], ", ".join(
            f"{name} {f['how']}" for name, f in checkpoint["files"].items()))
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
