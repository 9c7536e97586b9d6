"""The model's tokenizer where text is tokenised: built from the model config without the
weights, in each job that tokenises (prepare_data, prepare_eval), so the data wait for no
other job (prepare_model converts the model meanwhile: a large checkpoint takes minutes,
the 7B benchmark shape's layout proof some 10 s).

The data record the tokenizer's digest (interference.models.tokenizer_digest);
prepare_model records it in model.json too, from the tokenizer it builds with the model;
:func:`check_same_tokenizer` compares them where data meet the model (collect,
chunk_scores, validate).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..jobs import read_json

logger = logging.getLogger("qkov.model")


def build_tokenizer(mcfg: dict):
    """(tokenizer with its pad token or None, facts) of model config ``mcfg``
    (interference.models.tokenizer_and_facts; no weights). Facts: the model's name, source
    and class, the positions it allows, whether it has a tokenizer, its size and digest."""
    from interference.models import tokenizer_and_facts, tokenizer_digest

    tokenizer, facts = tokenizer_and_facts(mcfg)
    info = {"name": mcfg["name"], "source": mcfg["source"], **facts,
            "has_tokenizer": tokenizer is not None,
            "tokenizer_size": len(tokenizer) if tokenizer is not None else None,
            "tokenizer_digest": tokenizer_digest(tokenizer)}
    logger.info("tokenizer of %s: %s tokens, digest %s; %s positions", mcfg["name"],
                info["tokenizer_size"], info["tokenizer_digest"], info["max_positions"])
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
                         "both with `snakemake --forcerun prepare_data prepare_model`")
