"""Saved results: heatmaps (npz + json) and tables, written atomically, versioned.

The library's one way to write a file or a folder atomically (:func:`atomic_path`,
:func:`atomic_dir`, :func:`staged_files` for several files into a shared folder, and on
them :func:`write_bytes`, :func:`write_json`, :func:`save_npz`):
write next to the target, then rename into place, so a reader sees the old or the new
content, never a part.

A saved heatmap folder holds ``scores.npz`` (per block ``scores_<B>`` [n_a, n_b, n_layers,
n_heads] and ``layer_head_avg_<B>`` [n_layers, n_heads], float64, unitless score units of
M) and ``heatmap.json`` (the meta without per-process keys, and ``top_conflicts``). The
cells tables (cells.csv) have the data dictionary :data:`COLUMNS`, written beside each
table by :func:`write_table_schema`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ._tables import BLOCKS

SCHEMA_VERSION = "1.1"
# What each version added; readers accept every version of the same major number (fields
# added by a minor version are optional for them) and refuse another major with a message
# that names the file and the fix.
SCHEMA_HISTORY = {
    "1.0": "heatmap.json/scores.npz, cells.csv with schema_version and config_hash",
    "1.1": "cells.schema.json (units) beside each cells.csv; stability.json and stats.json "
           "carry schema_version and config_hash; deterministic scores.npz",
}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def check_schema(version, where, what: str = "results") -> None:
    """Raise ValueError unless ``version`` has the major number of SCHEMA_VERSION."""
    if version is None or str(version).split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ValueError(
            f"{where}: {what} written with results schema {version or 'none (unversioned)'}, "
            f"which this version (schema {SCHEMA_VERSION}; readable: "
            f"{', '.join(v for v in SCHEMA_HISTORY if v.split('.')[0] == SCHEMA_VERSION.split('.')[0])}) "
            f"cannot read. Regenerate them with this version (e.g. `snakemake --forcerun scores`), "
            f"or draw the figures with the version that wrote them (its git commit is in the "
            f"MLflow runs' qkov.git_commit tag)")


def save_npz(path, arrays: dict) -> None:
    """np.savez without a clock: fixed zip timestamps, so equal arrays give equal bytes
    (np.savez stamps each member with the current time). No pickle: plain arrays only."""
    import zipfile

    from numpy.lib import format as npformat

    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, val in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_STORED
                with zf.open(info, "w", force_zip64=True) as fh:
                    npformat.write_array(fh, np.asanyarray(val), allow_pickle=False)


def load_npz(path, rebuild: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (no pickle); a missing, truncated or damaged file raises
    :class:`IntegrityError` naming it and ``rebuild``, never zipfile's or NumPy's error."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise IntegrityError(f"{path}: cannot read it ({type(err).__name__}: {str(err)[:200]}); "
                             f"it is truncated or damaged: rebuild it: {rebuild}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder next to the folder ``path``; on success it replaces ``path``
    (an existing ``path`` is removed first), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike):
    """Yield a temporary folder beside ``folder`` to write several files into; on success
    each file moves to the same relative path in ``folder`` (replacing what is there), on
    failure (a full disk, an error) the temporary folder and everything in it is removed,
    so a failed job leaves no partial files. Paths written under the temporary folder map
    to ``folder / path.relative_to(tmp)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.staged."))
    try:
        yield tmp
        for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
            dst = folder / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (``fsync``: flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# ------------------------------------------------------------------ integrity
# Every job records the content digest of each file it wrote (in its record, written after
# its outputs); the next job verifies the files it reads against those digests before it
# starts (qkov_pipeline.jobs). xxh3-128 streams at several GB/s on one core, so checking a
# store costs about one read of its bytes (docs/reliability.md gives the measured cost).
DIGEST = "xxh3_128"
_CHUNK = 1 << 22    # 4 MiB


class IntegrityError(ValueError):
    """A saved file is missing, truncated or changed since the job that wrote it."""


def file_digest(path) -> dict:
    """``{"bytes": size, "xxh3_128": hex}`` of a file, read in 4 MiB chunks."""
    import xxhash

    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, DIGEST: h.hexdigest()}


def output_digests(paths, root) -> dict[str, dict]:
    """Relative path (to ``root``) -> :func:`file_digest` of every file in ``paths``
    (folders: every file under them, hidden names skipped), sorted."""
    root = Path(root).resolve()
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file():
            files.append(p)
    return {str(f.resolve().relative_to(root)): file_digest(f)
            for f in sorted(files, key=lambda f: str(f))}


def _exact_size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n} bytes ({size_text(n)})"


