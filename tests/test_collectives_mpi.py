"""Tile collectives on the real grid: round trips, agreement with a serial reference, exact adjoints.

Run at 1, 4 and 9 ranks (``mpirun -n P python -m pytest --with-mpi``): p = 1, 2, 3. Every check is
agreed over all ranks (``everywhere``) so that ranks pass or fail together.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from foldcp_hpc.distributed import autograd as cp
from foldcp_hpc.distributed import collectives as raw
from foldcp_hpc.distributed.grid import GridError, ProcessGrid
from conftest import everywhere

pytestmark = pytest.mark.mpi

SIZES = [1, 2, 5, 7, 10]  # N < p, N % p != 0 and N % p == 0 all occur for p in {1, 2, 3}


def shared_randn(*shape, seed=0, dtype=torch.float64):
    """The same random tensor on every rank."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def agree(grid, ok):
    assert everywhere(grid, ok)


# ---------------------------------------------------------------------------------------------------------
def test_grid_coordinates_and_groups(grid):
    p = grid.p
    assert grid.world_size == p * p and grid.dp == 1
    assert grid.rank == grid.row * p + grid.col
    agree(grid, grid.row_group.ranks == tuple(grid.row * p + c for c in range(p)))
    agree(grid, grid.col_group.ranks == tuple(r * p + grid.col for r in range(p)))
    agree(grid, grid.row_group.index == grid.col and grid.col_group.index == grid.row)
    coords = grid.comm.allgather((grid.row, grid.col))
    agree(grid, sorted(coords) == [(r, c) for r in range(p) for c in range(p)])


def test_world_size_mismatch_raises_with_the_numbers(grid):
    p = grid.p + 1
    with pytest.raises(GridError, match=f"grid {p}x{p} needs a multiple of {p * p} ranks, got {grid.world_size}"):
        ProcessGrid.create(cp=p)


def test_replica_grid_on_the_same_world(grid):
    """dp = world size, p = 1: every rank its own 1x1 grid, replicas along the replica axis."""
    with ProcessGrid.create(cp=1, backend="gloo") as replicas:
        assert replicas.dp == grid.world_size and replicas.replica == grid.rank
        total = raw.all_reduce(torch.tensor([float(grid.rank)]), replicas, "replica")
        agree(grid, total.item() == sum(range(grid.world_size)))
        agree(grid, raw.all_reduce(torch.ones(1), replicas, "row").item() == 1.0)


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
def test_round_trips(grid, n):
    full = shared_randn(2, n, n, 3, seed=n)
    tile = cp.scatter_pair(full, grid)
    ok = torch.equal(cp.gather_pair(tile, grid, n), full)
    ok &= torch.equal(cp.transpose_tiles(cp.transpose_tiles(tile, grid), grid), tile)
    for axis in ("row", "col"):
        moved = tile
        for _ in range(grid.p):
            moved = cp.ring_shift(moved, grid, axis, 1)
        ok &= torch.equal(moved, tile)
        ok &= torch.equal(cp.ring_shift(cp.ring_shift(tile, grid, axis, 2), grid, axis, -2), tile)
    tokens = shared_randn(2, n, 5, seed=100 + n)
    for by in ("row", "col"):
        ok &= torch.equal(cp.gather_tokens(cp.scatter_tokens(tokens, grid, by), grid, n, by), tokens)
    agree(grid, ok)


