"""The transition (SwiGLU MLP) added into its input in one pass: ``x[m] += W3 (silu(W1 LN(x[m])) * W2 LN(x[m]))``.

Each program normalises a block of rows (statistics in float32, rounded once to the GEMMs' bfloat16 operand, as
autocast rounds LayerNorm's float32 output), and walks the hidden layer in blocks: fc1 and fc2 on tensor cores
with float32 accumulation, ``silu(fc1) * fc2`` in float32 rounded once to fc3's operand, fc3 accumulated in
float32 across the hidden blocks, and the update added to the rows unrounded. The [rows, hidden] activations
never reach memory: at N = 2,048 the pair transition read and wrote them (4 hidden values per pair channel)
through four passes. Boltz's autocast path rounds fc1's, fc2's, their product's and fc3's outputs to bfloat16;
here only fc3's operand is rounded.

In place: a program reads all channels of its rows before it writes any of them, and no other program touches
those rows.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .lazy import autotune_options, lazy_kernel

# the kernels' callees (:mod:`.tiles`): set among this module's globals when the kernel is first built
normalise = round_bf16 = None

__all__ = ["swiglu_add", "swiglu_ok"]


@lazy_kernel
def _kernel(triton, tl):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_H": bh}, num_warps=w, num_stages=s)
               for bm, bh, w, s in ((64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2),
                                    (128, 32, 8, 2))]
    if os.environ.get("TRITON_INTERPRET") == "1":
        configs = [triton.Config({"BLOCK_M": 16, "BLOCK_H": 16})]
    from .tiles import HELPERS

    globals().update(HELPERS)  # the kernel's callees, found among this module's globals (see .tiles)

    @triton.autotune(configs=configs, key=["C", "HIDDEN"], **autotune_options(triton))
    @triton.jit
    def swiglu_kernel(x_ptr, n_w, n_b, w1_ptr, w2_ptr, w3_ptr, n_rows, sx_m, eps,
                      C: tl.constexpr, HIDDEN: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_H: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        inside = rows < n_rows
        cols = tl.arange(0, C)
        low = w1_ptr.dtype.element_ty
        rows_ptr = x_ptr + rows[:, None] * sx_m + cols[None, :]
        x = tl.load(rows_ptr, mask=inside[:, None], other=0.0).to(tl.float32)
        xn = normalise(x, n_w, n_b, eps, C)
        if UPCAST:  # the interpreter's dot mishandles bfloat16 operands: rounded by hand, kept in float32
            xn = round_bf16(xn)
        else:
            xn = xn.to(low)
        acc = tl.zeros([BLOCK_M, C], tl.float32)
        for h0 in range(0, HIDDEN, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            w1 = tl.load(w1_ptr + offs_h[None, :] * C + cols[:, None])  # W1^T block [C, BLOCK_H]
            w2 = tl.load(w2_ptr + offs_h[None, :] * C + cols[:, None])
            w3 = tl.load(w3_ptr + cols[None, :] * HIDDEN + offs_h[:, None])  # W3^T block [BLOCK_H, C]
            if UPCAST:
                w1 = w1.to(tl.float32)
                w2 = w2.to(tl.float32)
                w3 = w3.to(tl.float32)
            a = tl.dot(xn, w1)
            b = tl.dot(xn, w2)
            h = a * tl.sigmoid(a) * b  # silu(fc1) * fc2 in float32
            if UPCAST:
                h = round_bf16(h)
            else:
                h = h.to(low)
            acc = tl.dot(h, w3, acc)
        tl.store(rows_ptr, (x + acc).to(x_ptr.dtype.element_ty), mask=inside[:, None])

    return swiglu_kernel


def swiglu_ok(x: Tensor, channels: int, hidden: int) -> bool:
    """Whether :func:`swiglu_add` runs for x's device: the ``FOLDCP_TRITON`` switch
    (:func:`~.triangle_attention.kernel_wanted`), a power-of-two channel count from 16 to 256 and a hidden
    width that is a multiple of 64."""
    from .triangle_attention import kernel_wanted

    return (16 <= channels <= 256 and channels & (channels - 1) == 0 and hidden % 64 == 0
            and kernel_wanted(x.device, _kernel))


def swiglu_add(x: Tensor, norm: torch.nn.LayerNorm, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    """``x += w3 @ (silu(w1 @ LN(x)) * (w2 @ LN(x)))`` row by row, in one kernel pass (see the module docstring).

    x: [M, C] rows with a contiguous last dim (float32 or bfloat16), updated in place; norm: the LayerNorm;
    w1, w2: [H, C], w3: [C, H], contiguous, bfloat16 or float16 (the GEMMs' operand dtype). returns x.
    """
    forward = _kernel()
    if forward is None:
        raise RuntimeError("swiglu_add needs Triton (pip install triton)")
    n_rows, channels = x.shape
    hidden = w1.shape[0]
    if w1.shape != (hidden, channels) or w2.shape != w1.shape or w3.shape != (channels, hidden):
        raise ValueError(f"weights {tuple(w1.shape)}, {tuple(w2.shape)}, {tuple(w3.shape)} do not fit "
                         f"{channels} channels")
    if not all(w.is_contiguous() and w.dtype == w1.dtype for w in (w1, w2, w3)) \
            or w1.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("weights must be contiguous and all bfloat16 or all float16 (the GEMMs' operands)")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in its last dim, strides {tuple(x.stride())}")
    if n_rows == 0:
        return x

    def launch(rows: int, target: Tensor) -> None:
        def grid(meta):
            return (-(-rows // meta["BLOCK_M"]),)

        forward[grid](target, norm.weight, norm.bias, w1, w2, w3, rows, target.stride(0), float(norm.eps),
                      C=channels, HIDDEN=hidden, UPCAST=os.environ.get("TRITON_INTERPRET") == "1")

    key = (channels, hidden, x.dtype, w1.dtype, str(x.device))
    if key not in _TUNED:
        # the autotuner runs each configuration several times, which would add the update as often: it tunes
        # on a scratch copy of the first rows (the choice holds for every row count)
        launch(min(n_rows, 1 << 16), x[:1 << 16].clone())
        _TUNED.add(key)
    launch(n_rows, x)
    return x


_TUNED: set = set()  # keys already autotuned (on a scratch copy)
