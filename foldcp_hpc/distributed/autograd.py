"""Differentiable tile collectives: what model code calls.

Gradient convention ("sum of per-rank losses"): every rank's tensors are separate variables, and the
objective is the sum over ranks of what each rank computes from its own tensors. Each backward below
is the exact adjoint of its forward under that convention, so gradients of sharded tensors come out
as the shards of the serial gradient. A tensor replicated on k ranks (s, or a gathered pair tensor)
therefore receives on each rank the gradient of that rank's use of it; summing over the ranks that
hold it gives the serial gradient.

Each public function's docstring says "forward: X; backward: Y". Each returns its input unchanged,
with no communication, when its group has one rank.

Placements: ``z: [B, N_i, N_j, C]`` pair tile (row-block r, col-block c) on rank (r, c), blocks of
``n_local`` padded tokens; token vectors ``[B, N, C]`` are split along dim 1 by row block (``by="row"``:
rank (r, c) holds block r) or by column block (``by="col"``: block c).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import collectives as raw
from .atom_layout import AtomWindowLayout
from .layout import TileLayout

if TYPE_CHECKING:
    from .grid import ProcessGrid

__all__ = [
    "ring_shift",
    "transpose_tiles",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "broadcast",
    "scatter_pair",
    "take_tile",
    "gather_pair",
    "scatter_tokens",
    "gather_tokens",
    "halo_extend",
    "gather_atoms",
    "gather_pair_entries",
]


# ------------------------------------------------------------------------------------------------------------
class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, axis, offset):
        ctx.grid, ctx.axis, ctx.offset = grid, axis, offset
        return raw.shift(x, grid, axis, offset)

    @staticmethod
    def backward(ctx, grad):
        return raw.shift(grad.contiguous(), ctx.grid, ctx.axis, -ctx.offset), None, None, None


def ring_shift(x: torch.Tensor, grid: "ProcessGrid", axis: str, offset: int = 1) -> torch.Tensor:
    """Move ``x`` ``offset`` places round the ring of ``axis`` (position i receives from i - offset).

    forward: shift by +offset; backward: shift the gradient by -offset.
    """
    if grid.axis(axis).size == 1:
        return x
    return _RingShift.apply(x, grid, axis, offset)


class _TransposeTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, dims):
        ctx.grid, ctx.dims = grid, dims
        return raw.transpose(x, grid, dims)

    @staticmethod
    def backward(ctx, grad):
        return raw.transpose(grad, ctx.grid, ctx.dims), None, None


def transpose_tiles(x: torch.Tensor, grid: "ProcessGrid", dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """Tile (r, c) of the transposed pair tensor: rank (r, c) swaps tiles with (c, r), then swaps ``dims``.

    x: [B, N_i, N_j, C] pair tile (row-block r, col-block c) of z.
    returns: [B, N_i, N_j, C] pair tile (row-block r, col-block c) of z with dims 1 and 2 swapped.

    forward: exchange with the mirror rank, transpose ``dims``; backward: the same (it is its own adjoint).
    """
    if grid.p == 1:
        return x.transpose(*dims)
    return _TransposeTiles.apply(x, grid, tuple(dims))


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, axis, dim):
        ctx.grid, ctx.axis, ctx.dim = grid, axis, dim
        return raw.all_gather(x.contiguous(), grid, axis, dim)

    @staticmethod
    def backward(ctx, grad):
        return raw.reduce_scatter(grad.contiguous(), ctx.grid, ctx.axis, ctx.dim), None, None, None


def all_gather(x: torch.Tensor, grid: "ProcessGrid", axis: str, dim: int) -> torch.Tensor:
    """Concatenate the members' ``x`` along ``dim`` in group order.

    forward: all-gather; backward: reduce-scatter (sum over members, keep own chunk).
    """
    if grid.axis(axis).size == 1:
        return x
    return _AllGather.apply(x, grid, axis, dim % x.dim())


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, axis, dim):
        ctx.grid, ctx.axis, ctx.dim = grid, axis, dim
        return raw.reduce_scatter(x.contiguous(), grid, axis, dim)

    @staticmethod
    def backward(ctx, grad):
        return raw.all_gather(grad.contiguous(), ctx.grid, ctx.axis, ctx.dim), None, None, None


def reduce_scatter(x: torch.Tensor, grid: "ProcessGrid", axis: str, dim: int) -> torch.Tensor:
    """Sum over the members of ``axis``, keep this member's chunk of ``dim``.

    forward: reduce-scatter; backward: all-gather.
    """
    if grid.axis(axis).size == 1:
        return x
    return _ReduceScatter.apply(x, grid, axis, dim % x.dim())


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, axis):
        ctx.grid, ctx.axis = grid, axis
        return raw.all_reduce(x, grid, axis, "sum")

    @staticmethod
    def backward(ctx, grad):
        return raw.all_reduce(grad.contiguous(), ctx.grid, ctx.axis, "sum"), None, None


def all_reduce(x: torch.Tensor, grid: "ProcessGrid", axis: str) -> torch.Tensor:
    """Element-wise sum over the members of ``axis``.

    forward: all-reduce (sum); backward: all-reduce (sum).
    """
    if grid.axis(axis).size == 1:
        return x
    return _AllReduce.apply(x, grid, axis)


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, axis, src):
        ctx.grid, ctx.axis, ctx.src = grid, axis, src
        return raw.broadcast(x, grid, axis, src)

    @staticmethod
    def backward(ctx, grad):
        return raw.reduce(grad.contiguous(), ctx.grid, ctx.axis, ctx.src), None, None, None


def broadcast(x: torch.Tensor, grid: "ProcessGrid", axis: str, src: int = 0) -> torch.Tensor:
    """Every member of ``axis`` gets position ``src``'s ``x`` (the others' values are ignored).

    forward: broadcast from ``src``; backward: sum-reduce onto ``src`` (zeros elsewhere).
    """
    if grid.axis(axis).size == 1:
        return x
    return _Broadcast.apply(x, grid, axis, src)


# ------------------------------------------------------------------------------------------------------------
def _pad_tokens(x: torch.Tensor, dim: int, n_padded: int) -> torch.Tensor:
    """Zero-pad token dim ``dim`` of ``x`` up to ``n_padded``."""
    missing = n_padded - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, missing]  # F.pad lists the last dim first
    return F.pad(x, pad)


def scatter_pair(full: torch.Tensor, grid: "ProcessGrid") -> torch.Tensor:
    """This rank's tile of a pair tensor that every rank holds whole (padding with zeros).

    full: [B, N, N, *C] replicated on every rank of the grid.
    returns: [B, n_local, n_local, *C] pair tile (row-block r, col-block c).

    forward: pad, then slice the own tile (no communication); backward: the tile's gradient placed in zeros.
    """
    return take_tile(full, grid.p, grid.row, grid.col)


def take_tile(full: torch.Tensor, p: int, row: int, col: int) -> torch.Tensor:
    """Tile (row, col) (taken mod p) of a whole pair tensor, zero-padded: pure, for any grid position.

    full: [B, N, N, *C]; returns [B, n_local, n_local, *C].
    """
    if full.dim() < 3 or full.shape[1] != full.shape[2]:
        raise ValueError(f"a pair tensor must be [B, N, N, ...], got {tuple(full.shape)}")
    layout = TileLayout(full.shape[1], p)
    rows, cols = layout.tile(row % p, col % p)
    padded = _pad_tokens(_pad_tokens(full, 1, layout.n_padded), 2, layout.n_padded)
    return padded[:, rows, cols]


def gather_pair(tile: torch.Tensor, grid: "ProcessGrid", n_global: int) -> torch.Tensor:
    """The whole pair tensor on every rank of the grid, padding removed: an explicit gather-for-output path.

    tile: [B, n_local, n_local, *C] pair tile (row-block r, col-block c).
    returns: [B, N, N, *C] replicated.

    forward: all-gather over the grid; backward: reduce-scatter of the gradient's tiles.
    """
    layout = grid.layout(n_global)
    p, n_local = grid.p, layout.n_local
    if tile.shape[1] != n_local or tile.shape[2] != n_local:
        raise ValueError(f"gather_pair: N={n_global} on a {p}x{p} grid needs tiles of {n_local}x{n_local}, "
                         f"got {tuple(tile.shape[1:3])}")
    tiles = all_gather(tile.unsqueeze(0), grid, "grid", dim=0)  # [p*p, B, n, n, *C] in grid order
    batch, tail = tile.shape[0], tile.shape[3:]
    tiles = tiles.reshape(p, p, batch, n_local, n_local, *tail)
    full = tiles.movedim(2, 0).transpose(2, 3)  # [P_r,P_c,B,n_i,n_j,*C] -> [B,P_r,n_i,P_c,n_j,*C]
    full = full.reshape(batch, p * n_local, p * n_local, *tail)
    return full[:, :n_global, :n_global]


def scatter_tokens(x: torch.Tensor, grid: "ProcessGrid", by: str = "row", dim: int = 1) -> torch.Tensor:
    """This rank's block of a token tensor that every rank holds whole.

    x: [B, N, C] replicated (tokens along ``dim``).
    returns: [B, n_local, C] block ``row`` (``by="row"``) or ``col`` (``by="col"``) of the padded tokens.

    forward: pad, slice (no communication); backward: the block's gradient placed in zeros.
    """
    index = _block_index(grid, by)
    layout = grid.layout(x.shape[dim])
    padded = _pad_tokens(x, dim, layout.n_padded)
    return padded.narrow(dim, layout.block(index).start, layout.n_local)


def gather_tokens(x: torch.Tensor, grid: "ProcessGrid", n_global: int, by: str = "row", dim: int = 1) -> torch.Tensor:
    """The whole token tensor from blocks split ``by`` row or column block, padding removed.

    x: [B, n_local, C] token block (``by="row"``: block r; ``by="col"``: block c).
    returns: [B, N, C] replicated.

    forward: all-gather across the blocks (along the col axis for row blocks, the row axis for column
    blocks); backward: reduce-scatter.
    """
    _block_index(grid, by)
    axis = "col" if by == "row" else "row"
    full = all_gather(x, grid, axis, dim)
    return full.narrow(dim % x.dim(), 0, n_global)


def _block_index(grid: "ProcessGrid", by: str) -> int:
    if by == "row":
        return grid.row
    if by == "col":
        return grid.col
    raise ValueError(f"tokens are split by 'row' or 'col' block, got {by!r}")


# ------------------------------------------------------------------------------------------------------------
def _halo_plan(grid: "ProcessGrid", layout: AtomWindowLayout) -> tuple[int, int, int]:
    group = grid.axis("grid")
    if layout.n_ranks != group.size:
        raise ValueError(f"atom layout for {layout.n_ranks} ranks used on a grid of {group.size}")
    a0, a1 = layout.atoms(group.index)
    return group.index, a0, a1


def _move_ranges(x: torch.Tensor, dim: int, grid: "ProcessGrid", sends: list[tuple[int, int, int]],
                 receives: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Send ``x[start:start + length]`` along ``dim`` to each ``(peer, start, length)`` of ``sends``; return
    the pieces of ``receives``' ``(peer, _, length)``, in their order (grid positions as peers)."""
    likes = []
    for peer, _, length in receives:
        shape = list(x.shape)
        shape[dim] = length
        likes.append((peer, x.new_empty(shape)))
    return raw.exchange_pieces([(peer, x.narrow(dim, start, length)) for peer, start, length in sends], likes,
                               grid, "grid")


