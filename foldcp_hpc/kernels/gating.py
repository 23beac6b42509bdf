"""Gated products in one pass: ``out = value * act(gate) [* mask]`` (or ``out += ...``), the math in float32.

The Pairformer's gates (the triangle multiplication's input and output gates, the transitions' SwiGLU) read
float32 GEMM outputs under autocast (:func:`~foldcp_hpc.model.common.wide_linear`) and write either a bfloat16
operand of the next GEMM or an update added to a float32 z. Done with PyTorch's element-wise ops, each step
reads and writes the float32 values again (sigmoid, product, mask, cast: four passes); this kernel reads each
input once and writes the result once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .lazy import lazy_kernel

__all__ = ["ACTIVATIONS", "gate_product"]

ACTIVATIONS = {"sigmoid": 0, "silu": 1}


@lazy_kernel
def _kernel(triton, tl):
    @triton.jit
    def gate_product_kernel(v_ptr, g_ptr, m_ptr, o_ptr, n_rows, n_cols, sv, sg, so,
                            ACT: tl.constexpr, MASK: tl.constexpr, ACCUMULATE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        v = tl.load(v_ptr + rows[:, None] * sv + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * sg + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        if ACT == 0:
            y = v * tl.sigmoid(g)
        else:
            y = v * (g * tl.sigmoid(g))
        if MASK:
            y = y * tl.load(m_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        out = o_ptr + rows[:, None] * so + cols[None, :]
        if ACCUMULATE:
            y = y + tl.load(out, mask=inside, other=0.0).to(tl.float32)
        tl.store(out, y.to(o_ptr.dtype.element_ty), mask=inside)

    return gate_product_kernel


def _reference(value: Tensor, gate: Tensor, act: str, out: Tensor, mask: Optional[Tensor],
               accumulate: bool) -> Tensor:
    """The same in PyTorch (any shapes that broadcast, any strides): float32 math, one cast into ``out``."""
    g = gate.float()
    y = value.float() * (torch.sigmoid(g) if act == "sigmoid" else torch.nn.functional.silu(g))
    if mask is not None:
        y = y * mask.float()
    return out.add_(y) if accumulate else out.copy_(y)


def _rows(t: Tensor) -> Optional[Tensor]:
    """t as a [R, C] view with a contiguous last dim, or None when no such view exists."""
    if t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1]) if t.dim() != 2 else t
    except RuntimeError:
        return None


def gate_product(value: Tensor, gate: Tensor, act: str, out: Tensor, mask: Optional[Tensor] = None,
                 accumulate: bool = False) -> Tensor:
    """``out = value * act(gate) * mask`` (``accumulate``: ``out += ...``), computed in float32 and rounded once
    into ``out``'s dtype.

    value, gate, out: [..., C] of one shape (any float dtypes; out may be a view, written in place); act:
    "sigmoid" or "silu"; mask: [C] or None, per column. returns out. On CUDA with Triton (the ``FOLDCP_TRITON``
    switch, :func:`~.triangle_attention.kernel_wanted`) one kernel pass; elsewhere PyTorch's ops, the same math.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
    if value.shape != gate.shape or value.shape != out.shape:
        raise ValueError(f"value {tuple(value.shape)}, gate {tuple(gate.shape)} and out {tuple(out.shape)} differ")
    if mask is not None and mask.shape != value.shape[-1:]:
        raise ValueError(f"mask {tuple(mask.shape)} is not one value per column of {tuple(value.shape)}")
    from .triangle_attention import kernel_wanted

    views = [_rows(t) for t in (value, gate, out)]
    if not kernel_wanted(out.device, _kernel) or any(v is None for v in views) or out.numel() == 0:
        return _reference(value, gate, act, out, mask, accumulate)
    v, g, o = views
    n_rows, n_cols = o.shape
    block_r, block_c = 16, 256
    grid = (-(-n_rows // block_r), -(-n_cols // block_c))
    m = mask.contiguous() if mask is not None else o
    _kernel()[grid](v, g, m, o, n_rows, n_cols, v.stride(0), g.stride(0), o.stride(0),
                    ACT=ACTIVATIONS[act], MASK=mask is not None, ACCUMULATE=accumulate,
                    BLOCK_R=block_r, BLOCK_C=block_c)
    return out