@pytest.mark.parametrize("n", SIZES)
def test_results_equal_the_serial_reference(grid, n):
    p, r, c = grid.p, grid.row, grid.col
    full = shared_randn(1, n, n, 2, seed=7 * n)
    tile = cp.scatter_pair(full, grid)
    layout = grid.layout(n)
    padded = torch.nn.functional.pad(full, (0, 0, 0, layout.n_pad, 0, layout.n_pad))
    checks = {
        "transpose": torch.equal(cp.transpose_tiles(tile, grid), cp.take_tile(full.transpose(1, 2), p, r, c)),
        "shift row +1": torch.equal(cp.ring_shift(tile, grid, "row", 1), cp.take_tile(full, p, r, c - 1)),
        "shift col +1": torch.equal(cp.ring_shift(tile, grid, "col", 1), cp.take_tile(full, p, r - 1, c)),
        "shift row -1": torch.equal(cp.ring_shift(tile, grid, "row", -1), cp.take_tile(full, p, r, c + 1)),
        "gather row": torch.equal(cp.all_gather(tile, grid, "row", dim=2), padded[:, layout.block(r)]),
        "gather col": torch.equal(cp.all_gather(tile, grid, "col", dim=1), padded[:, :, layout.block(c)]),
        "reduce-scatter row": torch.allclose(
            cp.reduce_scatter(padded[:, layout.block(r)], grid, "row", dim=2), p * tile, rtol=0, atol=1e-12),
        "all-reduce row": torch.allclose(
            cp.all_reduce(tile, grid, "row"), sum(cp.take_tile(full, p, r, k) for k in range(p)), rtol=0, atol=1e-12),
        "broadcast col": torch.equal(cp.broadcast(tile, grid, "col", src=p - 1), cp.take_tile(full, p, p - 1, c)),
        "tokens by col": torch.equal(cp.scatter_tokens(full[:, 0], grid, "col"),
                                     padded[:, 0, layout.block(c)]),
    }
    bad = [name for name, ok in checks.items() if not ok]
    agree(grid, not bad)


def test_async_shift_overlaps_compute(grid):
    tile = cp.scatter_pair(shared_randn(1, 8, 8, 4), grid)
    handle = raw.start_shift(tile, grid, "row", 1)
    busy = tile @ tile.transpose(-1, -2)  # work while the message travels
    moved = handle.wait()
    agree(grid, torch.equal(moved, raw.shift(tile, grid, "row", 1)) and torch.isfinite(busy).all())


def test_ring_visits_every_position_and_copies_nothing_alone(grid):
    """``model.common.ring``: position c of a grid row sees, at step t, what position c + skew + t held (with
    and without autograd); on a ring of one the very tensors come back (a strided view is not copied)."""
    from foldcp_hpc.model.common import ring

    held = torch.arange(24.0).reshape(4, 6) + 100 * grid.col  # this position's tensor
    view = held[:, ::2]  # strided, as the key projections are
    ok = True
    for autograd in (False, True):
        with torch.set_grad_enabled(autograd):
            seen = [tensors[0] for tensors in ring([view], grid, "row", skew=grid.row)]
        owners = [(grid.col + grid.row + step) % grid.p for step in range(grid.p)]
        ok &= all(torch.equal(t, view - 100 * grid.col + 100 * owner) for t, owner in zip(seen, owners))
        ok &= grid.p > 1 or seen[0] is view
    agree(grid, ok)


