"""Saving and reading a validation's tables (atomic, checked when read)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from ..results import SCHEMA_VERSION, atomic_path, check_schema, write_json
from .run import ValidationResult, verdict

TABLES = {"cells": "validation_cells.csv", "validity": "validity.csv",
          "precision": "precision.csv", "arms": "arms.csv", "comparison": "comparison.csv"}


def concat_batches(batches: list[dict]) -> dict:
    """One batch (input_ids, attention_mask, labels [n, T_max], right-padded) from several
    batches of different widths; sample_ids concatenated."""
    width = max(int(b["input_ids"].shape[1]) for b in batches)
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        out[key] = torch.cat([torch.nn.functional.pad(torch.as_tensor(b[key]),
                                                      (0, width - b[key].shape[1]), value=fill)
                              for b in batches])
    out["sample_ids"] = [i for b in batches for i in b["sample_ids"]]
    return out


def check_disjoint_eval(collector, task: str, eval_ids: list[str]) -> None:
    """The eval samples of ``task`` must be in no role of the gradient stores (they measure
    the truth, so they must not have shaped the map)."""
    used = set(collector.sample_ids(task, "fisher"))
    for role in collector.gradient_manager.roles(task):
        used |= set(collector.sample_ids(task, role))
    clash = sorted(set(eval_ids) & used)
    if clash:
        raise ValueError(f"task {task!r}: {len(clash)} eval samples are also in the gradient "
                         f"stores (e.g. {clash[:3]}); eval samples must be held out from every "
                         "other role: delete the _eval folder and rerun")


def save_validation(directory, result: ValidationResult, extra: dict | None = None) -> dict:
    """Write the tables (CSV) and validation.json (meta, verdict, extra); returns the doc."""
    directory = Path(directory)
    for attr, name in TABLES.items():
        with atomic_path(directory / name) as tmp:
            getattr(result, attr).to_csv(tmp, index=False)
    doc = {"schema_version": SCHEMA_VERSION, **result.meta, "verdict": verdict(result),
           "tables": TABLES, **(extra or {})}
    write_json(directory / "validation.json", doc)
    return doc


def load_validation(directory) -> tuple[dict, dict[str, pd.DataFrame]]:
    """(validation.json, name -> table) of a folder written by :func:`save_validation`."""
    directory = Path(directory)
    path = directory / "validation.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no validation.json (an interrupted validation?); "
                         "rerun the validate rule")
    doc = json.loads(path.read_text())
    check_schema(doc.get("schema_version"), path, "validation")
    tables = {}
    for attr, name in TABLES.items():
        p = directory / name
        tables[attr] = pd.read_csv(p) if p.is_file() and p.stat().st_size > 1 else pd.DataFrame()
    return doc, tables