class _HaloExtend(torch.autograd.Function):
    """The extended buffer holds atoms ``[a0 - halo, a1 + halo)``: atom ``i`` sits at ``i - a0 + halo``."""

    @staticmethod
    def forward(ctx, x, grid, layout, dim):
        ctx.grid, ctx.layout, ctx.dim = grid, layout, dim
        me, a0, a1 = _halo_plan(grid, layout)
        halo = layout.halo
        if a1 == a0:
            return x.clone()
        shape = list(x.shape)
        shape[dim] = a1 - a0 + 2 * halo
        out = x.new_zeros(shape)
        out.narrow(dim, halo, a1 - a0).copy_(x)
        receives = layout.receives(me)
        pieces = _move_ranges(x, dim, grid, [(dst, lo - a0, hi - lo) for dst, lo, hi in layout.sends(me)],
                              [(src, 0, hi - lo) for src, lo, hi in receives])
        for (_, lo, hi), piece in zip(receives, pieces):
            out.narrow(dim, lo - a0 + halo, hi - lo).copy_(piece)
        return out

    @staticmethod
    def backward(ctx, grad):
        grid, layout, dim = ctx.grid, ctx.layout, ctx.dim
        me, a0, a1 = _halo_plan(grid, layout)
        halo = layout.halo
        if a1 == a0:
            return grad, None, None, None
        out = grad.narrow(dim, halo, a1 - a0).clone()
        # the adjoint: what we received, we send back; what we sent comes back and is added to its source
        returns = layout.sends(me)
        pieces = _move_ranges(grad, dim, grid, [(src, lo - a0 + halo, hi - lo) for src, lo, hi in layout.receives(me)],
                              [(dst, 0, hi - lo) for dst, lo, hi in returns])
        for (_, lo, hi), piece in zip(returns, pieces):
            out.narrow(dim, lo - a0, hi - lo).add_(piece)
        return out, None, None, None