def size_text(n_bytes: float) -> str:
    """Bytes as text in the unit that reads best (powers of 1024): '512 B', '3.4 MB',
    '12.1 GB', '2.6 TB'; never '0.00 GB'."""
    n = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def verify_file(path, expected: dict, rebuild: str) -> None:
    """Raise :class:`IntegrityError` unless ``path`` has the ``expected`` size and digest.

    The message names the file, what was expected and what was found, and ``rebuild``
    (the command that rewrites it). Size first: a truncated file is not read."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path} is missing (expected {_exact_size(expected['bytes'])}); "
                             f"rebuild it: {rebuild}")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise IntegrityError(
            f"{path} is truncated or was rewritten: expected {_exact_size(expected['bytes'])}, "
            f"found {_exact_size(size)}; rebuild it: {rebuild}")
    found = file_digest(path)[DIGEST]
    if found != expected[DIGEST]:
        raise IntegrityError(
            f"{path} changed since it was written: expected {DIGEST} {expected[DIGEST]}, "
            f"found {found} (same size, {_exact_size(size)}); rebuild it: {rebuild}")


def read_json_file(path, rebuild: str = "rerun the job that wrote it"):
    """json.loads of a file; a missing, truncated or malformed file raises
    :class:`IntegrityError` naming the file, the line and ``rebuild``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing; rebuild it: {rebuild}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path} is not valid JSON ({err}); it is truncated or damaged: "
                             f"rebuild it: {rebuild}") from None


def verify_inputs(paths, records: str = "mlflow.*.json") -> tuple[int, int]:
    """Check the files of ``paths`` (files, or folders: every file under them) against the
    digests recorded by the jobs that wrote them: a record (``records``, a glob) in the
    same folder whose ``outputs`` list the path. Returns (files checked, their bytes);
    files no record lists are not checked (an older results version, a user's file).
    Raises :class:`IntegrityError` (see :func:`verify_file`)."""
    recorded: dict[Path, dict] = {}
    n_files = n_bytes = 0
    for p in map(Path, paths):
        folder = p.parent
        if folder not in recorded:
            recorded[folder] = _recorded_outputs(folder, records)
        for rec, (outputs, rule) in recorded[folder].items():
            for rel, expected in outputs.items():
                if rel == p.name or rel.startswith(p.name + "/"):
                    verify_file(folder / rel, expected, f"snakemake --forcerun {rule}")
                    n_files, n_bytes = n_files + 1, n_bytes + expected["bytes"]
    return n_files, n_bytes


def _recorded_outputs(folder: Path, records: str) -> dict[Path, tuple[dict, str]]:
    """{record: (its outputs' digests, its rule)} of the records in ``folder``."""
    out = {}
    for rec in sorted(folder.glob(records)):
        rule = rec.name.split(".")[1]
        doc = read_json_file(rec, f"snakemake --forcerun {rule}")
        if doc.get("outputs"):
            out[rec] = (doc["outputs"], doc.get("rule", rule))
    return out


# ------------------------------------------------------------------ cells tables
# the leading columns of a cells table, in this order (the other columns follow)
LEAD = ["schema_version", "config_hash", "experiment", "model", "pair", "arm", "split_seed",
        "task_a", "task_b", "block", "layer", "head", "kv_head", "statistic", "p_value",
        "q_value", "effect_size", "ci_low", "ci_high", "significant"]

