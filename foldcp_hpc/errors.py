"""Error types shared across the package."""

from __future__ import annotations

__all__ = ["UniformError"]


class UniformError(ValueError):
    """An error every rank raises identically (a bad job file, a grid that does not fit the world).

    Rank 0 reports it; the other ranks stay quiet so that a 64-rank job prints one line, not 64.
    """
