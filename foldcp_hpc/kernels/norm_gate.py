"""LayerNorm, two projections and a sigmoid gate in one pass: ``out[m, e] (+)= (LN_v(x_v[m]) . W_v[e]) *
sigmoid(LN_g(x_g[m]) . W_g[e]) * mask[m]``.

The triangle multiplication under autocast is this twice:

- its operands: a and b of a channel group are ``p_in(LN(z)) * sigmoid(g_in(LN(z))) * mask``, written
  channel-first ([2g, M]) for the batched product;
- its output: ``z += p_out(LN_out(product)) * sigmoid(g_out(LN_in(z)))``, the product read channel-first.

With PyTorch's ops each step is a pass over the tile (the LayerNorm, its bfloat16 copy, the GEMM's float32
output, the gate): at N = 2,048 the triangle multiplication spent 34 of its 38 ms on them and 3 ms in the
product itself. Here each program normalises a block of rows once (statistics in float32, the normalised rows
rounded to the GEMM's bfloat16 operand, as autocast rounds LayerNorm's float32 output for the Linear), multiplies
them with the weights on tensor cores with float32 accumulation, and applies the gate in float32 before the one
rounding into ``out``: the arithmetic of :func:`~foldcp_hpc.model.common.wide_linear` followed by
:func:`~foldcp_hpc.kernels.gating.gate_product`, without the passes between.

In place (``accumulate`` with ``out`` = ``x_g``, the output gate): a program reads all channels of its rows before
it writes any of them, and no other program touches those rows.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .lazy import autotune_options, lazy_kernel

# the kernels' callees (:mod:`.tiles`): set among this module's globals when the kernel is first built
normalise = round_bf16 = None

__all__ = ["norm_gate", "norm_gate_ok"]


@lazy_kernel
def _kernel(triton, tl):
    configs = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
               for bm, w, s in ((64, 4, 2), (128, 8, 2), (64, 8, 2), (32, 4, 2), (128, 4, 2), (64, 4, 1))]
    if os.environ.get("TRITON_INTERPRET") == "1":
        configs = [triton.Config({"BLOCK_M": 16})]
    from .tiles import HELPERS

    globals().update(HELPERS)  # the kernel's callees, found among this module's globals (see .tiles)

    @triton.autotune(configs=configs, key=["n_out", "C", "BLOCK_E", "SAME", "ACCUMULATE"], **autotune_options(triton))
    @triton.jit
    def norm_gate_kernel(xv_ptr, sxv_m, sxv_c, nv_w, nv_b, wv_ptr,
                         xg_ptr, sxg_m, sxg_c, ng_w, ng_b, wg_ptr,
                         m_ptr, o_ptr, so_m, so_e, n_rows, n_out, eps_v, eps_g,
                         C: tl.constexpr, BLOCK_E: tl.constexpr, SAME: tl.constexpr, MASK: tl.constexpr,
                         ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        inside = rows < n_rows
        cols = tl.arange(0, C)
        low = wv_ptr.dtype.element_ty  # the GEMM's operand dtype (bfloat16 or float16)
        # LayerNorm of the value rows (and of the gate rows), statistics in float32, rounded once to `low`
        xv = normalise(tl.load(xv_ptr + rows[:, None] * sxv_m + cols[None, :].to(tl.int64) * sxv_c,
                               mask=inside[:, None], other=0.0).to(tl.float32), nv_w, nv_b, eps_v, C)
        if SAME:
            xg = xv
        else:
            xg = normalise(tl.load(xg_ptr + rows[:, None] * sxg_m + cols[None, :].to(tl.int64) * sxg_c,
                                   mask=inside[:, None], other=0.0).to(tl.float32), ng_w, ng_b, eps_g, C)
        if UPCAST:  # the interpreter's dot mishandles bfloat16 operands: rounded by hand, kept in float32
            xv = round_bf16(xv)
            xg = round_bf16(xg)
        else:
            xv = xv.to(low)
            xg = xg.to(low)
        if MASK:
            keep = tl.load(m_ptr + rows, mask=inside, other=0.0).to(tl.float32)
        for e0 in range(0, n_out, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            # weights [E, C] read as W^T blocks [C, BLOCK_E]
            in_e = offs_e < n_out
            wv = tl.load(wv_ptr + offs_e[None, :] * C + cols[:, None], mask=in_e[None, :], other=0.0)
            wg = tl.load(wg_ptr + offs_e[None, :] * C + cols[:, None], mask=in_e[None, :], other=0.0)
            if UPCAST:
                wv = wv.to(tl.float32)
                wg = wg.to(tl.float32)
            value = tl.dot(xv, wv)  # [BLOCK_M, BLOCK_E] float32
            gate = tl.dot(xg, wg)
            y = value * tl.sigmoid(gate)
            if MASK:
                y = y * keep[:, None]
            out = o_ptr + rows[:, None] * so_m + offs_e[None, :].to(tl.int64) * so_e
            written = inside[:, None] & in_e[None, :]
            if ACCUMULATE:
                y = y + tl.load(out, mask=written, other=0.0).to(tl.float32)
            tl.store(out, y.to(o_ptr.dtype.element_ty), mask=written)

    return norm_gate_kernel


def norm_gate_ok(x: Tensor, channels: int) -> bool:
    """Whether :func:`norm_gate` runs for x's device: the ``FOLDCP_TRITON`` switch
    (:func:`~.triangle_attention.kernel_wanted`) and a power-of-two channel count from 16 to 256."""
    from .triangle_attention import kernel_wanted

    return 16 <= channels <= 256 and channels & (channels - 1) == 0 and kernel_wanted(x.device, _kernel)


def norm_gate(x_v: Tensor, norm_v: torch.nn.LayerNorm, w_v: Tensor, w_g: Tensor, out: Tensor,
              x_g: Optional[Tensor] = None, norm_g: Optional[torch.nn.LayerNorm] = None,
              mask: Optional[Tensor] = None, accumulate: bool = False, out_rows_first: bool = True) -> Tensor:
    """``out (+)= (LN_v(x_v) @ w_v^T) * sigmoid(LN_g(x_g) @ w_g^T) * mask`` in one kernel pass.

    x_v, x_g: [M, C] rows (any strides: a channel-first [C, M] tensor passes as its transpose); x_g None: the
    gate reads LN_v(x_v) too; norm_v, norm_g: the LayerNorms (weight and bias); w_v, w_g: [E, C] weights in the
    GEMM's dtype (bfloat16 or float16; the normalised rows are rounded to it); mask: [M] or None;
    out: [M, E] (``out_rows_first``) or [E, M], any strides, written (or added to, ``accumulate``) in its dtype.
    returns out.
    """
    forward = _kernel()
    if forward is None:
        raise RuntimeError("norm_gate needs Triton (pip install triton)")
    n_rows, channels = x_v.shape
    n_out = w_v.shape[0]
    if w_v.shape != (n_out, channels) or w_g.shape != w_v.shape or not (w_v.is_contiguous() and w_g.is_contiguous()):
        raise ValueError(f"weights {tuple(w_v.shape)} / {tuple(w_g.shape)} must be contiguous [E, {channels}]")
    if w_v.dtype not in (torch.bfloat16, torch.float16) or w_g.dtype != w_v.dtype:
        raise ValueError(f"weights must be bfloat16 or float16 (the GEMM's operands), got {w_v.dtype}, {w_g.dtype}")
    if x_g is not None and x_g.shape != x_v.shape:
        raise ValueError(f"x_g {tuple(x_g.shape)} and x_v {tuple(x_v.shape)} differ")
    expected = (n_rows, n_out) if out_rows_first else (n_out, n_rows)
    if tuple(out.shape) != expected:
        raise ValueError(f"out {tuple(out.shape)}, expected {expected}")
    so_m, so_e = out.stride() if out_rows_first else out.stride()[::-1]
    same = x_g is None
    x_g = x_v if same else x_g
    norm_g = norm_v if norm_g is None else norm_g
    m = mask.reshape(-1) if mask is not None else out
    if mask is not None and m.numel() != n_rows:
        raise ValueError(f"mask has {m.numel()} values for {n_rows} rows")
    if n_rows == 0:
        return out

    def launch(rows: int, target: Tensor, o_m: int, o_e: int) -> None:
        def grid(meta):
            return (-(-rows // meta["BLOCK_M"]),)

        forward[grid](x_v, x_v.stride(0), x_v.stride(1), norm_v.weight, norm_v.bias, w_v,
                      x_g, x_g.stride(0), x_g.stride(1), norm_g.weight, norm_g.bias, w_g,
                      m, target, o_m, o_e, rows, n_out, float(norm_v.eps), float(norm_g.eps),
                      C=channels, BLOCK_E=block_e, SAME=same, MASK=mask is not None, ACCUMULATE=accumulate,
                      UPCAST=os.environ.get("TRITON_INTERPRET") == "1")

    block_e = min(64, max(16, 1 << (n_out - 1).bit_length()))
    key = (n_out, channels, block_e, same, accumulate, out.dtype, x_v.dtype, x_g.dtype, str(out.device))
    if accumulate and key not in _TUNED:
        # the autotuner runs each configuration several times, which would add the update to ``out`` as often:
        # it tunes on the first rows into a scratch copy (the choice holds for every row count)
        rows = min(n_rows, 1 << 16)
        scratch = torch.empty(rows, n_out, device=out.device, dtype=out.dtype)
        scratch.copy_(out[:rows] if out_rows_first else out[:, :rows].t())
        launch(rows, scratch, *scratch.stride())
        _TUNED.add(key)
    launch(n_rows, out, so_m, so_e)
    return out


_TUNED: set = set()  # accumulating kernel keys already autotuned (on a scratch copy)
