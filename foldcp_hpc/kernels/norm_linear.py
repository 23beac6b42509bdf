"""LayerNorm and one projection in one pass: ``out[m, e] = LN(x[m]) . W[e]``, the pair rows read in place.

Boltz projects LayerNorm'd pair rows in three places that a Pairformer layer runs on all of z: the triangle
attentions' q, k, v and gate (C -> 4 H D) and their triangle bias (C -> H), and the single track's pair bias
(C -> 16 heads). With PyTorch's ops each is two passes over the tile or a chunk of it: the LayerNorm writes its
output and the GEMM reads it back (at N = 4,096 a triangle attention spent ~14 ms of ~25 ms outside its flash
kernel on them, the single track 20 of its 22 ms on the float32 copies, LayerNorm and heads-first moves of its
bias). Here each program normalises a block of rows once (statistics in float32, the normalised rows rounded to
the GEMM's bfloat16 operand, as autocast rounds LayerNorm's float32 output for the Linear) and multiplies them
with the weight on tensor cores with float32 accumulation, rounding once into ``out``. With a float32 weight (the
single track, which Boltz runs with autocast off) nothing is rounded to bfloat16: float32 products to float32's
accuracy, each as three TF32 tensor-core products (``tf32x3``; Triton's FMA products ran at ~6 TFLOP/s here).

Rows are read through up to two row dims with any strides (:func:`~.layer_norm.row_dims`: the ending node's
chunk of columns, a transposed view, passes in place), and the output through any row and column strides (the
single track's bias is written heads-first, ``[H, I, J]``, straight from rows (i, j)).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .lazy import autotune_options, lazy_kernel

# the kernels' callees (:mod:`.tiles`): set among this module's globals when the kernel is first built
normalise = round_bf16 = None

__all__ = ["norm_linear", "norm_linear_ok"]


@lazy_kernel
def _kernel(triton, tl):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_E": be}, num_warps=w, num_stages=s)
               for bm, be, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2),
                                    (64, 64, 4, 1), (128, 64, 4, 2), (32, 64, 4, 2), (128, 64, 8, 3))]
    if os.environ.get("TRITON_INTERPRET") == "1":
        configs = [triton.Config({"BLOCK_M": 16, "BLOCK_E": 16})]
    from .tiles import HELPERS

    globals().update(HELPERS)  # the kernel's callees, found among this module's globals (see .tiles)

    def prune(configs, named_args, **kwargs):
        """No output block wider than the output (the bias's 4 or 16 heads take the narrowest)."""
        widest = max(16, triton.next_power_of_2(named_args["n_out"]))
        kept = [c for c in configs if c.kwargs["BLOCK_E"] <= widest]
        return kept or [triton.Config({**c.kwargs, "BLOCK_E": widest}, num_warps=c.num_warps,
                                      num_stages=c.num_stages) for c in configs]

    @triton.autotune(configs=configs, key=["n_out", "C", "IEEE"], prune_configs_by={"early_config_prune": prune},
                     **autotune_options(triton))
    @triton.jit
    def norm_linear_kernel(x_ptr, sx_o, sx_i, sx_c, n_rows, n_inner, nw_ptr, nb_ptr, eps, w_ptr,
                           o_ptr, so_m, so_e, n_out, C: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
        # row r is x's row (r // n_inner, r % n_inner) of its two row dims (outer, inner); 64-bit offsets
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        inside = rows < n_rows
        cols = tl.arange(0, C)
        offsets = (rows // n_inner)[:, None] * sx_o + (rows % n_inner)[:, None] * sx_i \
            + cols[None, :].to(tl.int64) * sx_c
        x = normalise(tl.load(x_ptr + offsets, mask=inside[:, None], other=0.0).to(tl.float32),
                      nw_ptr, nb_ptr, eps, C)
        if IEEE:  # float32 weights: float32 products (tf32x3 below), nothing rounded
            pass
        elif UPCAST:  # the interpreter's dot mishandles bfloat16 operands: rounded by hand, kept in float32
            x = round_bf16(x)
        else:
            x = x.to(w_ptr.dtype.element_ty)  # the GEMM's operand dtype, as autocast rounds LayerNorm's output
        for e0 in range(0, n_out, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            in_e = offs_e < n_out
            w = tl.load(w_ptr + offs_e[None, :] * C + cols[:, None], mask=in_e[None, :], other=0.0)  # W^T [C, E]
            if IEEE:
                y = tl.dot(x, w, input_precision="tf32x3")  # [BLOCK_M, BLOCK_E] float32 (~IEEE)
            else:
                if UPCAST:
                    w = w.to(tl.float32)
                y = tl.dot(x, w)
            if UPCAST and o_ptr.dtype.element_ty == tl.bfloat16:  # the interpreter's casts truncate
                y = round_bf16(y)
            tl.store(o_ptr + rows[:, None] * so_m + offs_e[None, :].to(tl.int64) * so_e,
                     y.to(o_ptr.dtype.element_ty), mask=inside[:, None] & in_e[None, :])

    return norm_linear_kernel


def norm_linear_ok(x: Tensor) -> bool:
    """Whether :func:`norm_linear` runs for x's device: the ``FOLDCP_TRITON`` switch
    (:func:`~.triangle_attention.kernel_wanted`) and a power-of-two channel count from 16 to 256."""
    from .triangle_attention import kernel_wanted

    channels = x.shape[-1]
    return 16 <= channels <= 256 and channels & (channels - 1) == 0 and kernel_wanted(x.device, _kernel)


def norm_linear(x: Tensor, norm: torch.nn.LayerNorm, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """``LN(x) @ weight^T`` in one kernel pass, as autocast computes ``Linear(LayerNorm(x))``.

    x: [..., C] rows with any strides (read in place where the leading dims make at most two row dims, copied
    first otherwise); norm: the LayerNorm (weight and bias); weight: [E, C] in the GEMM's dtype (bfloat16 or
    float16: the normalised rows are rounded to it; products accumulate in float32; or float32: float32 products
    to float32's accuracy, nothing rounded); out: [..., E] with x's
    leading shape, any strides under which those leading dims flatten to one row stride (for example a
    heads-first ``bias.permute(1, 2, 0)``), or None: a new contiguous tensor in weight's dtype (autocast's output
    dtype). returns out.
    """
    from .layer_norm import row_dims

    forward = _kernel()
    if forward is None:
        raise RuntimeError("norm_linear needs Triton (pip install triton)")
    channels = x.shape[-1]
    n_out = weight.shape[0]
    if weight.shape != (n_out, channels) or not weight.is_contiguous():
        raise ValueError(f"weight {tuple(weight.shape)} must be contiguous [E, {channels}]")
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"weight must be bfloat16, float16 or float32 (the GEMM's operand), got {weight.dtype}")
    if norm.weight is None or norm.bias is None or tuple(norm.normalized_shape) != (channels,):
        raise ValueError(f"norm must be an affine LayerNorm over {channels} channels")
    if out is None:
        out = torch.empty(*x.shape[:-1], n_out, device=x.device, dtype=weight.dtype)
    if tuple(out.shape) != (*x.shape[:-1], n_out):
        raise ValueError(f"out {tuple(out.shape)}, expected {(*x.shape[:-1], n_out)}")
    out_rows = row_dims(tuple(out.shape), tuple(out.stride()))
    if out_rows is None or out_rows[0] > 1:
        raise ValueError(f"out's leading dims must flatten to one row stride, strides {tuple(out.stride())}")
    so_m = out_rows[3]
    dims = row_dims(tuple(x.shape), tuple(x.stride()))
    if dims is None:
        x = x.contiguous()
        dims = row_dims(tuple(x.shape), tuple(x.stride()))
    n_outer, n_inner, s_outer, s_inner = dims
    n_rows = n_outer * n_inner
    if n_rows == 0 or n_out == 0:
        return out

    def grid(meta):
        return (-(-n_rows // meta["BLOCK_M"]),)

    forward[grid](x, s_outer, s_inner, x.stride(-1), n_rows, n_inner, norm.weight, norm.bias, float(norm.eps),
                  weight, out, so_m, out.stride(-1), n_out, C=channels, IEEE=weight.dtype == torch.float32,
                  UPCAST=os.environ.get("TRITON_INTERPRET") == "1")
    return out
