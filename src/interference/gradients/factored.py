"""Factored per-sample gradients (issue 15, item 1).

A linear map's per-sample gradient is a sum over the sample's tokens,
∇W_i = Σ_t δ_{i,t} x_{i,t}ᵀ (Linear convention [out, in]; the bias gets Σ_t δ_{i,t}). For a
projection with T·(d_in + d_out) < d_in·d_out values it is smaller to keep x_i [T, d_in]
and δ_i [T, d_out] (in the model's dtype) than the gradient itself; the input x is kept
once per group of projections that read the same tensor (LLaMA's q/k/v_proj). The store
rebuilds a (layer, block)'s head-major rows [n, n_block_heads, slice_size] from the
factors on the scoring device, computing only the rows (or columns) of the projection
that the block's head slices own, and puts them through the indexer's own ``Part.take``
so that fused layouts (GPT-2 c_attn, NeoX query_key_value, Phi-3 qkv_proj, Falcon) and
GQA index exactly as the dense path does.

``FactorLayout`` describes the attention projections of one model (serialisable, so a
saved store rebuilds without the model); ``FactorLayout.plan(T)`` says which projections a
sample of T tokens keeps factored (``gradient_format`` 'factored': all; 'auto': those
where the factors take fewer bytes than the dense gradient). A sample's record depends
only on its own tokens, never on its batch.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..architectures.indexer import Part
from . import kernels

GRADIENT_FORMATS = ("auto", "dense", "factored")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
_ALIGN = 8


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The values of ``t`` as a contiguous host array (bfloat16 as int16 bits), no copy
    where ``t`` already is one."""
    t = t.detach().contiguous().to("cpu")
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def from_bytes(buf, dtype: torch.dtype, shape) -> torch.Tensor:
    np_dtype = np.int16 if dtype == torch.bfloat16 else np.dtype(dtype_name(dtype))
    arr = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
    t = torch.from_numpy(arr.copy())
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


@dataclass(frozen=True)
class OnDisk:
    """A section of a saved record, not read yet: ``path``, byte ``offset``, ``dtype`` and
    ``shape``. :func:`_padded` reads such sections straight into their rows of the padded
    batch (one positioned read each, no intermediate buffer); :meth:`load` reads one."""

    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple
    nbytes: int

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        _read_into([(self, out)])
        return out


def _read_into(pairs: list[tuple["OnDisk", torch.Tensor]]) -> None:
    """Read each section into its contiguous host tensor of the section's size, each file
    opened once; a section cut short (an interrupted save) is a ValueError."""
    fds: dict[str, int] = {}
    try:
        for sec, dst in pairs:
            if sec.path not in fds:
                fds[sec.path] = os.open(sec.path, os.O_RDONLY)
            view = memoryview(dst.view(torch.uint8).numpy()).cast("B")
            if os.preadv(fds[sec.path], [view], sec.offset) != sec.nbytes:
                raise ValueError(f"{sec.path}: the section at byte {sec.offset} is cut short "
                                 "(an interrupted save?)")
    finally:
        for fd in fds.values():
            os.close(fd)


def _loaded(t) -> torch.Tensor:
    return t.load() if isinstance(t, OnDisk) else t


def factor_dtype(model_dtype: torch.dtype, store_dtype: str) -> str:
    """The dtype x and δ are kept in: the model's, or ``store_dtype`` where that is
    bfloat16 or float16 (lower-precision stores; rows are rebuilt in float32)."""
    return store_dtype if store_dtype in ("bfloat16", "float16") else dtype_name(model_dtype)


