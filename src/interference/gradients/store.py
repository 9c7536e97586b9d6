"""The gradient store: per-sample gradients g_i under their dataset ids, within a budget.

Rows are canonical vectors [P] (see ``QKOVIndexer``). A row stays in memory while the
store's own buffers fit in ``memory_mb``; past that it is appended to a raw file on disk
(one per (task, role)) and read back by memory map, one (layer, block) column range at
a time. Nothing is dropped or subsampled. C_i = g_i ⊙ g_i is never stored: it is derived.

Factored stores (``layout`` = a :class:`~.factored.FactorLayout`, from
``FisherCollector(gradient_format='factored' | 'auto')``): instead of a row, each sample
keeps the inputs x and output gradients δ of the attention projections (the dense
gradient of a projection where that is smaller), a variable-length record in the same
in-memory-then-``.bin`` scheme; ``block`` rebuilds the rows of one (layer, block) on the
requested device. Saved with ``format_version`` 2 (dense stores keep version 1).

Shards: stores collected in separate jobs over disjoint samples (of one task) are combined by
:meth:`GradientStore.gather` without copying rows: each part's row file is hard-linked into
the gathered folder and the index lists, per (task, role), the parts in order.
"""
from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .factored import FactorLayout

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMAT_VERSION = 1
FACTORED_FORMAT_VERSION = 2     # stores of factored records (index has 'factor_layout')


