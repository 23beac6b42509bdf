"""The process grid: dp replicas of a p x p context-parallel grid, built from an MPI communicator.

``ProcessGrid.create`` is the only place where ranks meet: it builds a Cartesian MPI communicator of
shape (dp, p, p), bootstraps torch.distributed from MPI alone (no MASTER_ADDR, RANK or WORLD_SIZE
needed, so the same code runs under mpirun, srun and PBS's mpiexec), picks one device per rank from
the node-local rank, and creates the row, column, replica and grid groups in the same order on
every rank. Everything downstream receives the grid as an argument.

Rank numbering (Cartesian, row-major, no reordering): rank = replica * p * p + row * p + col.

Worked examples (global ranks):

* p = 2, dp = 1 (4 ranks)::

      grid       col 0  col 1        row groups: [0, 1] [2, 3]
      row 0        0      1          col groups: [0, 2] [1, 3]
      row 1        2      3

* p = 3, dp = 1 (9 ranks)::

      grid       col 0  col 1  col 2   row groups: [0, 1, 2] [3, 4, 5] [6, 7, 8]
      row 0        0      1      2     col groups: [0, 3, 6] [1, 4, 7] [2, 5, 8]
      row 1        3      4      5
      row 2        6      7      8

* p = 2, dp = 2 (8 ranks): replica 0 holds ranks 0-3 and replica 1 ranks 4-7, each laid out as the
  first example; replica groups pair the same grid position: [0, 4] [1, 5] [2, 6] [3, 7].
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..errors import UniformError
from .launch_check import check_world_size
from .layout import TileLayout
from .transport import Transport, resolve_transport

if TYPE_CHECKING:  # mpi4py is imported lazily: importing the package must not initialise MPI
    from mpi4py import MPI

__all__ = ["AxisGroup", "ProcessGrid", "GridError", "infer_grid_shape", "grid_rank", "axis_members", "axis_groups"]

class GridError(UniformError):
    """The world cannot be laid out as the requested grid."""


def infer_grid_shape(world_size: int, p: int | None = None, dp: int | None = None) -> tuple[int, int]:
    """Return ``(dp, p)`` with ``dp * p * p == world_size``, filling in whichever is not given.

    With neither given, dp = 1 and p = sqrt(world_size). Raises :class:`GridError` with the numbers
    when the world cannot be laid out that way.
    """
    if world_size < 1:
        raise GridError(f"world size must be positive, got {world_size}")
    if p is not None and p < 1:
        raise GridError(f"grid side p must be positive, got {p}")
    if dp is not None and dp < 1:
        raise GridError(f"replica count dp must be positive, got {dp}")
    if p is None:
        dp = 1 if dp is None else dp
        if world_size % dp:
            raise GridError(f"{world_size} ranks cannot hold {dp} replicas of a square grid")
        per_replica = world_size // dp
        p = math.isqrt(per_replica)
        if p * p != per_replica:
            raise GridError(
                f"{world_size} ranks / {dp} replica(s) = {per_replica} ranks per replica, which is not a square; "
                f"use {p * p * dp} or {(p + 1) ** 2 * dp} ranks, or set the grid explicitly"
            )
    elif dp is None:
        if world_size % (p * p):
            raise GridError(f"grid {p}x{p} needs a multiple of {p * p} ranks, got {world_size}")
        dp = world_size // (p * p)
    if dp * p * p != world_size:
        shape = f"{p}x{p}" if dp == 1 else f"{dp}x{p}x{p} (dp x p x p)"
        raise GridError(f"grid {shape} needs {dp * p * p} ranks, got {world_size}")
    return dp, p


def grid_rank(replica: int, row: int, col: int, p: int) -> int:
    """Global rank of grid position (replica, row, col): row-major, replica slowest."""
    return (replica * p + row) * p + col


@dataclasses.dataclass(eq=False)
class AxisGroup:
    """The ranks that share all grid coordinates but one (or, for ``grid``, the whole p x p grid).

    Attributes:
        name: ``row`` (same row, col varies), ``col`` (same col, row varies), ``replica`` or ``grid``.
        ranks: global ranks of the group in group order.
        index: this rank's position in ``ranks``.
        group: the torch.distributed group, or None when the group has one rank (collectives then
            return early) or is the whole world (the default group is used).
        comm: the matching MPI communicator (for MPI-side work such as parallel HDF5).
    """

    name: str
    ranks: tuple[int, ...]
    index: int
    group: Any
    comm: Any

    @property
    def size(self) -> int:
        return len(self.ranks)

    def global_rank(self, index: int) -> int:
        """Global rank of the member at group position ``index`` (taken modulo the size)."""
        return self.ranks[index % self.size]


class ProcessGrid:
    """dp replicas of a p x p context-parallel grid of ranks, with its torch.distributed groups.

    Build it with :meth:`create`; use it as a context manager or call :meth:`destroy` at the end.

    Attributes:
        dp, p: replica count and grid side; world size is ``dp * p * p``.
        rank, world_size: global rank (torch.distributed rank equals the MPI rank of ``comm``).
        replica, row, col: this rank's coordinates.
        row_group: ranks with the same (replica, row): the "row" axis, along which col varies.
        col_group: ranks with the same (replica, col): the "col" axis, along which row varies.
        replica_group: ranks with the same (row, col) in every replica.
        grid_group: the p x p ranks of this rank's replica.
        transport: how tensors travel (nccl, gloo, or host-staged gloo).
        device: this rank's compute device.
        comm: the Cartesian MPI communicator (dims dp, p, p).
        local_rank, local_size: position among the ranks on this node.
        n_tokens: N of the last pair tensor given to :meth:`scatter_pair` (None before).
    """

    def __init__(self, *, comm: Any, dp: int, p: int, transport: Transport, device: torch.device,
                 local_rank: int, local_size: int, groups: dict[str, AxisGroup], owns_torch: bool):
        self.comm = comm
        self.dp = dp
        self.p = p
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self.replica, self.row, self.col = comm.Get_coords(self.rank)
        self.transport = transport
        self.device = device
        self.local_rank = local_rank
        self.local_size = local_size
        self.row_group = groups["row"]
        self.col_group = groups["col"]
        self.replica_group = groups["replica"]
        self.grid_group = groups["grid"]
        self._owns_torch = owns_torch
        self._destroyed = False
        self.n_tokens: int | None = None
        self.comm_clock = None  # a clock.CommClock to time the collectives (timing breakdowns only)

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, cp: int | None = None, dp: int | None = None, *, comm: "MPI.Comm | None" = None,
               backend: str = "auto", timeout_s: float = 600.0) -> "ProcessGrid":
        """Lay the ranks of ``comm`` (default ``MPI.COMM_WORLD``) out as dp x p x p and start torch.distributed.

        Args:
            cp: side p of the context-parallel grid; inferred from the world size and ``dp`` when None.
            dp: replica count; 1 when both are None, else ``world_size // cp**2``.
            comm: the MPI communicator holding exactly the ranks of the job.
            backend: how tensors travel: ``auto``, ``nccl``, ``gloo`` or ``host`` (see :mod:`.transport`).
            timeout_s: torch.distributed timeout for every collective.

        Raises:
            GridError: the world size is not dp * p * p (the message carries the numbers).
            LaunchError: the launcher started a different number of processes than MPI's world holds (ranks
                started as separate one-rank jobs); see :mod:`.launch_check`.
        """
        from mpi4py import MPI

        # Before anything else: a launch split into one-rank jobs would otherwise fold the whole input once per
        # process, each on a 1 x 1 grid.
        check_world_size(MPI.COMM_WORLD.Get_size())
        comm = MPI.COMM_WORLD if comm is None else comm
        dp, p = infer_grid_shape(comm.Get_size(), cp, dp)
        cart = comm.Create_cart([dp, p, p], periods=[False, True, True], reorder=False)
        node = cart.Split_type(MPI.COMM_TYPE_SHARED, key=cart.Get_rank())
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()

        transport_ = resolve_transport(backend, local_size=local_size)
        device = transport_.device_for(local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)

        owns_torch = False
        if not dist.is_initialized():
            _init_torch_distributed(cart, transport_, device, timeout_s)
            owns_torch = True
        elif dist.get_world_size() != cart.Get_size() or dist.get_rank() != cart.Get_rank():
            raise GridError(
                f"torch.distributed is already initialised with rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but MPI says rank {cart.Get_rank()} of {cart.Get_size()}"
            )
        groups = _build_groups(cart, dp, p)
        return cls(comm=cart, dp=dp, p=p, transport=transport_, device=device, local_rank=local_rank,
                   local_size=local_size, groups=groups, owns_torch=owns_torch)

    # ---------------------------------------------------------------------------------------------------
    def axis(self, name: str) -> AxisGroup:
        """The group of axis ``name`` (``row``, ``col``, ``replica`` or ``grid``)."""
        try:
            return {"row": self.row_group, "col": self.col_group, "replica": self.replica_group,
                    "grid": self.grid_group}[name]
        except KeyError:
            raise ValueError(f"unknown grid axis {name!r}; expected one of row, col, replica, grid") from None

    def rank_of(self, row: int, col: int, replica: int | None = None) -> int:
        """Global rank of grid position (row, col) in ``replica`` (default: this rank's replica)."""
        replica = self.replica if replica is None else replica
        return grid_rank(replica, row % self.p, col % self.p, self.p)

    @property
    def cp(self) -> int:
        """Side of the context-parallel grid (same as ``p``)."""
        return self.p

    def scatter_pair(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's tile of ``full: [B, N, N, C]`` held whole by every rank (see :func:`.autograd.scatter_pair`).

        Records N as ``n_tokens``: layers called without ``n_tokens`` take it from there to tell padding
        from masked tokens.
        """
        from .autograd import scatter_pair

        self.n_tokens = full.shape[1]
        return scatter_pair(full, self)

    def padding_for(self, n_local: int, n_tokens: int | None = None) -> int | None:
        """The true N for tiles of ``n_local`` rows: ``n_tokens`` if given, else the one recorded by
        :meth:`scatter_pair` when it fits tiles of that size, else None (padding then counts as masked)."""
        n = self.n_tokens if n_tokens is None else n_tokens
        if n is None or self.layout(n).n_local != n_local:
            return None
        return n

    def gather_pair(self, tile: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """The whole ``[B, N, N, C]`` on every rank from the tiles (see :func:`.autograd.gather_pair`)."""
        from .autograd import gather_pair

        return gather_pair(tile, self, n_tokens)

    def layout(self, n_global: int) -> TileLayout:
        """Tile layout of an N-token pair tensor on this grid."""
        return TileLayout(n_global, self.p)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} at (replica {self.replica}, row {self.row}, col {self.col}) "
                f"of grid {self.dp}x{self.p}x{self.p}, transport {self.transport.name}, device {self.device}")

    def barrier(self) -> None:
        self.comm.Barrier()

    def destroy(self) -> None:
        """Free the MPI communicators and, if this grid started it, shut torch.distributed down."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._owns_torch and dist.is_initialized():
            dist.destroy_process_group()
        for group in (self.row_group, self.col_group, self.replica_group, self.grid_group):
            group.comm.Free()
        self.comm.Free()

    def __enter__(self) -> "ProcessGrid":
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"ProcessGrid(dp={self.dp}, p={self.p}, rank={self.rank}, transport={self.transport.name})"


# ------------------------------------------------------------------------------------------------------------
def _master_address(cart: Any) -> str:
    """Address of rank 0 that every rank can reach: loopback when all ranks share rank 0's host.

    Across nodes, rank 0 takes the local address its kernel would route to another rank's host (a UDP
    ``connect`` sends nothing), which avoids hostnames that resolve to 127.0.1.1; ``FOLDCP_MASTER_ADDR``
    overrides.
    """
    hostname = socket.gethostname()
    hosts = cart.allgather(hostname)
    if all(h == hosts[0] for h in hosts):
        return "127.0.0.1"
    address = None
    if cart.Get_rank() == 0:
        address = os.environ.get("FOLDCP_MASTER_ADDR")
        if not address:
            peer = next(h for h in hosts if h != hostname)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((peer, 9))
                address = probe.getsockname()[0]
    return cart.bcast(address, root=0)


def _init_torch_distributed(cart: Any, transport: Transport, device: torch.device, timeout_s: float) -> None:
    """Start torch.distributed from MPI: rank 0 opens a TCPStore on a free port and broadcasts it."""
    rank, world_size = cart.Get_rank(), cart.Get_size()
    timeout = timedelta(seconds=timeout_s)
    host = _master_address(cart)
    if rank == 0:
        # port 0: the store binds a free port itself, so there is no race between choosing and binding
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        port = store.port
    else:
        store, port = None, None
    port = cart.bcast(port, root=0)
    if rank != 0:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    kwargs: dict[str, Any] = {}
    if transport.backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(transport.backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout, **kwargs)


def axis_members(axis: str, dp: int, p: int, replica: int, row: int, col: int) -> tuple[int, ...]:
    """Global ranks of the ``axis`` group through grid position (replica, row, col), in group order (pure)."""
    if axis == "row":  # same (replica, row); col varies
        return tuple(grid_rank(replica, row, c, p) for c in range(p))
    if axis == "col":  # same (replica, col); row varies
        return tuple(grid_rank(replica, r, col, p) for r in range(p))
    if axis == "replica":  # same (row, col); replica varies
        return tuple(grid_rank(d, row, col, p) for d in range(dp))
    if axis == "grid":  # the p x p grid of this replica
        return tuple(grid_rank(replica, r, c, p) for r in range(p) for c in range(p))
    raise ValueError(f"unknown grid axis {axis!r}; expected one of row, col, replica, grid")


def axis_groups(axis: str, dp: int, p: int) -> list[tuple[int, ...]]:
    """Every ``axis`` group of a dp x p x p grid, in the one order all ranks create them (pure)."""
    if axis == "row":
        return [axis_members("row", dp, p, d, r, 0) for d in range(dp) for r in range(p)]
    if axis == "col":
        return [axis_members("col", dp, p, d, 0, c) for d in range(dp) for c in range(p)]
    if axis == "replica":
        return [axis_members("replica", dp, p, 0, r, c) for r in range(p) for c in range(p)]
    if axis == "grid":
        return [axis_members("grid", dp, p, d, 0, 0) for d in range(dp)]
    raise ValueError(f"unknown grid axis {axis!r}; expected one of row, col, replica, grid")


_REMAIN_DIMS = {"row": [False, False, True], "col": [False, True, False], "replica": [True, False, False],
                "grid": [False, True, True]}


def _build_groups(cart: Any, dp: int, p: int) -> dict[str, AxisGroup]:
    """Row, col, replica and grid groups, created in one fixed order on every rank.

    ``dist.new_group`` is collective over the whole world even for groups a rank is not in, so every
    rank walks the same lists. Single-rank groups get no torch group (collectives return early), and
    a group spanning the world reuses the default group.
    """
    rank = cart.Get_rank()
    coords = cart.Get_coords(rank)
    world = cart.Get_size()
    groups: dict[str, AxisGroup] = {}
    for axis in ("row", "col", "replica", "grid"):
        own = axis_members(axis, dp, p, *coords)
        torch_group = None
        for ranks in axis_groups(axis, dp, p):
            if len(ranks) == 1 or len(ranks) == world:
                continue  # no group needed: early return, or the default group
            created = dist.new_group(list(ranks))
            if ranks == own:
                torch_group = created
        groups[axis] = AxisGroup(name=axis, ranks=own, index=own.index(rank), group=torch_group,
                                 comm=cart.Sub(_REMAIN_DIMS[axis]))
    return groups
