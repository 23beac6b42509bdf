"""LayerNorm over a short last dim (the pair channels, 128) for many rows, reading any strides.

PyTorch's kernel gives each row its own thread block, which leaves a GPU mostly idle on [N*N, 128] pair rows;
this kernel normalises a block of rows per program (statistics in float32) and reads its input through
strides, so a channel-first tensor ([C, M], the triangle product) is normalised straight into channel-last
rows without a transposing copy.
"""

from __future__ import annotations


import torch
from torch import Tensor

from .lazy import lazy_kernel

# the kernels' callees (:mod:`.tiles`): set among this module's globals when the kernel is first built
normalise = None


@lazy_kernel
def _kernel(triton, tl):
    from .tiles import HELPERS

    globals().update(HELPERS)  # the kernel's callees, found among this module's globals (see .tiles)

    @triton.jit
    def layer_norm_rows(x_ptr, w_ptr, b_ptr, out_ptr, n_rows, sx_m, sx_c, eps,
                        C: tl.constexpr, BLOCK_M: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, C)
        inside = rows[:, None] < n_rows
        # 64-bit offsets: a channel-first input's channel stride times C passes 2^31 beyond N ~ 4,100
        offsets = rows[:, None] * sx_m + cols[None, :].to(tl.int64) * sx_c
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        y = normalise(x, w_ptr, b_ptr, eps, C)
        tl.store(out_ptr + rows[:, None] * C + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=inside)

    return layer_norm_rows


def fast_layer_norm_ok(x: Tensor, dims: int) -> bool:
    """Whether :func:`rows_layer_norm` takes x: its normalised dim a power of two between 16 and 1024, and the
    ``FOLDCP_TRITON`` switch (:func:`~.triangle_attention.kernel_wanted`) on for x's device."""
    from .triangle_attention import kernel_wanted

    return 16 <= dims <= 1024 and dims & (dims - 1) == 0 and kernel_wanted(x.device, _kernel)


def rows_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    """LayerNorm of every row of x over its last dim; x: [..., C] with any strides such that the leading dims
    flatten to one row index (``x.flatten(0, -2)`` is a view); returns a contiguous [..., C] in ``out_dtype``."""
    shape = x.shape
    rows = x.flatten(0, -2)  # a view when the leading dims merge (a copy otherwise: still right, slower)
    out = torch.empty(shape, device=x.device, dtype=out_dtype)
    n_rows, channels = rows.shape
    if n_rows:
        block = max(1, 4096 // channels)
        _kernel()[(-(-n_rows // block),)](rows, weight, bias, out, n_rows, rows.stride(0), rows.stride(1),
                                                 float(eps), C=channels, BLOCK_M=block)
    return out
