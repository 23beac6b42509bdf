"""Pair tiles written to HDF5 by the whole grid, read back serially with plain h5py and as tiles of other grids.

Run at 1, 4 and 9 ranks (p = 1, 2, 3), with one parallel file (mpio) and with the per-rank fallback forced.
N = 2 leaves whole blocks of padding on the 3 x 3 grid (ranks with nothing to write still take part in the
collective writes); N = 7 is not a multiple of 2 or 3.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import everywhere
from foldcp_hpc.distributed.layout import TileLayout
from foldcp_hpc.io.h5complete import verify
from foldcp_hpc.io.h5layout import rank_file_name
from foldcp_hpc.io.tiles import FALLBACK_ENV, PairFile, read_tile, read_tokens

pytestmark = pytest.mark.mpi

C, S, C_S = 3, 2, 4


@pytest.fixture
def shared_dir(grid):
    """One folder every rank sees (each rank has its own pytest tmp_path), removed after the test."""
    path = grid.comm.bcast(tempfile.mkdtemp(prefix="h5tiles-", dir="/tmp") if grid.rank == 0 else None, root=0)
    yield Path(path)
    grid.comm.Barrier()
    if grid.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def full_tensors(n: int) -> dict[str, np.ndarray]:
    """The same random tensors on every rank: z [N, N, C], pae [S, N, N], s [N, C_s], counters [3]."""
    rng = np.random.default_rng(n)
    return {"/trunk/z": rng.standard_normal((n, n, C)).astype(np.float32),
            "/confidence/pae": rng.standard_normal((S, n, n)).astype(np.float32),
            "/trunk/s": rng.standard_normal((n, C_S)),
            "/checkpoint/counters": np.array([3, 1, 4], dtype=np.int64)}


def padded(array: np.ndarray, dims: tuple[int, ...], layout: TileLayout) -> np.ndarray:
    widths = [(0, layout.n_pad if d in dims else 0) for d in range(array.ndim)]
    return np.pad(array, widths)


def pair_tile(array: np.ndarray, dims: tuple[int, int], layout: TileLayout, row: int, col: int) -> np.ndarray:
    """``[*lead, n_local, n_local, *trail]`` tile (row-block, col-block) of ``array`` padded as the grid holds it."""
    index = [slice(None)] * array.ndim
    index[dims[0]], index[dims[1]] = layout.block(row), layout.block(col)
    return padded(array, dims, layout)[tuple(index)]


def write_all(path: Path, comm, p: int, row: int, col: int, full: dict[str, np.ndarray], fallback) -> PairFile:
    n = full["/trunk/z"].shape[0]
    layout = TileLayout(n, p)
    with PairFile(path, comm, p, attrs={"stage": "trunk", "config": "[model]\ndtype = 'float32'\n"},
                  fallback=fallback) as out:
        out.create_pair("/trunk/z", n, trail=(C,))
        out.create_pair("/confidence/pae", n, lead=(S,))
        out.create_tokens("/trunk/s", n, trail=(C_S,), dtype=np.float64)
        out.write_tile("/trunk/z", pair_tile(full["/trunk/z"], (0, 1), layout, row, col))
        pae_tile = pair_tile(full["/confidence/pae"], (1, 2), layout, row, col)
        for sample in range(S):  # one sample at a time, as the confidence module makes them
            out.write_tile("/confidence/pae", pae_tile[sample], lead=(sample,))
        out.write_tokens("/trunk/s", padded(full["/trunk/s"], (0,), layout))
        out.write_replicated("/checkpoint/counters", full["/checkpoint/counters"])
    return out


@pytest.mark.parametrize("fallback", [False, True], ids=["mpio", "fallback"])
@pytest.mark.parametrize("n", [2, 7])
def test_tiles_read_back_whole_and_as_other_grids(grid, shared_dir, n, fallback):
    full = full_tensors(n)
    path = shared_dir / f"tiles-{n}.h5"
    out = write_all(path, grid.comm, grid.p, grid.row, grid.col, full, fallback)
    assert out.fallback == fallback
    ok = True
    if grid.rank == 0:  # serially, plain h5py
        with h5py.File(path, "r") as h5:
            for name, expected in full.items():
                ok &= h5[name].shape == expected.shape and np.array_equal(h5[name][()], expected)
            ok &= h5["/trunk/z"].chunks is None if fallback else h5["/trunk/z"].chunks == (
                min(n, TileLayout(n, grid.p).n_local),) * 2 + (C,)
            ok &= h5.attrs["writer"] == ("fallback" if fallback else "mpio") and h5.attrs["stage"] == "trunk"
        ok &= verify(path)
        ok &= all(rank_file_name(path, k).exists() == fallback for k in range(grid.world_size))
    assert everywhere(grid, ok)
    # every tile of grids 1..4 (shared round-robin over the ranks) equals the padded tensor's tile
    ok = True
    for p_other in (1, 2, 3, 4):
        layout = TileLayout(n, p_other)
        for index in range(grid.rank, p_other * p_other, grid.world_size):
            row, col = divmod(index, p_other)
            ok &= np.array_equal(read_tile(path, "/trunk/z", p_other, row, col),
                                 pair_tile(full["/trunk/z"], (0, 1), layout, row, col))
            pae = pair_tile(full["/confidence/pae"], (1, 2), layout, row, col)
            ok &= np.array_equal(read_tile(path, "/confidence/pae", p_other, row, col), pae)
            ok &= np.array_equal(read_tile(path, "/confidence/pae", p_other, row, col, lead=(1,)), pae[1])
            ok &= np.array_equal(read_tokens(path, "/trunk/s", p_other, row),
                                 padded(full["/trunk/s"], (0,), layout)[layout.block(row)])
    # and this rank's own tile at the writing grid (resume on the same grid)
    layout = TileLayout(n, grid.p)
    ok &= np.array_equal(read_tile(path, "/trunk/z", grid.p, grid.row, grid.col),
                         pair_tile(full["/trunk/z"], (0, 1), layout, grid.row, grid.col))
    assert everywhere(grid, ok)


def test_environment_forces_the_fallback(grid, shared_dir, monkeypatch):
    monkeypatch.setenv(FALLBACK_ENV, "1")
    full = full_tensors(5)
    path = shared_dir / "env.h5"
    out = write_all(path, grid.comm, grid.p, grid.row, grid.col, full, None)
    ok = out.fallback and rank_file_name(path, grid.rank).exists()
    if grid.rank == 0:
        ok &= verify(path) and np.array_equal(h5py.File(path, "r")["/trunk/z"][()], full["/trunk/z"])
    assert everywhere(grid, ok)


def test_only_the_first_replica_writes(grid, shared_dir):
    """dp = world size, p = 1: every rank a 1 x 1 grid holding the whole tensor; replica 0 alone writes."""
    from foldcp_hpc.distributed.grid import ProcessGrid

    full = full_tensors(4)
    path = shared_dir / "replicas.h5"
    with ProcessGrid.create(cp=1, backend="gloo") as replicas:
        out = PairFile.for_grid(path, replicas, attrs={"stage": "trunk"})
        ok = (out is None) == (replicas.replica != 0)
        if out is not None:
            out.create_pair("/trunk/z", 4, trail=(C,))
            out.write_tile("/trunk/z", full["/trunk/z"])
            out.close()
        replicas.barrier()
        if grid.rank == 0:
            with h5py.File(path, "r") as h5:
                ok &= np.array_equal(h5["/trunk/z"][()], full["/trunk/z"])
                ok &= int(h5.attrs["grid_dp"]) == grid.world_size and int(h5.attrs["grid_p"]) == 1
    assert everywhere(grid, ok)
