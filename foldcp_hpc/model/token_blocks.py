"""Token sub-blocks: a token tensor held 1/p² per rank instead of replicated.

Token block r (``n_local`` padded tokens, as tiles use) is cut into p sub-blocks of ``width = ceil(n_local /
p)``; rank (r, c) holds sub-block c of block r. Then

    row_block(x_sub)   = block r:  all-gather of the sub-blocks along grid row r
    col_block(x_row)   = block c:  the mirror rank (c, r) holds row block c; one exchange
    gather_subs(x_sub) = all N:    all-gather over the grid (the order (r, c) is the token order)

so attention over a tile (queries block r, keys block c) needs only O(N/p) of the token tensor per rank, and
token-wise work runs on O(N/p²). Sub-block positions past a block's end, and blocks past N, are padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..distributed import autograd as cp

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

__all__ = ["sub_width", "to_sub", "row_block", "col_block", "sub_of_row", "gather_subs"]


def sub_width(n_tokens: int, p: int) -> int:
    """Tokens per sub-block: ceil(ceil(N / p) / p)."""
    n_local = -(-n_tokens // p)
    return -(-n_local // p)


def _pad_to(x: Tensor, size: int) -> Tensor:
    missing = size - x.shape[1]
    if missing <= 0:
        return x[:, :size]
    return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, missing])


def to_sub(x: Tensor, grid: "ProcessGrid") -> Tensor:
    """This rank's sub-block of a replicated token tensor [B, N, ...] -> [B, width, ...] (zero padded)."""
    n_tokens = x.shape[1]
    n_local = -(-n_tokens // grid.p)
    width = sub_width(n_tokens, grid.p)
    start = min(n_tokens, grid.row * n_local + grid.col * width)
    stop = min(n_tokens, grid.row * n_local + min((grid.col + 1) * width, n_local))
    return _pad_to(x[:, start:max(start, stop)], width)


def row_block(x_sub: Tensor, grid: "ProcessGrid", n_tokens: int) -> Tensor:
    """Token block r [B, n_local, ...] from the sub-blocks of grid row r.

    forward: all-gather along the row; backward: reduce-scatter."""
    n_local = -(-n_tokens // grid.p)
    return cp.all_gather(x_sub, grid, "row", dim=1)[:, :n_local]


def col_block(x_row: Tensor, grid: "ProcessGrid") -> Tensor:
    """Token block c [B, n_local, C] from row block r [B, n_local, C] (the mirror rank (c, r) holds block c).

    forward: exchange with the mirror rank; backward: the same."""
    return cp.transpose_tiles(x_row[:, :, None], grid)[:, 0]  # [B,n,1,C] -> [B,1,n,C] -> [B,n,C]


def sub_of_row(x_row: Tensor, grid: "ProcessGrid", n_tokens: int) -> Tensor:
    """This rank's sub-block (c) of its row block [B, n_local, ...] -> [B, width, ...] (no communication)."""
    width = sub_width(n_tokens, grid.p)
    return _pad_to(x_row[:, grid.col * width:(grid.col + 1) * width], width)


def gather_subs(x_sub: Tensor, grid: "ProcessGrid", n_tokens: int) -> Tensor:
    """All tokens [B, N, ...] replicated from every rank's sub-block.

    forward: all-gather over the grid; backward: reduce-scatter (own sub-block)."""
    p, width = grid.p, sub_width(n_tokens, grid.p)
    n_local = -(-n_tokens // p)
    full = cp.all_gather(x_sub, grid, "grid", dim=1)  # [B, p * p * width, ...]: sub-blocks in token order
    full = full.reshape(full.shape[0], p, p * width, *full.shape[2:])[:, :, :n_local]
    return full.reshape(full.shape[0], p * n_local, *full.shape[3:])[:, :n_tokens]
