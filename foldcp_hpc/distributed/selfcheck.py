"""A start-up check that every tile collective moves data exactly on this grid and transport.

Every rank builds the same small pair tensor from its indices (so each knows the answer without
communicating), runs each collective on its tile, and compares with the tile it must get. The results
are combined over all ranks: a check passes only if it is exact everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from . import autograd as cp

if TYPE_CHECKING:
    from .grid import ProcessGrid

__all__ = ["CheckResult", "self_check", "reference_pair"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    seconds: float


def reference_pair(n_global: int, channels: int, device: torch.device, dtype=torch.float64) -> torch.Tensor:
    """``[1, N, N, C]`` with distinct entries: z[0, i, j, c] = 1000 i + j + c / 8."""
    i = torch.arange(n_global, device=device, dtype=dtype)
    c = torch.arange(channels, device=device, dtype=dtype)
    return (1000 * i[:, None, None] + i[None, :, None] + c[None, None, :] / 8).unsqueeze(0)


def self_check(grid: "ProcessGrid", n_global: int | None = None, channels: int = 3) -> list[CheckResult]:
    """Run every collective once on a known pair tensor; return one result per collective, agreed by all ranks.

    ``n_global`` defaults to ``3 p + 1`` tokens, which leaves padding in the last block.
    """
    p = grid.p
    n = 3 * p + 1 if n_global is None else n_global
    full = reference_pair(n, channels, grid.device)
    tile_of = lambda t, r, c: cp.take_tile(t, p, r, c)  # noqa: E731 - expected tile of any grid position
    tile = cp.scatter_pair(full, grid)
    layout = grid.layout(n)
    row_block = torch.nn.functional.pad(full, (0, 0, 0, layout.n_pad, 0, layout.n_pad))[:, layout.block(grid.row)]
    tokens = full[:, :, 0]  # [1, N, C]

    checks: dict[str, Callable[[], bool]] = {
        "scatter/gather pair": lambda: torch.equal(cp.gather_pair(tile, grid, n), full),
        "transpose tiles": lambda: torch.equal(cp.transpose_tiles(tile, grid), tile_of(full.transpose(1, 2), grid.row, grid.col)),
        "ring shift (row)": lambda: torch.equal(cp.ring_shift(tile, grid, "row", 1), tile_of(full, grid.row, grid.col - 1)),
        "ring shift (col)": lambda: torch.equal(cp.ring_shift(tile, grid, "col", -1), tile_of(full, grid.row + 1, grid.col)),
        "all-gather (row)": lambda: torch.equal(cp.all_gather(tile, grid, "row", dim=2), row_block),
        "reduce-scatter (row)": lambda: torch.equal(cp.reduce_scatter(row_block, grid, "row", dim=2), p * tile),
        "all-reduce (col)": lambda: torch.equal(
            cp.all_reduce(tile, grid, "col"), sum(tile_of(full, r, grid.col) for r in range(p))),
        "broadcast (row)": lambda: torch.equal(cp.broadcast(tile, grid, "row", src=0), tile_of(full, grid.row, 0)),
        "scatter/gather tokens": lambda: torch.equal(
            cp.gather_tokens(cp.scatter_tokens(tokens, grid, by="col"), grid, n, by="col"), tokens),
    }
    results = []
    for name, check in checks.items():
        start = time.perf_counter()
        ok = bool(check())
        seconds = time.perf_counter() - start
        all_ok = grid.comm.allreduce(int(ok), op=_mpi_min())
        results.append(CheckResult(name, bool(all_ok), grid.comm.allreduce(seconds, op=_mpi_max())))
    return results


def _mpi_min():
    from mpi4py import MPI

    return MPI.MIN


def _mpi_max():
    from mpi4py import MPI

    return MPI.MAX