class FactorLayout:
    """The attention projections of a model and how one sample's record is laid out.

    Args:
        modules: module path -> {'d_in', 'd_out', 'conv1d', 'params': {'weight': name,
            'bias': name (optional)}, 'shapes': {kind: param shape}}, in model order.
        parts: 'layer|block' -> [Part fields] (the indexer's entry parts).
        fmt: 'auto' or 'factored'.
        factor_dtype: the dtype x and δ are kept in (:func:`factor_dtype`: the model's,
            or a bfloat16 / float16 ``store_dtype``).
        store_dtype: dtype of the dense gradients of projections kept dense.
        groups: module path -> input group (the first module reading the same x); set
            from the first captured batch.
    """

    def __init__(self, modules: dict, parts: dict, fmt: str, factor_dtype: str,
                 store_dtype: str, groups: dict | None = None):
        if fmt not in ("auto", "factored"):
            raise ValueError(f"a factor layout's format is 'auto' or 'factored', got {fmt!r}")
        self.modules, self.fmt = modules, fmt
        self.factor_dtype, self.store_dtype = factor_dtype, store_dtype
        self.fdt, self.sdt = DTYPES[factor_dtype], DTYPES[store_dtype]
        self.groups = dict(groups) if groups else None
        self.parts_spec = parts
        self.parts = {(int(k.split("|")[0]), k.split("|")[1]):
                      [Part(p["name"], p["axis"], torch.tensor(p["index"], dtype=torch.long),
                            p["n_heads"], p["size"], p["transposed"]) for p in v]
                      for k, v in parts.items()}
        self._plans: dict[int, dict] = {}

    @classmethod
    def from_indexer(cls, indexer, fmt: str, store_dtype: str) -> "FactorLayout":
        model = indexer.model
        mods = dict(model.named_modules())
        params = dict(model.named_parameters())
        names = indexer.param_names
        modules: dict[str, dict] = {}
        for name in names:
            path, kind = name.rsplit(".", 1)
            m = mods[path]
            if path not in modules:
                w = m.weight
                conv1d = type(m).__name__ == "Conv1D"
                d_in, d_out = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
                if w.dim() != 2:
                    raise ValueError(f"{path}.weight is not a matrix: cannot factor it")
                modules[path] = {"d_in": int(d_in), "d_out": int(d_out), "conv1d": conv1d,
                                 "params": {}, "shapes": {}}
            modules[path]["params"][kind] = name
            modules[path]["shapes"][kind] = list(params[name].shape)
        parts = {f"{l}|{b}": [{"name": p.name, "axis": p.axis, "index": p.index.tolist(),
                               "n_heads": p.n_heads, "size": p.size,
                               "transposed": p.transposed} for p in e.parts]
                 for (l, b), e in indexer.entries.items()}
        return cls(modules, parts, fmt, factor_dtype(next(model.parameters()).dtype,
                                                     store_dtype), store_dtype)

    def to_dict(self) -> dict:
        return {"modules": self.modules, "parts": self.parts_spec, "fmt": self.fmt,
                "factor_dtype": self.factor_dtype, "store_dtype": self.store_dtype,
                "groups": self.groups}

    @classmethod
    def from_dict(cls, d: dict) -> "FactorLayout":
        return cls(d["modules"], d["parts"], d["fmt"], d["factor_dtype"], d["store_dtype"],
                   d.get("groups"))

    def __eq__(self, other):
        return isinstance(other, FactorLayout) and self.to_dict() == other.to_dict()

    def compatible(self, other) -> bool:
        """Same projections, parts and format; input groups equal where both are known (a
        store that kept no record, e.g. a shard of Fisher samples only, has none yet)."""
        if not isinstance(other, FactorLayout):
            return False
        a, b = self.to_dict(), other.to_dict()
        if a["groups"] is None or b["groups"] is None:
            a["groups"] = b["groups"] = None
        return a == b

    def adopt_groups(self, other: "FactorLayout"):
        """Take ``other``'s input groups when this layout has none yet."""
        if self.groups is None and other.groups is not None:
            self.groups = dict(other.groups)
            self._plans = {}

    # -- what a sample of T tokens keeps --------------------------------------------
    def factored(self, path: str, T: int) -> bool:
        """Keep x, δ of ``path`` for a T-token sample (else its dense gradient)."""
        if self.fmt == "factored":
            return True
        m = self.modules[path]
        fbytes = torch.finfo(self.fdt).bits // 8
        sbytes = torch.finfo(self.sdt).bits // 8
        return T * (m["d_in"] + m["d_out"]) * fbytes < m["d_in"] * m["d_out"] * sbytes

    def plan(self, T: int) -> dict:
        """Sections of a T-token record: key -> (byte offset, dtype, shape), their sizes
        ('nbytes': key -> bytes) and the record's padded size ('bytes').
        Keys: ('x', group), ('delta', module), ('grad', param name)."""
        if T in self._plans:
            return self._plans[T]
        if self.groups is None:
            raise ValueError("the factor layout has no input groups yet (nothing collected)")
        sections, sizes, off = {}, {}, 0

        def put(key, dtype, shape):
            nonlocal off
            sections[key] = (off, dtype, tuple(shape))
            sizes[key] = int(np.prod(shape)) * (torch.finfo(dtype).bits // 8)
            off += -(-sizes[key] // _ALIGN) * _ALIGN

        for path, m in self.modules.items():
            g = self.groups[path]
            if self.factored(path, T):
                if ("x", g) not in sections:
                    put(("x", g), self.fdt, (T, self.modules[g]["d_in"]))
                put(("delta", path), self.fdt, (T, m["d_out"]))
            else:
                for kind, name in m["params"].items():
                    put(("grad", name), self.sdt, m["shapes"][kind])
        plan = {"sections": sections, "nbytes": sizes, "bytes": off,
                "factored": {p: self.factored(p, T) for p in self.modules}}
        self._plans[T] = plan
        return plan

    # -- records --------------------------------------------------------------------
    def set_groups(self, groups: dict):
        groups = {p: groups[p] for p in self.modules}
        if self.groups is None:
            self.groups = groups
        elif groups != self.groups:
            raise ValueError(f"the projections' shared inputs changed between batches "
                             f"({self.groups} then {groups}); use gradient_format='dense'")

    def record(self, factors: dict, copy: bool = True) -> dict:
        """One sample's kept tensors, contiguous, in their storage dtypes: section key ->
        tensor (``copy``: never a view of the capture's tensors, to be kept in memory)."""
        self.set_groups(factors["groups"])
        plan = self.plan(int(factors["T"]))
        out = {}
        for key in plan["sections"]:
            kind, name = key
            src = factors["grads" if kind == "grad" else kind][name].detach()
            t = src.to(self.fdt if kind != "grad" else self.sdt).contiguous()
            out[key] = t.clone() if copy and t.data_ptr() == src.data_ptr() else t
        return out

    def write(self, fh, rec: dict, T: int) -> int:
        """Write one record (the layout of :meth:`plan`, zero-padded sections) to the open
        binary file ``fh``, section by section (no record-sized buffer); returns its bytes."""
        plan = self.plan(T)
        pos = 0
        for key, (off, _, _) in plan["sections"].items():
            if off > pos:
                fh.write(bytes(off - pos))
            arr = to_numpy(rec[key])
            fh.write(arr.data if arr.flags.c_contiguous else arr.tobytes())
            pos = off + arr.nbytes
        if plan["bytes"] > pos:
            fh.write(bytes(plan["bytes"] - pos))
        return plan["bytes"]

    def encode(self, rec: dict, T: int) -> bytes:
        """The bytes :meth:`write` writes."""
        buf = io.BytesIO()
        self.write(buf, rec, T)
        return buf.getvalue()

    def decode(self, buf, T: int, keys=None) -> dict:
        """Section key -> tensor from the bytes of one record (only ``keys`` if given)."""
        plan = self.plan(T)
        out = {}
        for key, (off, dtype, shape) in plan["sections"].items():
            if keys is not None and key not in keys:
                continue
            n = plan["nbytes"][key]
            out[key] = from_bytes(buf[off:off + n], dtype, shape)
        return out

    def read(self, path, offset: int, T: int, keys=None) -> dict:
        """:meth:`decode` of the record at byte ``offset`` of the file ``path``, reading
        only the sections in ``keys`` (all if None) with positioned reads (those of
        :meth:`locate`): nothing is memory-mapped, so a scoring pass over a large store does
        not keep its pages in the process's resident memory."""
        sections = self.locate(path, offset, T, keys)
        out = {key: torch.empty(sec.shape, dtype=sec.dtype) for key, sec in sections.items()}
        _read_into([(sec, out[key]) for key, sec in sections.items()])
        return out

    def locate(self, path, offset: int, T: int, keys=None) -> dict:
        """Section key -> :class:`OnDisk` of the record at byte ``offset`` of ``path`` (only
        ``keys`` if given): what :meth:`read` reads, left for :meth:`rebuild` to read into
        its batch."""
        plan = self.plan(T)
        path = str(path)
        return {key: OnDisk(path, offset + off, dtype, shape, plan["nbytes"][key])
                for key, (off, dtype, shape) in plan["sections"].items()
                if keys is None or key in keys}

    def keys_for(self, layer: int, block: str, T: int) -> set:
        """Section keys a (layer, block) needs from a T-token record."""
        plan = self.plan(T)
        keys = set()
        for p in self.parts[(layer, block)]:
            path, kind = p.name.rsplit(".", 1)
            if plan["factored"][path]:
                keys |= {("x", self.groups[path]), ("delta", path)}
            else:
                keys.add(("grad", p.name))
        return keys

    def all_keys(self, T: int) -> set:
        return set(self.plan(T)["sections"])

    # -- rebuilding -----------------------------------------------------------------
    def rebuild(self, records: list[tuple[int, dict]], layer: int, block: str,
                device) -> torch.Tensor:
        """float32 [n, n_block_heads, slice_size] of one (layer, block) from the records
        [(T, {section key: tensor or OnDisk})] of n samples, computed on ``device``."""
        device = torch.device(device)
        n = len(records)
        pieces = []
        for p in self.parts[(layer, block)]:
            path, kind = p.name.rsplit(".", 1)
            fac = [k for k, (T, _) in enumerate(records) if self.plan(T)["factored"][path]]
            den = [k for k, (T, _) in enumerate(records) if not self.plan(T)["factored"][path]]
            got = []
            if fac:
                got.append((fac, self._from_factors([records[k] for k in fac], p, path, kind,
                                                    device)))
            if den:
                g = torch.stack([_loaded(records[k][1][("grad", p.name)]) for k in den]
                                ).to(device)
                got.append((den, p.take(g.float())))
            if len(got) == 1:            # one kind of record: its rows are the piece
                pieces.append(got[0][1])
                continue
            out = torch.empty(n, *got[0][1].shape[1:], device=device)
            for where, rows in got:
                out[where] = rows
            pieces.append(out)
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def _from_factors(self, recs, p: Part, path: str, kind: str, device) -> torch.Tensor:
        """Part ``p`` [n, n_heads, size·fan] of the rebuilt gradient of ``path`` (Linear
        convention [out, in]) for factored records: the records' factors are stacked
        (zero-padded to the longest record: exact zeros), the part's outputs (rows, bias)
        or inputs (columns) taken from them (a view where they are a range), and the
        product formed in the head-major order that ``Part.take`` gives."""
        group = self.groups[path]
        rows = kind == "bias" or p.axis == "rows"
        d = _padded([rec[("delta", path)] for _, rec in recs], device)
        if rows:
            d = p.select(d, -1)       # δ[..., idx]: a view where idx is a range
        if kind == "bias":
            return d.float().sum(1).unflatten(-1, (p.n_heads, p.size))       # [n, nh, s]
        x = _padded([rec[("x", group)] for _, rec in recs], device)
        if not rows:
            x = p.select(x, -1)
        n = len(recs)
        if d.dtype == x.dtype and kernels.lowp_ok(device, d.dtype):
            g = kernels.lowp_bmm(d.transpose(1, 2), x)          # δᵀx: [n, out, in] float32
            if rows:
                return g.reshape(n, p.n_heads, -1)
            return g.unflatten(-1, (p.n_heads, p.size)).transpose(1, 2).reshape(
                n, p.n_heads, -1)
        with kernels.tf32_if_exact(self.fdt, self.fdt, device.type == "cuda"):
            if rows:                     # G[idx, :] = δ[:, idx]ᵀ x: [n, (h, s), in]
                return torch.einsum("nto,nti->noi", d.float(), x.float()).reshape(
                    n, p.n_heads, -1)
            # G[:, idx] = δᵀ x[:, idx], head-major: [n, h, out, s]
            xs = x.float().unflatten(-1, (p.n_heads, p.size))
            return torch.einsum("nto,nths->nhos", d.float(), xs).reshape(n, p.n_heads, -1)


def _padded(factors: list, device) -> torch.Tensor:
    """[n, T_max, d] on ``device`` from n factors [T_k, d] (tensors, or :class:`OnDisk`
    sections, read straight into their rows on the host), zero-padded (zero rows add exact
    zeros to δᵀx): one stack when every T_k is equal and all are in memory, else one
    ``pad_sequence`` or one zeroed batch the rows are read into."""
    if any(isinstance(f, OnDisk) for f in factors):
        t_max = max(f.shape[0] for f in factors)
        out = torch.zeros(len(factors), t_max, *factors[0].shape[1:], dtype=factors[0].dtype)
        on_disk = []
        for k, f in enumerate(factors):
            if isinstance(f, OnDisk):
                on_disk.append((f, out[k, :f.shape[0]]))
            else:
                out[k, :f.shape[0]] = f
        _read_into(on_disk)
        return out.to(device)
    factors = [f.to(device) for f in factors]
    if all(f.shape[0] == factors[0].shape[0] for f in factors):
        return torch.stack(factors)
    return torch.nn.utils.rnn.pad_sequence(factors, batch_first=True)