def halo_extend(x: torch.Tensor, grid: "ProcessGrid", layout: AtomWindowLayout, dim: int = 1) -> torch.Tensor:
    """This rank's atoms with the halo atoms its windows read as keys, from the ranks that own them.

    x: [B, m, C] this rank's atoms ``[a0, a1)`` of ``layout`` along ``dim`` (window split over the grid).
    returns: [B, m + 2 * halo, C] atoms ``[a0 - halo, a1 + halo)``; positions outside ``[0, n_atoms)`` are
    zeros. A rank that owns no window gets its (empty) input back.

    forward: point-to-point pieces from the owners (usually the neighbours in grid order); backward: the halo
    gradients sent back to their owners and added to theirs.
    """
    return _HaloExtend.apply(x, grid, layout, dim % x.dim())


# ------------------------------------------------------------------------------------------------------------
class _GatherAtoms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, layout, dim):
        ctx.grid, ctx.layout, ctx.dim = grid, layout, dim
        group = grid.axis("grid")
        width = max(layout.atoms(r)[1] - layout.atoms(r)[0] for r in range(group.size))
        padded = _pad_tokens(x, dim, width)  # every rank sends the same shape
        parts = raw.all_gather(padded.unsqueeze(0), grid, "grid", dim=0) if group.size > 1 else padded.unsqueeze(0)
        pieces = [parts[r].narrow(dim, 0, layout.atoms(r)[1] - layout.atoms(r)[0]) for r in range(group.size)]
        return torch.cat(pieces, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grid, layout, dim = ctx.grid, ctx.layout, ctx.dim
        a0, a1 = layout.atoms(grid.axis("grid").index)
        total = raw.all_reduce(grad.contiguous(), grid, "grid", "sum")
        return total.narrow(dim, a0, a1 - a0), None, None, None


def gather_atoms(x: torch.Tensor, grid: "ProcessGrid", layout: AtomWindowLayout, dim: int = 1) -> torch.Tensor:
    """All atoms from the ranks' own window runs: the atom-level output path (coordinates, O(M)).

    x: [B, m, C] this rank's atoms ``[a0, a1)`` of ``layout`` along ``dim``.
    returns: [B, M, C] replicated on the grid.

    forward: all-gather over the grid (runs padded to the longest); backward: sum over the grid, own run kept.
    """
    return _GatherAtoms.apply(x, grid, layout, dim % x.dim())


def _entry_plan(grid: "ProcessGrid", n_global: int, rows: torch.Tensor, cols: torch.Tensor):
    """Group requested (row, col) token pairs by the grid rank whose tile holds them; exchange the counts."""
    group = grid.axis("grid")
    layout = TileLayout(n_global, grid.p)
    owner = (rows // layout.n_local) * grid.p + (cols // layout.n_local)  # grid position (r * p + c)
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=group.size).long().to(grid.device)  # NCCL gathers device tensors
    wanted = counts.cpu()
    incoming = raw.all_gather(counts.unsqueeze(0), grid, "grid", dim=0)[:, group.index].cpu() if group.size > 1 \
        else wanted
    return layout, owner, order, wanted.tolist(), incoming.tolist()


class _GatherPairEntries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tile, grid, n_global, rows, cols):
        group = grid.axis("grid")
        layout, owner, order, wanted, incoming = _entry_plan(grid, n_global, rows, cols)
        local = torch.stack([rows[order] % layout.n_local, cols[order] % layout.n_local])  # [2, K] by owner
        me = group.index
        splits = local.split(wanted, dim=1)
        # 1) the positions each owner must read
        sends = [(r, splits[r].contiguous()) for r in range(group.size) if r != me and wanted[r]]
        receives = [(r, local.new_empty(2, incoming[r])) for r in range(group.size) if r != me and incoming[r]]
        asked = dict(zip([r for r, _ in receives], raw.exchange_pieces(sends, receives, grid, "grid")))
        asked[me] = splits[me]
        # 2) the values, read from our tile and sent back
        answers = [(r, tile[:, asked[r][0], asked[r][1]].contiguous()) for r in asked if r != me]
        value_like = [(r, tile.new_empty((tile.shape[0], wanted[r]) + tile.shape[3:]))
                      for r in range(group.size) if r != me and wanted[r]]
        got = dict(zip([r for r, _ in value_like], raw.exchange_pieces(answers, value_like, grid, "grid")))
        got[me] = tile[:, asked[me][0], asked[me][1]]
        ordered = torch.cat([got[r] for r in range(group.size) if wanted[r] or r == me], dim=1)
        out = torch.empty_like(ordered)
        out[:, order] = ordered
        ctx.grid, ctx.asked, ctx.order, ctx.wanted = grid, asked, order, wanted
        ctx.tile_shape = tile.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        grid, asked, order, wanted = ctx.grid, ctx.asked, ctx.order, ctx.wanted
        group = grid.axis("grid")
        me = group.index
        by_owner = grad[:, order].split(wanted, dim=1)
        sends = [(r, by_owner[r].contiguous()) for r in range(group.size) if r != me and wanted[r]]
        receives = [(r, grad.new_empty((grad.shape[0], asked[r].shape[1]) + grad.shape[2:]))
                    for r in asked if r != me]
        got = dict(zip([r for r, _ in receives], raw.exchange_pieces(sends, receives, grid, "grid")))
        got[me] = by_owner[me]
        out = grad.new_zeros(ctx.tile_shape)
        batch = torch.arange(out.shape[0], device=out.device)[:, None]
        for r, values in got.items():
            out.index_put_((batch, asked[r][0][None], asked[r][1][None]), values, accumulate=True)
        return out, None, None, None, None


def gather_pair_entries(tile: torch.Tensor, grid: "ProcessGrid", n_global: int, rows: torch.Tensor,
                        cols: torch.Tensor) -> torch.Tensor:
    """Entries ``(rows[k], cols[k])`` of a pair tensor held as tiles, from the ranks whose tiles hold them.

    tile: [B, n, n, C] pair tile (row-block r, col-block c); rows, cols: [K] global token indices (< N), any
    owner, this rank's own list (ranks may ask for different numbers of entries).
    returns: [B, K, C].

    forward: the counts all-gathered over the grid, then positions to the owners and values back, point to point;
    backward: the gradients sent back to the owners and accumulated into their tiles.
    """
    return _GatherPairEntries.apply(tile, grid, n_global, rows.long(), cols.long())
