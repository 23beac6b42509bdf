"""Grid shapes, rank numbering, group membership and transport choice: pure, no MPI."""

from __future__ import annotations

import pytest

from foldcp_hpc.distributed.grid import GridError, axis_groups, axis_members, grid_rank, infer_grid_shape
from foldcp_hpc.distributed.transport import resolve_transport


@pytest.mark.parametrize("world,p,dp,expected", [
    (1, None, None, (1, 1)), (4, None, None, (1, 2)), (9, None, None, (1, 3)), (64, None, None, (1, 8)),
    (8, 2, None, (2, 2)), (8, None, 2, (2, 2)), (18, 3, 2, (2, 3)), (4, 1, None, (4, 1)),
])
def test_infer_grid_shape(world, p, dp, expected):
    assert infer_grid_shape(world, p, dp) == expected


@pytest.mark.parametrize("world,p,dp,message", [
    (8, 3, None, "grid 3x3 needs a multiple of 9 ranks, got 8"),
    (8, None, None, "8 ranks / 1 replica(s) = 8 ranks per replica, which is not a square; use 4 or 9 ranks"),
    (9, 3, 2, "grid 2x3x3 (dp x p x p) needs 18 ranks, got 9"), (4, 3, 1, "grid 3x3 needs 9 ranks, got 4"),
    (6, None, 4, "6 ranks cannot hold 4 replicas"),
    (4, 0, None, "grid side p must be positive, got 0"),
])
def test_bad_grid_shapes_say_the_numbers(world, p, dp, message):
    with pytest.raises(GridError) as info:
        infer_grid_shape(world, p, dp)
    assert message in str(info.value)


def test_documented_rank_lists():
    # the lists in docs/design.md and in the grid module's docstring
    assert axis_groups("row", 1, 2) == [(0, 1), (2, 3)]
    assert axis_groups("col", 1, 2) == [(0, 2), (1, 3)]
    assert axis_groups("row", 1, 3) == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    assert axis_groups("col", 1, 3) == [(0, 3, 6), (1, 4, 7), (2, 5, 8)]
    assert axis_groups("replica", 2, 2) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert axis_groups("grid", 2, 2) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert axis_groups("row", 2, 2) == [(0, 1), (2, 3), (4, 5), (6, 7)]


@pytest.mark.parametrize("dp,p", [(1, 1), (1, 2), (1, 3), (2, 2), (3, 2), (2, 3)])
def test_every_rank_is_in_exactly_one_group_per_axis(dp, p):
    world = dp * p * p
    for axis in ("row", "col", "replica", "grid"):
        groups = axis_groups(axis, dp, p)
        members = sorted(r for g in groups for r in g)
        assert members == list(range(world)), axis
        for d in range(dp):
            for r in range(p):
                for c in range(p):
                    rank = grid_rank(d, r, c, p)
                    assert rank in axis_members(axis, dp, p, d, r, c)
                    assert axis_members(axis, dp, p, d, r, c) in groups


def test_transport_resolution():
    assert resolve_transport("auto", local_size=4, n_gpus=0).name == "gloo"
    assert resolve_transport("auto", local_size=4, n_gpus=4).name == "nccl"
    assert resolve_transport("auto", local_size=4, n_gpus=1).name == "host"
    host = resolve_transport("host", local_size=9, n_gpus=2)
    assert host.backend == "gloo" and host.staged
    assert [host.device_for(k).index for k in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="this node runs 4 ranks on 1 GPU"):
        resolve_transport("nccl", local_size=4, n_gpus=1)
    with pytest.raises(ValueError, match="needs CUDA GPUs"):
        resolve_transport("host", local_size=1, n_gpus=0)
    with pytest.raises(ValueError, match="unknown transport 'mpi'"):
        resolve_transport("mpi", local_size=1, n_gpus=0)