def test_gather_to_root_and_scatter_from_root(grid):
    n = 7
    full = shared_randn(1, n, n, 2, seed=3)
    tile = cp.scatter_pair(full, grid)
    parts = raw.gather_to(tile, grid, "grid", dst=0)
    if grid.rank == 0:
        ok = len(parts) == grid.p ** 2 and all(
            torch.equal(parts[k], cp.take_tile(full, grid.p, k // grid.p, k % grid.p)) for k in range(len(parts)))
        back = [part + 1 for part in parts]
    else:
        ok, back = parts is None, None
    received = raw.scatter_from(back, torch.empty_like(tile), grid, "grid", src=0)
    agree(grid, ok and torch.equal(received, tile + 1))


def test_reduce_scatter_rejects_uneven_sizes(grid):
    if grid.p == 1:
        return
    with pytest.raises(ValueError, match=f"not divisible by the group size {grid.p}"):
        raw.reduce_scatter(torch.zeros(grid.p + 1), grid, "row", dim=0)


# ---------------------------------------------------------------------------------------------------------
# Gradients. Each rank's tensors are separate variables and the objective is the sum over ranks (see
# foldcp_hpc.distributed.autograd). To let torch.autograd.gradcheck see the whole distributed map, every
# rank gets the same stacked input [P, *shape] (gradcheck perturbs it identically everywhere), takes its
# own slice, applies the collective, and returns every rank's output stacked: a function from the global
# input to the global output, identical on every rank. The two test-only functions below carry gradients
# across that boundary: _OwnSlice's backward gathers all slices' gradients, _StackOutputs' backward keeps
# this rank's slot, so the analytical Jacobian is the collective's own backward and nothing else.
class _OwnSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stacked):
        return stacked[dist.get_rank()].clone()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, grad.contiguous())
        return torch.stack(parts)


class _StackOutputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out):
        parts = [torch.empty_like(out) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, out.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[dist.get_rank()].clone()


def global_map(op):
    return lambda stacked: _StackOutputs.apply(op(_OwnSlice.apply(stacked)))


def distributed_gradcheck(grid, op, shape, seed=0):
    world = grid.world_size
    stacked = shared_randn(world, *shape, seed=seed).requires_grad_()
    # fast mode: the Jacobian against random vectors, u^T J v both ways (every element still perturbed, but one
    # vector product per direction instead of one per element; each evaluation is a collective on every rank)
    ok = torch.autograd.gradcheck(global_map(op), (stacked,), eps=1e-6, atol=1e-8, raise_exception=False,
                                  fast_mode=True)
    agree(grid, ok)


def _ops(grid):
    p, n = grid.p, 5
    n_local = grid.layout(n).n_local
    return {
        "ring_shift row": (lambda x: cp.ring_shift(x, grid, "row", 1), (1, 2, 2, 2)),
        "ring_shift col -2": (lambda x: cp.ring_shift(x, grid, "col", -2), (1, 2, 2, 2)),
        "transpose_tiles": (lambda x: cp.transpose_tiles(x, grid), (1, 2, 2, 2)),
        "all_gather row": (lambda x: cp.all_gather(x, grid, "row", dim=2), (1, 2, 2, 1)),
        "reduce_scatter col": (lambda x: cp.reduce_scatter(x, grid, "col", dim=1), (1, 2 * p, 1, 2)),
        "all_reduce row": (lambda x: cp.all_reduce(x, grid, "row"), (1, 2, 2, 1)),
        "broadcast col": (lambda x: cp.broadcast(x, grid, "col", src=p - 1), (1, 2, 2, 1)),
        "scatter_pair": (lambda x: cp.scatter_pair(x, grid), (1, n, n, 1)),
        "gather_pair": (lambda x: cp.gather_pair(x, grid, n), (1, n_local, n_local, 1)),
        "scatter_tokens row": (lambda x: cp.scatter_tokens(x, grid, "row"), (1, n, 2)),
        "gather_tokens col": (lambda x: cp.gather_tokens(x, grid, n, "col"), (1, n_local, 2)),
    }


OP_NAMES = ["ring_shift row", "ring_shift col -2", "transpose_tiles", "all_gather row", "reduce_scatter col",
            "all_reduce row", "broadcast col", "scatter_pair", "gather_pair", "scatter_tokens row",
            "gather_tokens col"]


@pytest.mark.parametrize("name", OP_NAMES)
def test_gradcheck_float64(grid, name):
    op, shape = _ops(grid)[name]
    distributed_gradcheck(grid, op, shape, seed=len(name))


@pytest.mark.parametrize("name", OP_NAMES)
def test_backward_is_the_adjoint(grid, name):
    """Sum over ranks of <op(x), g> equals the sum over ranks of <x, op^T(g)> (dot-product test)."""
    op, shape = _ops(grid)[name]
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grid.rank)).requires_grad_()
    y = op(x)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 + grid.rank))
    (grad,) = torch.autograd.grad(y, x, g)
    lhs = grid.comm.allreduce(float((y.detach() * g).sum()))
    rhs = grid.comm.allreduce(float((x.detach() * grad).sum()))
    agree(grid, abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs)))