def natural_key(sample_id: str):
    """Sort key that orders 'math:2' before 'math:10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(sample_id))]


def _to_numpy(vec: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``vec`` as a C-contiguous host array of the store's dtype (bfloat16 as int16 bits):
    written to a file from its own memory (``.data``), not through a ``tobytes`` copy."""
    t = vec.detach().to("cpu", dtype).contiguous()
    return (t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy()


def _from_numpy(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 tensor of stored values; a read-only memory map is copied (torch cannot
    wrap read-only memory), so reads never warn and never alias the file."""
    arr = np.ascontiguousarray(arr)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    return (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t).float()


class _Shard:
    """Rows of one (task, role): in-memory tensors first, then a raw file on disk."""

    def __init__(self, size: int, dtype: torch.dtype, path: Path, device="cpu"):
        self.size, self.dtype, self.path = size, dtype, path
        self.device = torch.device(device)
        self.ids: list[str] = []
        self.where: dict[str, tuple[str, int]] = {}   # id -> ('ram', k) | ('disk', row)
        self.ram: list[torch.Tensor] = []
        # in-memory rows added into a reserved [n, size] buffer are views of it:
        # ram row p is slot[p] = (buffer, row) of _buffers, or None (its own tensor)
        self._buffers: list[torch.Tensor] = []
        self._slot: list[tuple[int, int] | None] = []
        self._free = 0                                   # next unused row of the last buffer
        self.disk_rows = 0
        self._map = None
        # a gathered store: disk rows live in several files, [(path, rows)] in row order
        self.parts: list[tuple[Path, int]] | None = None
        self._starts: list[int] = []
        self._maps: dict[int, np.memmap] = {}

    def set_parts(self, parts: list[tuple[Path, int]]):
        """Disk rows come from several files (in order); row r of the shard is row
        r - start of the part holding it."""
        self.parts = [(Path(p), int(n)) for p, n in parts]
        self._starts, start = [], 0
        for _, n in self.parts:
            self._starts.append(start)
            start += n
        self.disk_rows, self._maps, self._map = start, {}, None

    def disk_row(self, row: int) -> np.ndarray:
        """Row ``row`` of the disk rows (memory-mapped, not loaded)."""
        if not self.parts:
            return self.disk()[row]
        k = bisect.bisect_right(self._starts, row) - 1
        if k not in self._maps:
            path, n = self.parts[k]
            self._maps[k] = np.memmap(path, dtype=self.np_dtype, mode="r", shape=(n, self.size))
        return self._maps[k][row - self._starts[k]]

    @property
    def np_dtype(self):
        return np.int16 if self.dtype == torch.bfloat16 else np.dtype(str(self.dtype)[6:])

    @property
    def row_bytes(self) -> int:
        return self.size * torch.finfo(self.dtype).bits // 8

    def reserve(self, n: int):
        """Room for the next ``n`` in-memory rows in one buffer, so rows added in order read
        back as a view of it (:meth:`rows`), without a copy."""
        self._buffers.append(torch.empty(n, self.size, dtype=self.dtype, device=self.device))
        self._free = 0

    def drop_ram(self):
        """Forget the in-memory rows (they have been written to disk)."""
        self.ram, self._buffers, self._slot, self._free = [], [], [], 0

    def add(self, sid: str, vec: torch.Tensor, in_ram: bool):
        if in_ram:
            self.where[sid] = ("ram", len(self.ram))
            if self._buffers and self._free < len(self._buffers[-1]):
                row = self._buffers[-1][self._free]
                row.copy_(vec.detach())
                self._slot.append((len(self._buffers) - 1, self._free))
                self._free += 1
            else:   # one copy (a cross-device .to() and then a clone made two)
                row = torch.empty(vec.shape, dtype=self.dtype, device=self.device)
                row.copy_(vec.detach())
                self._slot.append(None)
            self.ram.append(row)
        else:
            if self.parts:
                raise ValueError("a gathered store's rows are read-only on disk; add rows "
                                 "to a store being collected, then save and gather it")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as fh:
                fh.write(_to_numpy(vec, self.dtype).data)
            self.where[sid] = ("disk", self.disk_rows)
            self.disk_rows += 1
            self._map = None
        self.ids.append(sid)

    def disk(self) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=self.np_dtype, mode="r",
                                  shape=(self.disk_rows, self.size))
        return self._map

    def rows(self, ids: list[str], start: int, stop: int) -> torch.Tensor:
        """float32 [len(ids), stop - start]: columns [start, stop) of the given rows."""
        ram = [(k, self.where[sid][1]) for k, sid in enumerate(ids) if self.where[sid][0] == "ram"]
        if ram and len(ram) == len(ids):     # all in memory: a view, else one stack
            view = self._buffer_view([p for _, p in ram])
            if view is not None:
                return view[:, start:stop].float()
            return torch.stack([self.ram[p][start:stop] for _, p in ram]).float()
        out = torch.empty(len(ids), stop - start, device=self.device)
        if ram:                              # one gather of the in-memory rows
            out[[k for k, _ in ram]] = torch.stack([self.ram[p][start:stop] for _, p in ram]).float()
        for k, sid in enumerate(ids):
            kind, pos = self.where[sid]
            if kind == "disk":
                out[k] = _from_numpy(self.read_span(pos, start, stop), self.dtype).to(self.device)
        return out

    def _buffer_view(self, positions: list[int]) -> torch.Tensor | None:
        """[n, size]: the in-memory rows ``positions`` as one view of a reserved buffer,
        when they are consecutive rows of one; else None."""
        first = self._slot[positions[0]]
        if first is None:
            return None
        b, k0 = first
        if any(self._slot[p] != (b, k0 + i) for i, p in enumerate(positions)):
            return None
        return self._buffers[b][k0:k0 + len(positions)]

    def read_span(self, row: int, start: int, stop: int) -> np.ndarray:
        """Columns [start, stop) of disk row ``row``, read from its file (not mapped: the
        pages stay in the page cache, not in this process's resident memory)."""
        path, local = self.path, row
        if self.parts:
            k = bisect.bisect_right(self._starts, row) - 1
            path, local = self.parts[k][0], row - self._starts[k]
        item = np.dtype(self.np_dtype).itemsize
        return np.fromfile(path, dtype=self.np_dtype, count=stop - start,
                           offset=(local * self.size + start) * item)


class _FactoredShard:
    """Factored records of one (task, role): per sample its x and δ (and the dense
    gradients of projections kept dense), variable length (they depend on the sample's
    token count T). In-memory records first, then appended to a raw file; a record on disk
    is (file, byte offset), its length follows from T."""

    def __init__(self, layout: FactorLayout, path: Path, device="cpu"):
        self.layout, self.path = layout, path
        self.device = torch.device(device)
        self.ids: list[str] = []
        self.T: dict[str, int] = {}
        self.where: dict[str, tuple] = {}       # id -> ('ram', record) | ('disk', (file, offset))
        self.files: list[Path] = [path]         # file 0: this shard's spill / saved file
        self.file_bytes = 0                     # bytes written to file 0
        self._maps: dict[int, np.memmap] = {}
        self.read_only = False                  # a gathered store

    def record_bytes(self, sid: str) -> int:
        return self.layout.plan(self.T[sid])["bytes"]

    def add(self, sid: str, rec: dict, T: int, in_ram: bool):
        self.T[sid] = int(T)
        if in_ram:
            self.where[sid] = ("ram", {k: v.to(self.device) for k, v in rec.items()})
        else:
            if self.read_only:
                raise ValueError("a gathered store's rows are read-only on disk; add rows "
                                 "to a store being collected, then save and gather it")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as fh:
                nbytes = self.layout.write(fh, rec, T)
            self.where[sid] = ("disk", (0, self.file_bytes))
            self.file_bytes += nbytes
            self._maps.pop(0, None)
        self.ids.append(sid)

    def _map(self, k: int) -> np.memmap:
        if k not in self._maps:
            self._maps[k] = np.memmap(self.files[k], dtype=np.uint8, mode="r")
        return self._maps[k]

    def record(self, sid: str, keys=None) -> tuple[int, dict]:
        """(T, section key -> tensor, or factored.OnDisk for a record on disk, read where
        the rows are rebuilt) of one sample (only ``keys`` if given)."""
        kind, pos = self.where[sid]
        T = self.T[sid]
        if kind == "ram":
            rec = pos if keys is None else {k: v for k, v in pos.items() if k in keys}
            return T, rec
        k, off = pos
        return T, self.layout.locate(self.files[k], off, T, keys)

    def disk_bytes(self) -> int:
        return sum(self.record_bytes(s) for s, (k, _) in self.where.items() if k == "disk")

    def ram_bytes(self) -> int:
        return sum(self.record_bytes(s) for s, (k, _) in self.where.items() if k == "ram")

    @property
    def disk_rows(self) -> int:
        return sum(1 for k, _ in self.where.values() if k == "disk")


class GradientStore:
    """Per-sample gradients by (task, role, sample id).

    Args:
        size: P, the canonical vector length.
        entries: (layer, block) -> (offset, n_heads, slice_size) of the canonical vector.
        memory_mb: budget of the in-memory rows; the rest spills to ``spill_dir``.
        store_dtype: 'float32' | 'bfloat16' | 'float16' (storage only; reads are float32).
        device: where in-budget rows live ('cpu', or 'cuda' to keep them on the GPU, in
            which case ``memory_mb`` is a GPU budget).
        layout: a :class:`FactorLayout`: keep factored records (x and δ of each
            projection, see ``factored.py``) instead of rows; ``add`` then needs the
            sample's ``factors`` and ``block`` rebuilds rows from them. None: dense rows.
    """

    def __init__(self, size: int, entries: dict, memory_mb: float = 100.0,
                 store_dtype: str = "float32", spill_dir: str | os.PathLike | None = None,
                 collector=None, device="cpu", layout: FactorLayout | None = None):
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}")
        self.size, self.entries = size, dict(entries)
        self.memory_mb, self.store_dtype = float(memory_mb), store_dtype
        self.dtype = STORE_DTYPES[store_dtype]
        self._own_dir = spill_dir is None
        self.spill_dir = Path(spill_dir or tempfile.mkdtemp(prefix="qkov-grads-"))
        if self._own_dir:
            # a spill folder of its own also goes when the store is collected or, at the
            # latest, when the interpreter exits: a store in a reference cycle (its
            # collector holds it, it holds the collector) may not be collected before
            weakref.finalize(self, shutil.rmtree, str(self.spill_dir), True)
        self.collector = collector
        self.device = torch.device(device)
        self.shards: dict[tuple[str, str], _Shard] = {}
        self.norms: dict[tuple[str, str], float] = {}
        self.losses: dict[tuple[str, str], float] = {}
        self.n_tokens: dict[tuple[str, str], int] = {}
        self._ram_bytes = 0
        self.layout = layout

    # -- writing ----------------------------------------------------------------------
    @property
    def gradient_format(self) -> str:
        return "dense" if self.layout is None else self.layout.fmt

    def _new_shard(self, task: str, role: str):
        if self.layout is not None:
            return _FactoredShard(self.layout, self.spill_dir / f"{task}__{role}.bin",
                                  self.device)
        return _Shard(self.size, self.dtype, self.spill_dir / f"{task}__{role}.bin", self.device)

    def reserve(self, task: str, role: str, n: int):
        """Room for the next ``n`` rows of (task, role) in one in-memory buffer (as many as
        the memory budget has left), so that they are read back without a copy: a dense
        store's rows on a GPU are then scored in place (``QKOVInterferenceMetric``). A
        factored store keeps records, not rows: nothing to do."""
        if self.layout is not None:
            return
        key = (task, role)
        if key not in self.shards:
            self.shards[key] = self._new_shard(task, role)
        shard = self.shards[key]
        fit = int(max(0.0, self.memory_mb * 2**20 - self._ram_bytes) // shard.row_bytes)
        if min(n, fit) > 1:
            shard.reserve(min(n, fit))

    def add(self, task: str, role: str, sample_id: str, vector: torch.Tensor | None,
            loss: float = float("nan"), n_tokens: int = 0, factors: dict | None = None,
            norm: float | None = None):
        """Store g_i [P] of one sample. Re-adding an id of the same (task, role) is an error.

        A factored store keeps the sample's ``factors`` (see ``SampleGradient``) instead;
        its norm is ``norm`` (||g_i|| of the collection-time g_i) or that of ``vector``,
        which may then be None."""
        if vector is None and (factors is None or norm is None):
            raise ValueError(f"sample {sample_id!r}: a gradient row is needed unless the "
                             "store is factored and the norm is given")
        if vector is not None and vector.shape != (self.size,):
            raise ValueError(f"gradient of {sample_id!r} has shape {tuple(vector.shape)}, "
                             f"store expects ({self.size},)")
        key = (task, role)
        if self.layout is not None:
            if factors is None:
                raise ValueError(f"this store keeps factored gradients ({self.layout.fmt}); "
                                 f"sample {sample_id!r} came without its factors (x, δ)")
            if key not in self.shards:
                self.shards[key] = self._new_shard(task, role)
            shard = self.shards[key]
            if sample_id in shard.where:
                raise ValueError(f"sample {sample_id!r} already stored for task {task!r} "
                                 f"role {role!r}")
            T = int(factors["T"])
            self.layout.set_groups(factors["groups"])
            nbytes = self.layout.plan(T)["bytes"]
            in_ram = self._ram_bytes + nbytes <= self.memory_mb * 2**20
            rec = self.layout.record(factors, copy=in_ram)
            shard.add(sample_id, rec, T, in_ram)
            self._ram_bytes += nbytes if in_ram else 0
            self.norms[(task, sample_id)] = float(norm) if norm is not None else \
                float(vector.double().norm())
            self.losses[(task, sample_id)] = float(loss)
            self.n_tokens[(task, sample_id)] = int(n_tokens)
            return
        if key not in self.shards:
            self.shards[key] = self._new_shard(task, role)
        shard = self.shards[key]
        if sample_id in shard.where:
            raise ValueError(f"sample {sample_id!r} already stored for task {task!r} role {role!r}")
        row = shard.row_bytes
        in_ram = self._ram_bytes + row <= self.memory_mb * 2**20
        shard.add(sample_id, vector, in_ram)
        self._ram_bytes += row if in_ram else 0
        self.norms[(task, sample_id)] = float(vector.double().norm())
        self.losses[(task, sample_id)] = float(loss)
        self.n_tokens[(task, sample_id)] = int(n_tokens)

    # -- reading ----------------------------------------------------------------------
    def ids(self, task: str, role: str) -> list[str]:
        """Sample ids of (task, role), sorted naturally."""
        shard = self.shards.get((task, role))
        return sorted(shard.ids, key=natural_key) if shard else []

    def roles(self, task: str) -> list[str]:
        return [r for (t, r) in self.shards if t == task]

    def tasks(self) -> list[str]:
        return sorted({t for t, _ in self.shards})

    def _locate(self, task: str, sample_id: str) -> _Shard:
        for (t, _), shard in self.shards.items():
            if t == task and sample_id in shard.where:
                return shard
        raise KeyError(f"no gradient stored for sample {sample_id!r} of task {task!r}; "
                       f"collect it with collect_fisher(..., role='scored' or 'reference')")

    def block(self, task: str, ids: list[str], layer: int, block: str,
              device=None) -> torch.Tensor:
        """float32 [n, n_block_heads, slice_size]: g of samples ``ids`` on one (layer, block).

        ``device``: where the rows are wanted (default: the store's device); a factored
        store rebuilds them there."""
        if self.layout is not None:
            device = torch.device(device) if device is not None else self.device
            records = []
            for sid in ids:
                shard = self._locate(task, sid)
                keys = self.layout.keys_for(layer, block, shard.T[sid])
                records.append(shard.record(sid, keys))
            _, n_heads, size = self.entries[(layer, block)]
            if not records:
                return torch.empty(0, n_heads, size, device=device)
            return self.layout.rebuild(records, layer, block, device)
        out = self._dense_block(task, ids, layer, block)
        return out if device is None else out.to(device)

    def _dense_block(self, task: str, ids: list[str], layer: int, block: str) -> torch.Tensor:
        offset, n_heads, size = self.entries[(layer, block)]
        return self.columns(task, ids, offset, offset + n_heads * size).view(
            len(ids), n_heads, size)

    def columns(self, task: str, ids: list[str], start: int = 0, stop: int | None = None
                ) -> torch.Tensor:
        """float32 [n, stop - start] on the store's device: columns [start, stop) of the
        canonical rows of samples ``ids`` (dense stores)."""
        if self.layout is not None:
            raise ValueError("columns() reads dense rows; a factored store rebuilds them "
                             "per (layer, block) with block()")
        stop = self.size if stop is None else stop
        by_shard: dict[int, tuple[_Shard, list[int], list[str]]] = {}
        for k, sid in enumerate(ids):
            shard = self._locate(task, sid)
            by_shard.setdefault(id(shard), (shard, [], []))
            by_shard[id(shard)][1].append(k)
            by_shard[id(shard)][2].append(sid)
        if len(by_shard) == 1:               # one shard: its rows are the result
            return next(iter(by_shard.values()))[0].rows(ids, start, stop)
        out = torch.empty(len(ids), stop - start, device=self.device)
        for shard, pos, sids in by_shard.values():
            out[pos] = shard.rows(sids, start, stop)
        return out

    def vector(self, task: str, sample_id: str) -> torch.Tensor:
        """float32 [P]: the whole g of one sample."""
        shard = self._locate(task, sample_id)
        if self.layout is not None:
            rec = [shard.record(sample_id)]
            return torch.cat([self.layout.rebuild(rec, l, b, self.device).reshape(-1)
                              for (l, b) in self.entries])
        return shard.rows([sample_id], 0, self.size)[0]

    def grad_norms(self, task: str, ids: list[str]) -> np.ndarray:
        """[n] L2 norms of g_j over all attention parameters (float64 sums of the float32 g's
        squares; on a GPU, a wide projection's from the Gram matrices of x and δ)."""
        return np.array([self.norms[(task, s)] for s in ids])

    def get_memory_usage(self) -> dict:
        """Bytes held by the store's own buffers, in MB, and what spilled to disk."""
        disk = sum(s.disk_bytes() if isinstance(s, _FactoredShard) else s.disk_rows * s.row_bytes
                   for s in self.shards.values())
        return {"ram_mb": self._ram_bytes / 2**20, "disk_mb": disk / 2**20,
                "budget_mb": self.memory_mb,
                "n_samples": sum(len(s.ids) for s in self.shards.values()),
                "n_on_disk": sum(s.disk_rows for s in self.shards.values())}

    # -- persistence ------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, meta: dict | None = None,
             tasks: list[str] | None = None):
        """Write (task, role) rows as raw ``.bin`` files plus ``index.json``, atomically:
        everything goes to a temporary sibling folder that is renamed into place.

        Rows already spilled to disk are not copied: their file is moved (same file
        system) and the in-memory rows appended to it, so a store is written once. After
        saving, the store reads its rows from ``directory``.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        index = {"format_version": FORMAT_VERSION, "size": self.size,
                 "store_dtype": self.store_dtype, "meta": meta or {},
                 "entries": {f"{l}|{b}": list(v) for (l, b), v in self.entries.items()},
                 "shards": {}}
        if self.layout is not None:
            self._save_factored(directory, tmp, index, tasks)
            return
        moved = []
        for (task, role), shard in self.shards.items():
            if tasks is not None and task not in tasks:
                continue
            name = f"{task}__{role}.bin"
            order = self._persist_rows(shard, tmp / name)
            moved.append((shard, name, order))
            index["shards"][f"{task}|{role}"] = {
                "ids": order, "norms": [self.norms[(task, s)] for s in order],
                "losses": [self.losses[(task, s)] for s in order],
                "n_tokens": [self.n_tokens[(task, s)] for s in order]}
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        for shard, name, order in moved:     # the store now reads from the saved files
            shard.path, shard._map = directory / name, None
            shard.where = {sid: ("disk", k) for k, sid in enumerate(order)}
            shard.disk_rows = len(order)
            shard.drop_ram()
        self._ram_bytes = sum(len(sh.ram) * sh.row_bytes for sh in self.shards.values())

    def _save_factored(self, directory: Path, tmp: Path, index: dict, tasks):
        """:meth:`save` for factored records: one ``.bin`` per (task, role) (as dense rows), the records
        in order; the index gives each sample's T and byte offset."""
        index["format_version"] = FACTORED_FORMAT_VERSION
        index["factor_layout"] = self.layout.to_dict()
        moved = []
        for (task, role), shard in self.shards.items():
            if tasks is not None and task not in tasks:
                continue
            name = f"{task}__{role}.bin"
            order, offsets = self._persist_records(shard, tmp / name)
            moved.append((shard, name, order, offsets))
            index["shards"][f"{task}|{role}"] = {
                "ids": order, "norms": [self.norms[(task, s)] for s in order],
                "losses": [self.losses[(task, s)] for s in order],
                "n_tokens": [self.n_tokens[(task, s)] for s in order],
                "T": [shard.T[s] for s in order], "offsets": offsets,
                "files": [name], "file_of": [0] * len(order)}
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        for shard, name, order, offsets in moved:     # now read from the saved files
            shard.path = directory / name
            shard.files, shard._maps, shard.read_only = [shard.path], {}, False
            shard.where = {sid: ("disk", (0, off)) for sid, off in zip(order, offsets)}
            shard.file_bytes = shard.path.stat().st_size
        self._ram_bytes = sum(sh.ram_bytes() for sh in self.shards.values())

    def _persist_records(self, shard: "_FactoredShard", target: Path):
        """Put all records of ``shard`` into ``target``: (ids, byte offsets) in order."""
        disk_ids = [sid for sid in shard.ids if shard.where[sid][0] == "disk"]
        ram_ids = [sid for sid in shard.ids if shard.where[sid][0] == "ram"]
        order, offsets = [], []
        plain = (not shard.read_only and len(shard.files) == 1 and disk_ids
                 and all(shard.where[s][1][0] == 0 for s in disk_ids))
        if plain:                            # the spill file: move it, offsets unchanged
            shard._maps = {}
            try:
                os.replace(shard.files[0], target)
            except OSError:
                shutil.copyfile(shard.files[0], target)
            order = sorted(disk_ids, key=lambda sid: shard.where[sid][1][1])
            offsets = [shard.where[sid][1][1] for sid in order]
            end = target.stat().st_size
            mode = "ab"
        else:                                # gathered records: copy them one by one
            end, mode = 0, "wb"
            with open(target, "wb") as out:
                for sid in disk_ids:
                    k, off = shard.where[sid][1]
                    data = shard._map(k)[off:off + shard.record_bytes(sid)].tobytes()
                    out.write(data)
                    order.append(sid)
                    offsets.append(end)
                    end += len(data)
            shard._maps = {}
            mode = "ab"
        with open(target, mode) as fh:
            for sid in ram_ids:
                order.append(sid)
                offsets.append(end)
                end += self.layout.write(fh, shard.where[sid][1], shard.T[sid])
        return order, offsets

    def _persist_rows(self, shard: "_Shard", target: Path) -> list[str]:
        """Put all rows of ``shard`` into ``target``; returns the ids in row order."""
        disk_ids = sorted((sid for sid, (k, _) in shard.where.items() if k == "disk"),
                          key=lambda sid: shard.where[sid][1])
        ram_ids = [sid for sid in shard.ids if shard.where[sid][0] == "ram"]
        if disk_ids and shard.parts:       # a gathered store: concatenate its parts (copy)
            shard._maps = {}
            with open(target, "wb") as out:
                for path, _ in shard.parts:
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, out, 2**24)
            shard.parts = None
        elif disk_ids:
            shard._map = None
            try:
                os.replace(shard.path, target)
            except OSError:                  # another file system: copy instead
                shutil.copyfile(shard.path, target)
        with open(target, "ab" if disk_ids else "wb") as fh:
            for sid in ram_ids:
                fh.write(_to_numpy(shard.ram[shard.where[sid][1]], self.dtype).data)
        return disk_ids + ram_ids

    @classmethod
    def open(cls, directory: str | os.PathLike, memory_mb: float = 0.0,
             collector=None) -> "GradientStore":
        """Memory-map a saved store (read-only rows; nothing is loaded until asked)."""
        from ..results import read_json_file

        directory = Path(directory)
        index = read_json_file(directory / "index.json", REBUILD)
        if index.get("format_version") not in (FORMAT_VERSION, FACTORED_FORMAT_VERSION):
            raise ValueError(f"{directory}: store format {index.get('format_version')} is not "
                             f"{FORMAT_VERSION} or {FACTORED_FORMAT_VERSION}; recollect the "
                             "gradients")
        entries = {(int(k.split("|")[0]), k.split("|")[1]): tuple(v)
                   for k, v in index["entries"].items()}
        layout = FactorLayout.from_dict(index["factor_layout"]) \
            if index.get("factor_layout") else None
        store = cls(index["size"], entries, memory_mb, index["store_dtype"],
                    spill_dir=directory, collector=collector, layout=layout)
        store.meta = index["meta"]
        for key, info in index["shards"].items():
            task, role = key.split("|")
            if layout is not None:
                store.shards[(task, role)] = _open_factored(store, directory, task, info)
                continue
            shard = _Shard(store.size, store.dtype, directory / f"{task}__{role}.bin")
            for row, sid in enumerate(info["ids"]):
                shard.ids.append(sid)
                shard.where[sid] = ("disk", row)
                store.norms[(task, sid)] = info["norms"][row]
                store.losses[(task, sid)] = info["losses"][row]
                store.n_tokens[(task, sid)] = info["n_tokens"][row]
            shard.disk_rows = len(info["ids"])
            if not info.get("parts"):
                _check_size(shard.path, shard.disk_rows * shard.row_bytes,
                            f"{shard.disk_rows} rows of {shard.row_bytes} bytes")
            if info.get("parts"):               # a gathered store (see gather)
                parts = [(directory / p["file"], int(p["rows"])) for p in info["parts"]]
                if sum(n for _, n in parts) != len(info["ids"]):
                    raise ValueError(f"{directory}: the parts of {key} hold "
                                     f"{sum(n for _, n in parts)} rows, the index lists "
                                     f"{len(info['ids'])} ids")
                for path, n in parts:
                    _check_size(path, n * shard.row_bytes, f"{n} rows of {shard.row_bytes} bytes")
                shard.set_parts(parts)
            store.shards[(task, role)] = shard
        return store

    @classmethod
    def gather(cls, directories, directory: str | os.PathLike, meta: dict | None = None,
               link: bool = True, before_publish=None) -> "GradientStore":
        """Combine saved stores of DISJOINT samples (the shards of one collection, saved
        by :meth:`save`) into one saved store at ``directory``, without copying rows.

        Each input's row files are hard-linked (copied where the file system cannot link,
        or with ``link=False``) into ``directory/parts/<i>/``; the index lists, per
        (task, role), the ids of all inputs in input order and the part files holding
        them. Inputs must share size, layout and store dtype; a sample id may appear in
        one input only. ``meta``: the gathered index's meta (default: the first input's).
        ``before_publish(tmp)``: called with the finished temporary folder before it is
        renamed into place (to add files atomically, e.g. the Fisher). Returns the
        gathered store, opened.
        """
        directories = [Path(d) for d in directories]
        if not directories:
            raise ValueError("gather needs at least one saved store")
        stores = [cls.open(d) for d in directories]
        first = stores[0]
        for d, st in zip(directories[1:], stores[1:]):
            same_format = (st.layout is None and first.layout is None) or (
                st.layout is not None and st.layout.compatible(first.layout))
            if (st.size, st.entries, st.store_dtype) != (first.size, first.entries,
                                                          first.store_dtype) or not same_format:
                raise ValueError(f"cannot gather {d} with {directories[0]}: other model, "
                                 "layout, store dtype or gradient format")
            if first.layout is not None:
                first.layout.adopt_groups(st.layout)
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        index = {"format_version": FORMAT_VERSION, "size": first.size,
                 "store_dtype": first.store_dtype,
                 "meta": dict(first.meta if meta is None else meta),
                 "entries": {f"{l}|{b}": list(v) for (l, b), v in first.entries.items()},
                 "shards": {}}
        owner: dict[tuple[str, str], int] = {}
        if first.layout is not None:
            index["format_version"] = FACTORED_FORMAT_VERSION
            index["factor_layout"] = first.layout.to_dict()
        try:
            for i, (d, st) in enumerate(zip(directories, stores)):
                for (task, role), shard in st.shards.items():
                    if first.layout is not None:
                        _gather_factored(index, tmp, i, d, st, task, role, shard, owner,
                                         directories, link)
                        continue
                    order = _claim(owner, shard, task, i, d, directories)
                    files = shard.parts or [(shard.path, shard.disk_rows)]
                    entry = index["shards"].setdefault(f"{task}|{role}", {
                        "ids": [], "norms": [], "losses": [], "n_tokens": [], "parts": []})
                    for j, (src, n) in enumerate(files):
                        name = f"parts/{i}" + (f".{j}" if len(files) > 1 else "") + \
                            f"/{task}__{role}.bin"
                        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                        _link_or_copy(Path(src), tmp / name, link)
                        entry["parts"].append({"file": name, "rows": int(n)})
                    entry["ids"] += order
                    entry["norms"] += [st.norms[(task, s)] for s in order]
                    entry["losses"] += [st.losses[(task, s)] for s in order]
                    entry["n_tokens"] += [st.n_tokens[(task, s)] for s in order]
            (tmp / "index.json").write_text(json.dumps(index, indent=1))
            if before_publish is not None:
                before_publish(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        return cls.open(directory)

    def merge(self, other: "GradientStore"):
        """Adopt the shards of another store with the same layout (no copy)."""
        if other.size != self.size or other.entries != self.entries:
            raise ValueError("cannot merge gradient stores of different models or layouts")
        if (self.layout is None) != (other.layout is None) or (
                self.layout is not None and not self.layout.compatible(other.layout)):
            raise ValueError(f"cannot merge a {self.gradient_format} store with a "
                             f"{other.gradient_format} one (other gradient format or model)")
        if self.layout is not None:
            self.layout.adopt_groups(other.layout)
            for shard in other.shards.values():
                shard.layout = self.layout
        for key, shard in other.shards.items():
            if key in self.shards:
                raise ValueError(f"both stores hold task {key[0]!r} role {key[1]!r}")
            self.shards[key] = shard
        self.norms.update(other.norms)
        self.losses.update(other.losses)
        self.n_tokens.update(other.n_tokens)

    def release(self):
        """Drop every stored row (memory and spill files); the store is empty after."""
        self.shards.clear()
        self._ram_bytes = 0
        self.close()

    def close(self):
        """Remove the spill folder this store made (none given): its spilled rows go. Rows
        spilled after (a released store used again) make it anew."""
        if self._own_dir:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def _open_factored(store: GradientStore, directory: Path, task: str, info: dict):
    """A saved (task, role) of factored records, memory-mapped lazily."""
    files = [directory / f for f in info["files"]]
    shard = _FactoredShard(store.layout, files[0])
    shard.files = files
    shard.read_only = len(files) > 1
    ends = [0] * len(files)
    for r, sid in enumerate(info["ids"]):
        k, off, T = int(info["file_of"][r]), int(info["offsets"][r]), int(info["T"][r])
        shard.ids.append(sid)
        shard.T[sid] = T
        shard.where[sid] = ("disk", (k, off))
        ends[k] = max(ends[k], off + store.layout.plan(T)["bytes"])
        store.norms[(task, sid)] = info["norms"][r]
        store.losses[(task, sid)] = info["losses"][r]
        store.n_tokens[(task, sid)] = info["n_tokens"][r]
    for path, end in zip(files, ends):
        _check_size(path, end, "the records the index lists", at_least=True)
    shard.file_bytes = ends[0]
    return shard


REBUILD = "snakemake --forcerun collect (or collect the store again)"


def _check_size(path: Path, expected: int, what: str, at_least: bool = False) -> None:
    """A row file must hold ``expected`` bytes (``at_least``: no fewer), else the store was
    truncated or is incomplete: :class:`~interference.results.IntegrityError`, never a
    memory-map error."""
    from ..results import IntegrityError

    size = path.stat().st_size if path.is_file() else None
    if size is None or size < expected or (size != expected and not at_least):
        found = "it is missing" if size is None else f"found {size} bytes"
        raise IntegrityError(f"{path}: expected {expected} bytes ({what}), {found}: the store "
                             f"is truncated or incomplete; rebuild it: {REBUILD}")


def _claim(owner: dict, shard, task: str, i: int, d: Path, directories) -> list[str]:
    """Record input ``i`` as the owner of the shard's samples and return them in stored
    order; a sample another input already holds is an error: gathered shards are disjoint."""
    order = sorted(shard.ids, key=lambda s: shard.where[s][1])
    for sid in order:
        if (task, sid) in owner:
            raise ValueError(f"sample {sid!r} of task {task!r} is in "
                             f"{directories[owner[(task, sid)]]} and {d}: "
                             "shards must hold disjoint samples")
        owner[(task, sid)] = i
    return order


def _gather_factored(index, tmp: Path, i: int, d: Path, st: GradientStore, task: str,
                     role: str, shard: "_FactoredShard", owner: dict, directories, link):
    """One input (task, role) of :meth:`GradientStore.gather`, factored records: its files
    are linked in, its records keep their offsets."""
    order = _claim(owner, shard, task, i, d, directories)
    entry = index["shards"].setdefault(f"{task}|{role}", {
        "ids": [], "norms": [], "losses": [], "n_tokens": [], "T": [], "offsets": [],
        "files": [], "file_of": []})
    base = len(entry["files"])
    for j, src in enumerate(shard.files):
        name = f"parts/{i}" + (f".{j}" if len(shard.files) > 1 else "") + \
            f"/{task}__{role}.bin"
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(Path(src), tmp / name, link)
        entry["files"].append(name)
    entry["ids"] += order
    entry["norms"] += [st.norms[(task, s)] for s in order]
    entry["losses"] += [st.losses[(task, s)] for s in order]
    entry["n_tokens"] += [st.n_tokens[(task, s)] for s in order]
    entry["T"] += [shard.T[s] for s in order]
    entry["offsets"] += [shard.where[s][1][1] for s in order]
    entry["file_of"] += [base + shard.where[s][1][0] for s in order]


def _link_or_copy(src: Path, dst: Path, link: bool = True) -> None:
    """Hard-link src to dst (no copy, same file system), else copy it."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


class ContributionCache(Mapping):
    """Read-only view (task, sample_id) -> C_i = g_i ⊙ g_i [P], derived from the store."""

    def __init__(self, store: GradientStore, collector=None):
        self.store, self.collector = store, collector

    def _keys(self):
        return [(t, s) for (t, r), sh in self.store.shards.items() for s in sh.ids]

    def __getitem__(self, key):
        task, sid = key
        return self.store.vector(task, sid).square()

    def __iter__(self):
        return iter(self._keys())

    def __len__(self):
        return len(self._keys())
