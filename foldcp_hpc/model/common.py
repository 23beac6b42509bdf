"""Helpers shared by the context-parallel layers: precision, padding masks, dropout masks, ring iteration."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from ..distributed import autograd as cp
from ..distributed import collectives as raw
from ..distributed.layout import TileLayout
from ..distributed.matmul import widening_bmm

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

# Bias that removes padded keys exactly: exp(PAD_BIAS - m) is 0 for any finite logit m of a real key, and
# unlike -inf it keeps a block made only of padding finite (its softmax statistics are wiped out by the
# first block holding a real key). Masked (real) tokens keep Boltz's own -inf stand-ins (1e9 / 1e6).
PAD_BIAS = -1e30


def at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` as Boltz writes it, except that float64 stays float64 (for exact parity tests)."""
    return x if x.dtype == torch.float64 else x.float()


def block_is_padding(n_tokens: int | None, grid: "ProcessGrid", block: int, device: torch.device) -> torch.Tensor | None:
    """``[n_local]`` True at padded positions of token block ``block``; None when nothing is padded or N is unknown."""
    if n_tokens is None:
        return None
    layout = TileLayout(n_tokens, grid.p)
    if layout.n_pad == 0:
        return None
    return ~torch.tensor(layout.block_mask(block), dtype=torch.bool, device=device)


def dropout_mask(dropout: float, z: torch.Tensor, training: bool, grid: "ProcessGrid", n_tokens: int,
                 columnwise: bool = False) -> torch.Tensor | float:
    """Boltz's row-wise (or column-wise) dropout mask, drawn for all N tokens, sliced to this tile.

    Every rank draws the same ``[B, N]`` numbers from the global generator (same seed, same order), so the
    tile-local masks equal the slices of the serial mask.
    returns: [B, n_local, 1, 1] (rows of block r) or [B, 1, n_local, 1] (columns of block c), or 1.0 when off.
    """
    rate = dropout * training
    if not training or rate == 0:
        return 1.0
    shape = (z.shape[0], 1, n_tokens, 1) if columnwise else (z.shape[0], n_tokens, 1, 1)
    keep = (torch.rand(shape, dtype=torch.float32, device=z.device) >= rate) * 1.0 / (1.0 - rate)
    keep = keep.to(z.dtype)
    if columnwise:
        return cp.scatter_tokens(keep, grid, by="col", dim=2)
    return cp.scatter_tokens(keep, grid, by="row", dim=1)


def ring(tensors: Sequence[torch.Tensor], grid: "ProcessGrid", axis: str, skew: int) -> Iterator[list[torch.Tensor]]:
    """Yield ``tensors`` as they travel round ``axis``: first skewed by ``skew`` places, then one place per step.

    Position i sees, at step t, what position ``i + skew + t`` held (an offset of -1 per step). p steps in all.
    Under autograd every move is a differentiable :func:`ring_shift`; without autograd the next move is
    posted before the caller works on the current tensors (the transfer overlaps the compute).
    """
    size = grid.axis(axis).size
    if size == 1:  # nothing travels: the tensors as they are (no contiguous copy of strided views)
        yield list(tensors)
        return
    if torch.is_grad_enabled():
        current = [cp.ring_shift(t, grid, axis, -skew) for t in tensors]
        for step in range(size):
            yield current
            if step < size - 1:
                current = [cp.ring_shift(t, grid, axis, -1) for t in current]
        return
    current = [raw.shift(t.contiguous(), grid, axis, -skew) for t in tensors]
    for step in range(size):
        pending = [raw.start_shift(t, grid, axis, -1) for t in current] if step < size - 1 else []
        yield current
        current = [handle.wait() for handle in pending]


def row_chunks(n_rows: int, rows_per_chunk: int) -> list[slice]:
    """``[0, n_rows)`` cut into consecutive slices of at most ``rows_per_chunk`` rows."""
    step = max(1, rows_per_chunk)
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


# Chunked inference on a GPU never cuts a transient below this many elements: on small tiles the fractions of
# a tile would mean hundreds of tiny chunks, each a handful of kernel launches (launch-bound). On the CPU,
# where an operator costs little beyond its work, the fractions rule at every size.
CHUNK_FLOOR = 1 << 24


