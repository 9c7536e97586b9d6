"""Seeded, pairwise-disjoint role splits of a task's records (SPEC section 4).

Records are ranked by SHA-256(f"{seed}:{id}"): the ranking depends on the seed and the
ids only, not on the input order. Roles take consecutive blocks of that ranking in the
order fisher, scored, reference, then the extra roles in the order given. Within a role
the records keep the ranking order (a random order), so the first k records of a role
are a random subset of it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Mapping

from .._tables import CORE_ROLES
from .tasks import Record



def _rank_key(seed: int, record_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{record_id}".encode()).digest()


def split_task(records: list[Record], n_fisher: int, n_scored: int, n_reference: int, seed: int = 0,
               extra_roles: Mapping[str, int] | None = None, task: str = "task") -> dict[str, list[Record]]:
    """Splits records into disjoint roles.

    Returns {"fisher": [...n_fisher], "scored": [...n_scored], "reference": [...n_reference],
    **{role: [...n] for extra_roles}} (e.g. extra_roles={"control": 32} for a held-out
    negative-control sample). Raises ValueError on duplicate ids, negative counts, role
    names that clash, or fewer records than the roles need (saying how many of each).
    """
    extra = dict(extra_roles or {})
    clash = sorted(set(extra) & set(CORE_ROLES))
    if clash:
        raise ValueError(f"extra role names {clash} clash with the core roles {CORE_ROLES}")
    counts = {"fisher": n_fisher, "scored": n_scored, "reference": n_reference, **extra}
    bad = {role: n for role, n in counts.items() if not isinstance(n, int) or n < 0}
    if bad:
        raise ValueError(f"role sizes must be non-negative integers, got {bad}")
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, c in Counter(ids).items() if c > 1)[:5]
        raise ValueError(f"{task}: duplicate record ids, e.g. {dup}")
    needed = sum(counts.values())
    if needed > len(records):
        detail = ", ".join(f"{role}={n}" for role, n in counts.items())
        raise ValueError(f"{task}: {len(records)} records exist but the split needs {needed} ({detail})")
    ranked = sorted(records, key=lambda r: _rank_key(seed, r["id"]))
    out: dict[str, list[Record]] = {}
    start = 0
    for role, n in counts.items():
        out[role] = ranked[start:start + n]
        start += n
    check_disjoint(out)
    return out


def check_disjoint(records_by_role: Mapping[str, list[Record] | list[str]]) -> None:
    """Raises ValueError if any dataset id is in two roles (or twice in one role).

    Accepts records or bare id strings per role.
    """
    owner: dict[str, str] = {}
    for role, items in records_by_role.items():
        for item in items:
            rid = item if isinstance(item, str) else item["id"]
            if rid in owner:
                raise ValueError(f"id {rid!r} is in role {owner[rid]!r} and in role {role!r}")
            owner[rid] = role