# The cells tables' data dictionary: column -> (unit, meaning). Written beside every cells.csv
# as <name>.schema.json together with the schema version and the config hash (issue 10).
SHARE = "share of a disruptor's total disruption (unitless, 0..1; `disruption_norm: share`)"
COLUMNS = {
    "schema_version": ("version", "results schema version of interference.results"),
    "config_hash": ("hash", "hash of the resolved config slice that determined this table"),
    "experiment": ("name", "experiment (conf/experiment file or 'default')"),
    "model": ("name", "model name (conf/model)"),
    "pair": ("name", "analysis folder: '<a>__<b>' or its negative control '<a>__<b>.control'"),
    "arm": ("name", "main (A vs B) or control (A vs A', a held-out split of A)"),
    "split_seed": ("integer", "split seed of the statistics in this row (the primary one in the "
                              "analysis-level table)"),
    "task_a": ("name", "task A (whose important parameters are disrupted)"),
    "task_b": ("name", "task B (the disruptor; A' for the control)"),
    "block": ("Q|K|V|O", "projection block"),
    "layer": ("index", "real layer id"),
    "head": ("index", "query head id (K/V cells: the first query head of the group)"),
    "kv_head": ("index", "key/value head id (= head without GQA)"),
    "kv_group": ("indices", "query heads sharing the cell, comma-separated"),
    "n_query_heads": ("count", "query heads sharing the cell"),
    "shared": ("bool", "K/V cell shared by a GQA group"),
    "layer_pos": ("index", "row of the cell on the heatmap"),
    "head_pos": ("index", "column of the cell on the heatmap"),
    "name": ("cell name", "'Q/L3/H5' for Q/O, 'K/L3/KV1' for K/V"),
    "statistic": ("z (unitless)", "Brunner-Munzel's rank statistic of disruption shares, B vs "
                                  "R, on the normal scale (Welch's t with statistic: welch; "
                                  "mean difference in " + SHARE + " with mean_diff)"),
    "p_value": ("probability", "permutation p-value, (1 + k) / (1 + N) or exact; two-sided "
                               "(|T*| >= |T|) unless stats.two_sided is false"),
    "q_value": ("probability", "Benjamini-Hochberg q-value over the FDR family"),
    "effect_size": ("Cohen's d (sd units)", "two-sample Cohen's d of disruption shares, pooled sd"),
    "auc": ("probability", "P(share of a B disruptor > share of an R disruptor)"),
    "mean_b": (SHARE, "mean over B (or A') disruptors"),
    "mean_r": (SHARE, "mean over the reference disruptors R"),
    "mean_diff": (SHARE, "mean_b - mean_r"),
    "null_mean": ("same as statistic", "mean of the permutation null"),
    "null_sd": ("same as statistic", "sd of the permutation null"),
    "ci_low": (SHARE, "bootstrap interval of mean_diff (ci_method: basic by default), lower end"),
    "ci_high": (SHARE, "bootstrap interval of mean_diff, upper end"),
    "ci_low_by": (SHARE, "Benjamini-Yekutieli-adjusted interval (for selected cells), lower end"),
    "ci_high_by": (SHARE, "Benjamini-Yekutieli-adjusted interval, upper end"),
    "constant": ("bool", "the cell's shares are constant: p = 1"),
    "q_significant": ("bool", "q_value <= fdr_alpha (what the FDR guarantee covers)"),
    "significant": ("bool", "q_value <= fdr_alpha and effect_size >= min_effect_size"),
    "n_seeds_q_significant": ("count", "split seeds in which the cell has q <= alpha"),
    "n_seeds_significant": ("count", "split seeds in which the cell is significant"),
    "n_split_seeds": ("count", "split seeds of the analysis"),
}


def write_table_schema(csv_path, columns, config_hash: str, extra: dict | None = None) -> Path:
    """``<table>.schema.json`` beside a CSV: schema version, config hash, units per column."""
    csv_path = Path(csv_path)
    out = csv_path.with_name(csv_path.stem + ".schema.json")
    doc = {"table": csv_path.name, "schema_version": SCHEMA_VERSION, "config_hash": config_hash,
           "columns": {c: dict(zip(("unit", "meaning"), COLUMNS.get(c, ("", "")))) for c in columns},
           **(extra or {})}
    write_json(out, doc)
    return out



# ------------------------------------------------------------------ heatmaps
# keys of a heatmap's meta that mean nothing once saved: how this process computed (device,
# backend), and the collector's random per-process token (it would make equal results differ
# byte for byte)
UNSAVED_META = ("compute", "collector_token")


def heatmap_meta(heatmap: dict) -> dict:
    """The heatmap's meta without the per-process keys (compute settings, collector token)."""
    return {k: v for k, v in heatmap["meta"].items() if k not in UNSAVED_META}


def save_heatmap(directory, heatmap: dict, extra: dict | None = None,
                 reference_scores: dict | None = None):
    """Write a heatmap (and optionally the reference disruptors' scores
    ``reference_scores[B]`` [n_a, n_r, n_layers, n_heads]) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for b in BLOCKS:
        arrays[f"scores_{b}"] = heatmap[b]["scores"]
        arrays[f"layer_head_avg_{b}"] = heatmap[b]["layer_head_avg"]
        if reference_scores is not None:
            arrays[f"reference_{b}"] = reference_scores[b]
    save_npz(directory / "scores.npz", arrays)
    doc = {"schema_version": SCHEMA_VERSION, "meta": heatmap_meta(heatmap),
           "top_conflicts": {b: heatmap[b]["top_conflicts"] for b in BLOCKS},
           "extra": extra or {}}
    write_json(directory / "heatmap.json", doc)


def load_heatmap(directory) -> tuple[dict, dict | None]:
    """(heatmap dict as made by ``compute_heatmap`` minus UNSAVED_META, reference scores or None)."""
    directory = Path(directory)
    doc = read_json_file(directory / "heatmap.json", "snakemake --forcerun scores")
    check_schema(doc.get("schema_version"), directory / "heatmap.json", "the heatmap")
    arrays = load_npz(directory / "scores.npz", "snakemake --forcerun scores")
    heat = {"meta": doc["meta"], "extra": doc.get("extra", {})}
    for b in BLOCKS:
        heat[b] = {"scores": arrays[f"scores_{b}"], "layer_head_avg": arrays[f"layer_head_avg_{b}"],
                   "top_conflicts": doc["top_conflicts"][b],
                   "layers": doc["meta"]["layers"], "heads": doc["meta"]["heads"]}
    ref = ({b: arrays[f"reference_{b}"] for b in BLOCKS}
           if "reference_Q" in arrays else None)
    return heat, ref