def rows_within(budget_elements: float, elements_per_row: int, n_rows: int) -> int:
    """How many rows fit a transient of ``budget_elements`` (at least 1, at most ``n_rows``)."""
    return max(1, min(n_rows, int(budget_elements // max(1, elements_per_row))))


INFERENCE_FRACTION = 1 / 16  # without autograd, row chunks of whole-tile computations stay within this fraction


def chunk_rows(fraction_of_tile: float, tile_elements: int, elements_per_row: int, n_rows: int,
               cuda: bool = False) -> int:
    """Rows per chunk of a row-chunked tile computation whose widest intermediate takes ``elements_per_row``
    per row: within ``fraction_of_tile`` of the tile under autograd (where the chunks' intermediates are kept for
    the backward anyway), within :data:`INFERENCE_FRACTION` of it without (on ``cuda``, not below
    :data:`CHUNK_FLOOR`)."""
    if torch.is_grad_enabled():
        return rows_within(fraction_of_tile * tile_elements, elements_per_row, n_rows)
    return inference_rows(min(fraction_of_tile, INFERENCE_FRACTION), tile_elements, elements_per_row, n_rows, cuda)


def inference_rows(fraction_of_tile: float, tile_elements: int, elements_per_row: int, n_rows: int,
                   cuda: bool = False) -> int:
    """Rows per chunk for an in-place inference path: a transient within ``fraction_of_tile`` of the tile (on
    ``cuda``, but not below :data:`CHUNK_FLOOR` elements)."""
    budget = fraction_of_tile * tile_elements
    return rows_within(max(budget, CHUNK_FLOOR) if cuda else budget, elements_per_row, n_rows)


class ChunkWriter:
    """Assembles chunk results along one dim: written into one preallocated tensor when autograd is off (no
    second copy of the whole result), concatenated when it is on (so gradients flow to every chunk)."""

    def __init__(self, dim: int, size: int, into: torch.Tensor | None = None):
        """``into``: a tensor whose storage may take the results (rows it holds are read before written)."""
        self.dim, self.size = dim, size
        self.into = into
        self.parts: list[torch.Tensor] = []
        self.out: torch.Tensor | None = None

    def put(self, where: slice, value: torch.Tensor) -> None:
        if value.requires_grad:
            self.parts.append(value)
            return
        if self.out is None:
            shape = list(value.shape)
            shape[self.dim] = self.size
            fits = self.into is not None and self.into.dtype == value.dtype and list(self.into.shape) == shape
            self.out = self.into if fits else value.new_empty(shape)
        self.out.narrow(self.dim, where.start, where.stop - where.start).copy_(value)

    def result(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=self.dim) if self.out is None else self.out


def per_token(fn: Callable[..., torch.Tensor], grid: "ProcessGrid", *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)`` for replicated token tensors, computed on this rank's token sub-block
    (:mod:`.token_blocks`) and all-gathered: each rank does 1/p² of the work and holds 1/p² of the transients.

    tensors: [B, N, ...] replicated, same N; fn maps them token by token (no mixing along dim 1).
    returns: [B, N, ...] replicated, equal to ``fn(*tensors)``.
    """
    from .token_blocks import gather_subs, to_sub

    if grid.axis("grid").size == 1:
        return fn(*tensors)
    return gather_subs(fn(*(to_sub(t, grid) for t in tensors)), grid, tensors[0].shape[1])


def repeat_samples(x: torch.Tensor, multiplicity: int) -> torch.Tensor:
    """``x.repeat_interleave(multiplicity, 0)``, as a broadcast view (no copy) when the batch is one input."""
    if multiplicity == 1:
        return x
    if x.shape[0] == 1:
        return x.expand(multiplicity, *x.shape[1:])
    return x.repeat_interleave(multiplicity, 0)


def refuse_autograd(module: "torch.nn.Module", x: Tensor) -> None:
    """Raise unless ``module.add_update(x)`` may overwrite x: autograd off, or neither x nor a parameter needs it."""
    if not torch.is_grad_enabled():
        return
    needs = ["the input"] if x.requires_grad else []
    needs += [name for name, param in module.named_parameters() if param.requires_grad][:3]
    if needs:
        raise ValueError(f"{type(module).__name__}.add_update overwrites its input and records no graph, but "
                         f"autograd is on and grad is required by {', '.join(needs)}: call it under torch.no_grad() "
                         "or torch.inference_mode(), or use x + module(x)")


def layer_norm(norm: "torch.nn.LayerNorm", x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, except that a bfloat16 / float16 x under autocast comes out in its own dtype (statistics in
    float32 inside the kernel) instead of as a float32 copy: the next layer under autocast would round it to
    x's dtype anyway, so only the weight's rounding differs, and a chunk of a pair tile costs half the memory.
    Without autograd, float32 / bfloat16 / float16 rows of a power-of-two width go through the Triton kernel
    of :mod:`foldcp_hpc.kernels.layer_norm` on CUDA (any input strides; float32 statistics)."""
    from ..kernels.layer_norm import fast_layer_norm_ok, rows_layer_norm

    low = x.dtype in (torch.bfloat16, torch.float16)
    if not (low and torch.is_autocast_enabled(x.device.type)):
        if not torch.is_grad_enabled() and norm.weight is not None and x.dtype == torch.float32 \
                and fast_layer_norm_ok(x, x.shape[-1]):
            return rows_layer_norm(x, norm.weight, norm.bias, norm.eps, x.dtype)
        return norm(x)
    if not torch.is_grad_enabled() and norm.weight is not None and fast_layer_norm_ok(x, x.shape[-1]):
        return rows_layer_norm(x, norm.weight, norm.bias, norm.eps, x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        weight = None if norm.weight is None else norm.weight.to(x.dtype)
        bias = None if norm.bias is None else norm.bias.to(x.dtype)
        return torch.nn.functional.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


def plus(z: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """z + update; without autograd into the storage of ``update`` (a module's fresh output, not used again)
    when dtypes and shapes agree, so that no third tile is made. z is left as it was."""
    if torch.is_grad_enabled() or update.dtype != z.dtype or update.shape != z.shape:
        return z + update
    return update.add_(z)


def autocast_low_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The low-precision dtype autocast gives matrix products on ``x``'s device (bfloat16 or float16), or None when
    autocast is off there."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) in (torch.bfloat16, torch.float16):
        return torch.get_autocast_dtype(kind)
    return None


def wide_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` ([..., D] -> [..., E]) as autocast rounds its operands, but accumulated and returned in
    float32: under autocast the product's output is not rounded to bfloat16, so the elementwise work after it
    (gates, activations, the update added to a float32 z) sees one rounding fewer per value than Boltz's
    autocast path. Without autocast: ``F.linear`` in the inputs' dtype.

    On CUDA the GEMM reads the low-precision operands and accumulates in float32 (``out_dtype``); elsewhere the
    operands are widened first (exact), the same product summed in another order.
    """
    low = autocast_low_dtype(x)
    if low is None:
        return torch.nn.functional.linear(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        flat = x.reshape(1, -1, x.shape[-1]).to(low)  # [1, rows, D]
        out = widening_bmm(flat, weight.to(low).t()[None], torch.float32)  # [1, rows, E]
    return out.view(*x.shape[:-1], weight.shape[0])
