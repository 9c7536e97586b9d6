"""prepare_tokenizer: the model's tokenizer, built from its model config without the weights,
so the data are tokenised while prepare_model converts the model (a large checkpoint takes
minutes; the 7B benchmark shape's layout proof some 10 s).

Output folder ``_models/<name>-<hash>/tokenizer/``: the tokenizer's files and
``manifest.json`` (written last): whether the model has a tokenizer, the positions it
allows, its class and the tokenizer's digest (interference.models.tokenizer_digest), which
prepare_model records in model.json too; :func:`check_same_tokenizer` compares them where
data meet the model.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..jobs import read_json

logger = logging.getLogger("qkov.model")


def run(job) -> None:
    from interference.models import max_positions, tokenizer_and_config, tokenizer_digest
    from interference.results import atomic_dir, write_json

    mcfg = job.slice["model"]
    out = Path(job.output.manifest).parent
    with job.timed("build"):
        tokenizer, config = tokenizer_and_config(mcfg)
    if tokenizer is not None:
        with atomic_dir(out) as tmp:    # replaces what an interrupted run left
            tokenizer.save_pretrained(str(tmp))
    info = {"name": mcfg["name"], "source": mcfg["source"],
            "class": (getattr(config, "architectures", None) or [type(config).__name__])[0],
            "max_positions": max_positions(config), "has_tokenizer": tokenizer is not None,
            "tokenizer_size": len(tokenizer) if tokenizer is not None else None,
            "tokenizer_digest": tokenizer_digest(tokenizer), "config_hash": job.config_hash}
    logger.info("tokenizer of %s: %s tokens, digest %s; %s positions", mcfg["name"],
                info["tokenizer_size"], info["tokenizer_digest"], info["max_positions"])
    write_json(job.output.manifest, info)
    job.artifact(job.output.manifest)


def load_checked(manifest: str | Path):
    """(tokenizer, manifest) of a prepare_tokenizer output, the tokenizer checked against the
    digest its manifest records (a folder edited or half-copied since is refused)."""
    from interference.models import load_tokenizer, tokenizer_digest

    info = read_json(manifest)
    if not info.get("has_tokenizer", True):
        return None, info
    tokenizer = load_tokenizer(Path(manifest).parent)
    got = tokenizer_digest(tokenizer)
    if got != info["tokenizer_digest"]:
        raise ValueError(f"the tokenizer in {Path(manifest).parent} has digest {got}, not the "
                         f"{info['tokenizer_digest']} its manifest records; rerun with "
                         "`snakemake --forcerun prepare_tokenizer`")
    return tokenizer, info


def check_same_tokenizer(model_json: str | Path, data_meta: dict, data_dir: str | Path) -> None:
    """The data were tokenised by the tokenizer of the model they meet: the digest in
    ``data_meta`` (prepare_data's) equals model.json's (prepare_model's). Raises ValueError
    naming both, e.g. after a change of the tokenizers package between the two jobs."""
    want = read_json(model_json).get("tokenizer_digest")
    got = data_meta.get("tokenizer_digest")
    if want != got:
        raise ValueError(f"the data in {data_dir} were tokenised by tokenizer {got}, but the "
                         f"model in {Path(model_json).parent} records tokenizer {want}; rerun "
                         "both with `snakemake --forcerun prepare_tokenizer prepare_model`")
