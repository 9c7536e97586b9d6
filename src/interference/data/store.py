"""Saving and loading prepared task batches without pickle.

A prepared task is a folder with two files:
    tensors.safetensors  for each role R: "R/input_ids", "R/attention_mask", "R/labels",
                         int64 tensors [n_R, T_R] (see tokenization.py for their meaning)
    manifest.json        {"format": "interference.task_batches", "version": 1,
                          "meta": {...}, "tensors_sha256": hex digest of tensors.safetensors,
                          "roles": {R: {"sample_ids": [n_R ids], "shape": [n_R, T_R],
                                        "batch_meta": {...}, "records": [n_R records]}}}
Each file is written to a temporary name in the folder, flushed, fsync'ed and moved in
place with os.replace; tensors first, manifest last. The manifest holds the tensors'
SHA-256, so a reader never accepts tensors and a manifest from two different saves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..results import IntegrityError, read_json_file, write_bytes
from .tasks import Record
from .tokenization import TokenizedBatch

FORMAT, VERSION = "interference.task_batches", 1
TENSOR_FILE, MANIFEST_FILE = "tensors.safetensors", "manifest.json"
_KEYS = ("input_ids", "attention_mask", "labels")
REBUILD = "snakemake --forcerun prepare_data"


def save_task_batches(path: str | Path, batches_by_role: Mapping[str, TokenizedBatch],
                      records_by_role: Mapping[str, list[Record]], meta: dict | None = None) -> Path:
    """Saves batches and their records to the folder `path` (created if needed). Returns it.

    Both mappings need the same roles; each batch's sample_ids must equal its records' ids
    in order. meta and every batch.meta must be JSON-serialisable.
    """
    path = Path(path)
    if set(batches_by_role) != set(records_by_role):
        raise ValueError(f"roles differ: batches {sorted(batches_by_role)} vs records {sorted(records_by_role)}")
    tensors: dict[str, torch.Tensor] = {}
    roles: dict[str, dict] = {}
    for role, batch in batches_by_role.items():
        if "/" in role:
            raise ValueError(f"role names cannot contain '/': {role!r}")
        ids = [r["id"] for r in records_by_role[role]]
        if list(batch["sample_ids"]) != ids:
            raise ValueError(f"role {role!r}: batch sample_ids do not match the records' ids")
        shape = tuple(batch["input_ids"].shape)
        for key in _KEYS:
            t = batch[key]
            if tuple(t.shape) != shape or t.dtype != torch.long:
                raise ValueError(f"role {role!r}: {key} is {t.dtype} {tuple(t.shape)}, expected int64 {shape}")
            tensors[f"{role}/{key}"] = t.detach().cpu().contiguous()
        roles[role] = {"sample_ids": ids, "shape": list(shape), "batch_meta": getattr(batch, "meta", {}),
                       "records": [dict(r) for r in records_by_role[role]]}
    data = st_save(tensors)
    manifest = {"format": FORMAT, "version": VERSION, "meta": meta or {},
                "tensors_sha256": hashlib.sha256(data).hexdigest(), "roles": roles}
    text = json.dumps(manifest, ensure_ascii=False, allow_nan=False, indent=1)
    path.mkdir(parents=True, exist_ok=True)
    write_bytes(path / TENSOR_FILE, data, fsync=True)
    write_bytes(path / MANIFEST_FILE, text.encode("utf-8"), fsync=True)
    return path


def load_task_batches(path: str | Path) -> tuple[dict[str, TokenizedBatch], dict[str, list[Record]], dict]:
    """Loads a folder written by save_task_batches.

    Returns (batches_by_role, records_by_role, meta). Raises ValueError if a file is
    missing, the format is unknown, or the tensors do not match the manifest.
    """
    path = Path(path)
    for name in (MANIFEST_FILE, TENSOR_FILE):
        if not (path / name).is_file():
            raise ValueError(f"not a prepared task folder: {path / name} is missing")
    manifest = read_json_file(path / MANIFEST_FILE, REBUILD)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r} v{manifest.get('version')!r}")
    data = (path / TENSOR_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["tensors_sha256"]:
        raise IntegrityError(f"{path / TENSOR_FILE} does not match the manifest (expected sha256 "
                             f"{manifest['tensors_sha256']}, found {hashlib.sha256(data).hexdigest()}, "
                             f"{len(data)} bytes): it was changed, truncated or mixed with another "
                             f"save; rebuild it: {REBUILD}")
    tensors = st_load(data)
    batches: dict[str, TokenizedBatch] = {}
    records: dict[str, list[Record]] = {}
    for role, info in manifest["roles"].items():
        parts = {key: tensors[f"{role}/{key}"] for key in _KEYS}
        if any(list(t.shape) != info["shape"] for t in parts.values()):
            raise ValueError(f"{path}: role {role!r} tensors do not have shape {info['shape']}")
        batches[role] = TokenizedBatch(**parts, sample_ids=list(info["sample_ids"]), meta=info["batch_meta"])
        records[role] = [Record(**r) for r in info["records"]]
    return batches, records, manifest["meta"]
