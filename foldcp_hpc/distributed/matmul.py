"""Distributed matrix product of tiled matrices on the p x p grid (Cannon's algorithm).

``C = A @ B`` where every operand is tiled like a pair tensor: rank (r, c) holds block (r, c) of each,
with any leading batch dims (``[*, I, K]``). Cannon: skew A left by r along each grid row and B up by c
along each grid column, then p steps of "multiply the local blocks, shift A one place left and B one
place up". The shifts of step t+1 are posted before the multiply of step t and waited after it, so
the transfer overlaps the compute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import collectives as raw

if TYPE_CHECKING:
    from .grid import ProcessGrid

__all__ = ["tile_matmul", "cannon_matmul", "widening_bmm"]


def cannon_matmul(a: torch.Tensor, b: torch.Tensor, grid: "ProcessGrid", out_dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """Non-differentiable Cannon product of tiles.

    a: [*, I, K] block (r, c) of A; b: [*, K, J] block (r, c) of B.
    out_dtype: the product's dtype when wider than the operands' (bfloat16 operands, float32 accumulation and
    result: the operands travel the ring in bfloat16, half the bytes of float32). None: the operands' dtype.
    returns: [*, I, J] block (r, c) of A @ B.
    """
    with torch.autocast(a.device.type, enabled=False):  # in the inputs' precision, as Boltz's float32 einsum
        return _cannon(a, b, grid, out_dtype or a.dtype)


def widening_bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` for [G, I, K] and [G, K, J] operands, accumulated and returned in ``out_dtype`` (written into
    ``out`` [G, I, J], contiguous, when given).

    On CUDA the tensor-core GEMM reads the low-precision operands and accumulates in ``out_dtype``
    (``torch.bmm(..., out_dtype=)``); elsewhere the operands are widened first, which is the same product
    (widening is exact), summed in another order.
    """
    if a.dtype == out_dtype:
        return torch.bmm(a, b, out=out) if out is not None else torch.matmul(a, b)
    if a.is_cuda:
        if out is None:
            return torch.bmm(a, b, out_dtype=out_dtype)
        return torch.bmm(a, b, out_dtype=out_dtype, out=out)
    product = torch.bmm(a.to(out_dtype), b.to(out_dtype))
    return product if out is None else out.copy_(product)


def _cannon(a: torch.Tensor, b: torch.Tensor, grid: "ProcessGrid", out_dtype: torch.dtype) -> torch.Tensor:
    p = grid.p
    if p == 1 and out_dtype == a.dtype:
        return torch.matmul(a, b)
    if p > 1:  # skew: rank (r, c) takes A block (r, r + c) and B block (r + c, c)
        a = raw.shift(a.contiguous(), grid, "row", -grid.row)
        b = raw.shift(b.contiguous(), grid, "col", -grid.col)
    out = None
    for step in range(p):
        if step < p - 1:
            next_a = raw.start_shift(a, grid, "row", -1)  # block (r, k + 1) arrives from the right
            next_b = raw.start_shift(b, grid, "col", -1)  # block (k + 1, c) arrives from below
        a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])  # [G, I, K], [G, K, J]
        if out is None:
            out = widening_bmm(a3, b3, out_dtype).view(*a.shape[:-1], b.shape[-1])
        elif out_dtype == a.dtype:  # accumulate in place: no second [*, I, J] buffer
            out.view(-1, *out.shape[-2:]).baddbmm_(a3, b3)
        else:
            out.view(-1, *out.shape[-2:]).add_(widening_bmm(a3, b3, out_dtype))
        if step < p - 1:
            a, b = next_a.wait(), next_b.wait()
    return out


class _TileMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, grid):
        ctx.grid = grid
        ctx.save_for_backward(a, b)
        return cannon_matmul(a, b, grid)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grid = ctx.grid
        grad = grad.contiguous()
        grad_a = grad_b = None
        nd = grad.dim()
        dims = (nd - 2, nd - 1)
        if ctx.needs_input_grad[0]:
            grad_a = cannon_matmul(grad, raw.transpose(b, grid, dims), grid)  # dA = dC @ B^T
        if ctx.needs_input_grad[1]:
            grad_b = cannon_matmul(raw.transpose(a, grid, dims), grad, grid)  # dB = A^T @ dC
        return grad_a, grad_b, None


def tile_matmul(a: torch.Tensor, b: torch.Tensor, grid: "ProcessGrid") -> torch.Tensor:
    """Block (r, c) of ``A @ B`` for matrices tiled over the grid.

    a: [*, I, K] block (r, c) of A; b: [*, K, J] block (r, c) of B (same batch dims).
    returns: [*, I, J] block (r, c) of A @ B.

    forward: Cannon ring (skew, then p multiply-and-shift steps, each shift in flight during the multiply);
    backward: two Cannon rings on tile-transposed operands, dA = dC @ B^T and dB = A^T @ dC.
    """
    if grid.p == 1:
        return torch.matmul(a, b)
    return _TileMatmul.apply(a, b, grid)
