"""Pure layout maths of the p x p context-parallel grid: padding, token blocks, pair tiles.

Nothing here communicates; every function answers for any rank from sizes alone, so any rank can
compute where any other rank's data lives (as heat's ``chunk`` does).

Conventions
-----------
* ``n_global``: the true number of tokens N. ``n_padded``: N rounded up to a multiple of p.
  ``n_local``: the block size ``n_padded // p`` that every rank holds along a tiled dim.
* Block ``k`` covers padded indices ``[k * n_local, (k + 1) * n_local)``. Indices ``>= n_global`` are
  padding and are masked out of every computation. When N < p, whole blocks are padding.
* Rank (row r, col c) holds the pair tile ``z[:, block r, block c, :]``: rows of block r, columns of
  block c, both in padded coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "replica_share",
    "padded_size",
    "block_size",
    "block_bounds",
    "valid_bounds",
    "valid_count",
    "TileLayout",
]


def replica_share(n_samples: int, dp: int, replica: int) -> range:
    """The diffusion samples replica ``replica`` of ``dp`` computes: a contiguous share, the first
    ``n_samples % dp`` replicas taking one more (replicas past ``n_samples`` get none)."""
    if n_samples < 0 or dp < 1 or not 0 <= replica < dp:
        raise ValueError(f"replica {replica} of {dp} cannot share {n_samples} samples")
    base, extra = divmod(n_samples, dp)
    start = replica * base + min(replica, extra)
    return range(start, start + base + (replica < extra))


def _check(n_global: int, p: int) -> None:
    if not isinstance(n_global, int) or n_global < 0:
        raise ValueError(f"n_global must be a non-negative int, got {n_global!r}")
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"grid side p must be a positive int, got {p!r}")


def padded_size(n_global: int, p: int) -> int:
    """N rounded up to a multiple of p (0 stays 0)."""
    _check(n_global, p)
    return -(-n_global // p) * p


def block_size(n_global: int, p: int) -> int:
    """``n_local``: the number of (padded) indices each of the p blocks holds."""
    return padded_size(n_global, p) // p


def block_bounds(n_global: int, p: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of block ``index`` in padded coordinates."""
    _check(n_global, p)
    if not 0 <= index < p:
        raise ValueError(f"block index {index} out of range for p={p}")
    n_local = block_size(n_global, p)
    return index * n_local, (index + 1) * n_local


def valid_bounds(n_global: int, p: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of the real (unpadded) indices of block ``index``; empty (stop == start) when all padding."""
    start, stop = block_bounds(n_global, p, index)
    return start, max(start, min(stop, n_global))


def valid_count(n_global: int, p: int, index: int) -> int:
    """Number of real indices in block ``index`` (the rest of its ``n_local`` are padding)."""
    start, stop = valid_bounds(n_global, p, index)
    return stop - start


@dataclass(frozen=True)
class TileLayout:
    """Where the pieces of an N x N pair tensor and an N-token vector live on a p x p grid.

    Args:
        n_global: true token count N.
        p: grid side (the context-parallel grid is p x p).
    """

    n_global: int
    p: int

    def __post_init__(self) -> None:
        _check(self.n_global, self.p)

    @property
    def n_padded(self) -> int:
        return padded_size(self.n_global, self.p)

    @property
    def n_local(self) -> int:
        return block_size(self.n_global, self.p)

    @property
    def n_pad(self) -> int:
        """How many padding indices were appended to reach ``n_padded``."""
        return self.n_padded - self.n_global

    def block(self, index: int) -> slice:
        """Padded-coordinate slice of token block ``index``."""
        return slice(*block_bounds(self.n_global, self.p, index))

    def valid(self, index: int) -> slice:
        """Slice of the real tokens of block ``index`` (global coordinates)."""
        return slice(*valid_bounds(self.n_global, self.p, index))

    def valid_local(self, index: int) -> slice:
        """Slice of the real tokens of block ``index`` in the block's local coordinates."""
        return slice(0, valid_count(self.n_global, self.p, index))

    def tile(self, row: int, col: int) -> tuple[slice, slice]:
        """Padded-coordinate (rows, cols) slices of the pair tile held by grid position (row, col)."""
        return self.block(row), self.block(col)

    def block_mask(self, index: int) -> list[bool]:
        """``[n_local]`` True for real tokens of block ``index``, False for padding."""
        count = valid_count(self.n_global, self.p, index)
        return [i < count for i in range(self.n_local)]

    def owner(self, token: int) -> int:
        """The block holding global token index ``token``."""
        if not 0 <= token < self.n_global:
            raise ValueError(f"token {token} out of range for N={self.n_global}")
        return token // self.n_local
