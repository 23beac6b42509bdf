"""Raw (non-differentiable) operations on the groups of a :class:`ProcessGrid`.

Every function takes the grid and names the axis explicitly; none keeps state between calls.
Tensors are sent through ``grid.transport`` (host-staged for ``host``). Each returns early, with no
communication, when its group has one rank. :mod:`.autograd` wraps these into differentiable
operations; call those from model code.

Axis names: ``row`` (the ranks of this grid row; the column index varies along it), ``col`` (the
ranks of this grid column; the row index varies), ``replica`` and ``grid`` (the p x p grid of this
replica).
"""

from __future__ import annotations

import functools
import inspect
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .grid import AxisGroup, ProcessGrid

__all__ = [
    "Pending",
    "start_shift",
    "shift",
    "start_exchange",
    "exchange",
    "transpose",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "broadcast",
    "reduce",
    "gather_to",
    "scatter_from",
    "exchange_pieces",
]


_F = TypeVar("_F", bound=Callable[..., Any])


def _clock_of(grid: "ProcessGrid"):
    clock = getattr(grid, "comm_clock", None)
    return nullcontext() if clock is None else clock.span()


def _clocked(fn: _F) -> _F:
    """Count the call's time on ``grid.comm_clock`` when the grid has one (see :mod:`.clock`)."""
    position = list(inspect.signature(fn).parameters).index("grid")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        grid = args[position] if len(args) > position else kwargs["grid"]
        with _clock_of(grid):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Pending:
    """A message in flight; :meth:`wait` returns the received tensor on the compute device.

    ``handle = start_shift(...)``; compute; ``x = handle.wait()``.
    """

    def __init__(self, works: Sequence[dist.Work], received: torch.Tensor, like: torch.Tensor, grid: "ProcessGrid"):
        self._works = list(works)
        self._received = received
        self._like = like
        self._grid = grid
        self._result: torch.Tensor | None = None

    @classmethod
    def done(cls, tensor: torch.Tensor, grid: "ProcessGrid") -> "Pending":
        pending = cls((), tensor, tensor, grid)
        pending._result = tensor
        return pending

    def wait(self) -> torch.Tensor:
        if self._result is None:
            with _clock_of(self._grid):
                for work in self._works:
                    work.wait()
                self._result = self._grid.transport.from_wire(self._received, self._like)
            self._works = []
        return self._result


def _sendrecv(x: torch.Tensor, grid: "ProcessGrid", send_to: int, recv_from: int) -> Pending:
    """Post a send of ``x`` to global rank ``send_to`` and a receive of the same shape from ``recv_from``."""
    transport = grid.transport
    wire = transport.to_wire(x)
    received = transport.wire_like(x)
    ops = [dist.P2POp(dist.isend, wire, send_to), dist.P2POp(dist.irecv, received, recv_from)]
    works = dist.batch_isend_irecv(ops)
    # keep the send buffer alive until the send completes: it is referenced by the Pending
    pending = Pending(works, received, x, grid)
    pending._send_buffer = wire  # type: ignore[attr-defined]
    return pending


@_clocked
def start_shift(x: torch.Tensor, grid: "ProcessGrid", axis: str, offset: int = 1) -> Pending:
    """Start a ring shift along ``axis``: group position i sends ``x`` to i + offset, receives from i - offset.

    Every member must pass a tensor of the same shape and dtype. After ``wait()``, position i holds
    what position ``i - offset`` (mod size) had.
    """
    group = grid.axis(axis)
    if group.size == 1 or offset % group.size == 0:
        return Pending.done(x, grid)
    return _sendrecv(x, grid, group.global_rank(group.index + offset), group.global_rank(group.index - offset))


def shift(x: torch.Tensor, grid: "ProcessGrid", axis: str, offset: int = 1) -> torch.Tensor:
    """Blocking :func:`start_shift`."""
    return start_shift(x, grid, axis, offset).wait()


