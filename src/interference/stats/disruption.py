"""Per-disruptor disruption of each distinct cell (SPEC section 6).

s_jc = mean_i M_{ij,c}: how much disruptor j (a scored sample of task B, or a reference
sample) lands on cell c, averaged over task A's scored samples i.

Normalisations (`disruption_norm`):
- ``share`` (default): s~_jc = s_jc / sum_c' |s_jc'|, the share of j's total disruption
  that falls on c (sum over all distinct cells of all blocks). For non-negative variants
  this is s_jc / sum_c' s_jc'; for ``signed`` the absolute values keep the sign of s_jc.
- ``l2``: s~_jc = s_jc / ||g_j||_2, i.e. the score of the L2-normalised gradient (M is
  linear in |g_j|, or in g_j for ``signed``).
- ``none``: raw s_jc (ablation).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .._tables import DISRUPTION_NORMS


def disruption(cube: np.ndarray) -> np.ndarray:
    """[n_a, n_j, m] per-cell scores -> [n_j, m] disruptions s_jc = mean over i."""
    cube = np.asarray(cube, dtype=np.float64)
    if cube.ndim != 3:
        raise ValueError(f"expected scores [n_a, n_j, m], got shape {cube.shape}")
    if cube.shape[0] == 0:
        raise ValueError("no task-A samples: the mean over i is undefined")
    return cube.mean(axis=0)


def normalise(s: np.ndarray, method: str = "share", norms: np.ndarray | None = None,
              ids: Sequence | None = None) -> np.ndarray:
    """Normalise disruptions s [..., n_j, m] per disruptor j.

    norms: [n_j] L2 norms of g_j, required for ``l2``.
    ids: dataset ids of the disruptors, only used in error messages.
    """
    s = np.asarray(s, dtype=np.float64)
    divisor = _divisor(s, method, norms, ids)
    return s if divisor is None else s / divisor


def disruptor_scale(s: np.ndarray, method: str = "share", norms: np.ndarray | None = None,
                    ids: Sequence | None = None) -> np.ndarray:
    """[..., n_j] factor f_j of each disruptor with ``normalise(s) = s * f_j`` (up to
    rounding): 1 / sum_c |s_jc| (share), 1 / ||g_j||_2 (l2), 1 (none). A weighted mean of
    normalised rows is then the mean of the rows with the weights times f (one pass over
    them instead of two). Arguments and errors as :func:`normalise`."""
    s = np.asarray(s, dtype=np.float64)
    divisor = _divisor(s, method, norms, ids)
    if divisor is None:
        return np.ones(s.shape[:-1])
    return np.broadcast_to(1.0 / divisor[..., 0], s.shape[:-1])


def _divisor(s: np.ndarray, method: str, norms, ids) -> np.ndarray | None:
    """[..., n_j, 1] (broadcastable) divisor of each disruptor's row; None for ``none``."""
    if method == "none":
        return None
    if method == "share":
        total = np.abs(s).sum(axis=-1, keepdims=True)
        bad = ~(total > 0)
        if np.any(bad):
            where = np.argwhere(bad[..., 0])
            j = int(where[0][-1])
            name = ids[j] if ids is not None else j
            raise ValueError(f"disruptor {name!r} has zero total disruption over all cells; "
                             "its share is undefined (zero gradient?)")
        return total
    if method == "l2":
        if norms is None:
            raise ValueError("disruption_norm='l2' needs the L2 norms of the disruptors' "
                             "gradients (norms_b / norms_r)")
        norms = np.asarray(norms, dtype=np.float64)
        if norms.shape != (s.shape[-2],):
            raise ValueError(f"norms has shape {norms.shape}, expected ({s.shape[-2]},)")
        if not np.all(np.isfinite(norms)) or np.any(norms <= 0):
            raise ValueError("gradient norms must be finite and positive")
        return norms[:, None]
    raise ValueError(f"unknown disruption_norm {method!r}; expected one of {DISRUPTION_NORMS}")
