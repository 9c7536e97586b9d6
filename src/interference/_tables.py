"""The shared name tables of the library, defined once and imported everywhere.

No dependencies beyond the standard library, so the workflow can import them at parse time.
"""
from __future__ import annotations

BLOCKS = ("Q", "K", "V", "O")
"""The four attention blocks, in canonical order (the order of every per-block output)."""

SHARED_BLOCKS = ("K", "V")
"""Blocks whose parameters a group of query heads shares under grouped-query attention."""

CORE_ROLES = ("fisher", "scored", "reference")
"""The disjoint sample roles every task has: Fisher (normaliser), scored and reference."""

ROLES = CORE_ROLES + ("control",)
"""All sample roles, in collection order: the core roles, then the control split (A')."""