@_clocked
def start_exchange(x: torch.Tensor, grid: "ProcessGrid", peer: int) -> Pending:
    """Start swapping ``x`` with global rank ``peer`` (which must call this with our rank as its peer)."""
    if peer == grid.rank:
        return Pending.done(x, grid)
    return _sendrecv(x, grid, peer, peer)


def exchange(x: torch.Tensor, grid: "ProcessGrid", peer: int) -> torch.Tensor:
    """Blocking :func:`start_exchange`."""
    return start_exchange(x, grid, peer).wait()


@_clocked
def transpose(x: torch.Tensor, grid: "ProcessGrid", dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """Tile (r, c) of the transposed pair tensor: swap tiles with rank (c, r), then swap ``dims`` locally.

    Returns a transposed view of the received tile (no second copy); callers needing contiguity copy.
    """
    received = exchange(x.contiguous(), grid, grid.rank_of(grid.col, grid.row))
    return received.transpose(*dims)  # [B,J,I,C] -> [B,I,J,C] for dims (1, 2)


@_clocked
def all_gather(x: torch.Tensor, grid: "ProcessGrid", axis: str, dim: int) -> torch.Tensor:
    """Concatenate every member's ``x`` along ``dim``, in group order; same result on every member."""
    group = grid.axis(axis)
    if group.size == 1:
        return x
    transport = grid.transport
    wire = transport.to_wire(x)
    parts = [transport.wire_like(x) for _ in range(group.size)]
    dist.all_gather(parts, wire, group=group.group)
    return transport.from_wire(torch.cat(parts, dim=dim), x)


@_clocked
def reduce_scatter(x: torch.Tensor, grid: "ProcessGrid", axis: str, dim: int) -> torch.Tensor:
    """Sum ``x`` over the members, then keep this member's chunk of ``dim`` (size must divide evenly)."""
    group = grid.axis(axis)
    if group.size == 1:
        return x
    if x.shape[dim] % group.size:
        raise ValueError(f"reduce_scatter along {axis}: dim {dim} has size {x.shape[dim]}, "
                         f"not divisible by the group size {group.size}")
    transport = grid.transport
    chunk = x.shape[dim] // group.size
    if transport.backend == "nccl":
        stacked = x.movedim(dim, 0).contiguous()  # [.., D, ..] -> [D, ..]
        out = torch.empty((chunk,) + stacked.shape[1:], dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, stacked, group=group.group)
        return out.movedim(0, dim)
    # gloo: all-reduce, then keep our chunk (gloo has no reduce-scatter for every dtype)
    wire = transport.to_wire(x).clone()
    dist.all_reduce(wire, group=group.group)
    return transport.from_wire(wire.narrow(dim, group.index * chunk, chunk).contiguous(), x)


def _own_wire(x: torch.Tensor, grid: "ProcessGrid") -> torch.Tensor:
    """``x`` as sent, in a buffer of its own (in-place collectives must not write into the caller's tensor)."""
    wire = grid.transport.to_wire(x)
    return wire.clone() if wire.data_ptr() == x.data_ptr() else wire


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@_clocked
def all_reduce(x: torch.Tensor, grid: "ProcessGrid", axis: str, op: str = "sum") -> torch.Tensor:
    """Element-wise ``op`` (sum, max, min) over the members; returns a new tensor, ``x`` is untouched."""
    group = grid.axis(axis)
    if group.size == 1:
        return x
    wire = _own_wire(x, grid)
    dist.all_reduce(wire, op=_OPS[op], group=group.group)
    return grid.transport.from_wire(wire, x)


@_clocked
def broadcast(x: torch.Tensor, grid: "ProcessGrid", axis: str, src: int = 0) -> torch.Tensor:
    """Every member gets group position ``src``'s ``x`` (all members pass tensors of the same shape)."""
    group = grid.axis(axis)
    if group.size == 1:
        return x
    wire = _own_wire(x, grid)
    dist.broadcast(wire, src=group.global_rank(src), group=group.group)
    return grid.transport.from_wire(wire, x)


@_clocked
def reduce(x: torch.Tensor, grid: "ProcessGrid", axis: str, dst: int = 0) -> torch.Tensor:
    """Sum over the members onto group position ``dst``; other members get zeros."""
    group = grid.axis(axis)
    if group.size == 1:
        return x
    wire = _own_wire(x, grid)
    dist.reduce(wire, dst=group.global_rank(dst), group=group.group)
    if group.index != dst:
        return torch.zeros_like(x)
    return grid.transport.from_wire(wire, x)


@_clocked
def gather_to(x: torch.Tensor, grid: "ProcessGrid", axis: str, dst: int = 0) -> list[torch.Tensor] | None:
    """Every member's ``x`` (same shape) onto group position ``dst``, as a list in group order; None elsewhere.

    Messages arrive one at a time, so ``dst`` holds the pieces and nothing more: the output path for
    data that only ``dst`` writes.
    """
    group = grid.axis(axis)
    if group.size == 1:
        return [x]
    transport = grid.transport
    if group.index != dst:
        dist.send(transport.to_wire(x), dst=group.global_rank(dst))
        return None
    parts = []
    for index in range(group.size):
        if index == dst:
            parts.append(x)
            continue
        buffer = transport.wire_like(x)
        dist.recv(buffer, src=group.global_rank(index))
        parts.append(transport.from_wire(buffer, x))
    return parts


@_clocked
def scatter_from(parts: Sequence[torch.Tensor] | None, like: torch.Tensor, grid: "ProcessGrid", axis: str,
                 src: int = 0) -> torch.Tensor:
    """Group position ``src`` sends ``parts[i]`` to position i; every member passes ``like`` (shape, dtype).

    The input path for data that only ``src`` has read; other members pass ``parts=None``.
    """
    group = grid.axis(axis)
    if group.index == src:
        if parts is None or len(parts) != group.size:
            raise ValueError(f"scatter_from along {axis}: the source needs {group.size} parts, "
                             f"got {None if parts is None else len(parts)}")
        if group.size == 1:
            return parts[0].to(like.device)
    if group.size == 1:
        return like
    transport = grid.transport
    if group.index == src:
        for index, part in enumerate(parts):
            if index != src:
                dist.send(transport.to_wire(part.to(like.dtype)), dst=group.global_rank(index))
        return parts[src].to(device=like.device, dtype=like.dtype)
    buffer = transport.wire_like(like)
    dist.recv(buffer, src=group.global_rank(src))
    return transport.from_wire(buffer, like)


@_clocked
def exchange_pieces(sends: Sequence[tuple[int, torch.Tensor]], receives: Sequence[tuple[int, torch.Tensor]],
                    grid: "ProcessGrid", axis: str) -> list[torch.Tensor]:
    """Point-to-point pieces between members of ``axis``: a sparse all-to-all.

    sends: ``(position, tensor)``: send ``tensor`` to group position ``position``.
    receives: ``(position, like)``: receive a tensor shaped like ``like`` from ``position``.
    Every send must be matched by the peer's receive of the same shape (the callers derive both sides from
    one pure plan, e.g. :class:`.atom_layout.AtomWindowLayout`). All messages are posted together, so the
    order of the lists cannot deadlock. Returns the received tensors, in the order of ``receives``, on the
    device of their ``like``.
    """
    if not sends and not receives:
        return []
    group = grid.axis(axis)
    transport = grid.transport
    wires = [transport.to_wire(tensor) for _, tensor in sends]
    buffers = [transport.wire_like(like) for _, like in receives]
    ops = [dist.P2POp(dist.isend, wire, group.global_rank(position)) for (position, _), wire in zip(sends, wires)]
    ops += [dist.P2POp(dist.irecv, buffer, group.global_rank(position))
            for (position, _), buffer in zip(receives, buffers)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return [transport.from_wire(buffer, like) for buffer, (_, like) in zip(buffers, receives)]
