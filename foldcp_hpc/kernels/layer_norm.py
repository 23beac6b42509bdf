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
    def layer_norm_rows(x_ptr, w_ptr, b_ptr, out_ptr, n_rows, n_inner, sx_o, sx_i, sx_c, eps,
                        C: tl.constexpr, BLOCK_M: tl.constexpr):
        # row r of the output is x's row (r // n_inner, r % n_inner) of its two row dims (outer, inner)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, C)
        inside = rows[:, None] < n_rows
        # 64-bit offsets: a channel-first input's channel stride times C passes 2^31 beyond N ~ 4,100
        offsets = (rows // n_inner)[:, None] * sx_o + (rows % n_inner)[:, None] * sx_i \
            + cols[None, :].to(tl.int64) * sx_c
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        y = normalise(x, w_ptr, b_ptr, eps, C)
        tl.store(out_ptr + rows[:, None] * C + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=inside)

    return layer_norm_rows


def fast_layer_norm_ok(x: Tensor, dims: int) -> bool:
    """Whether :func:`rows_layer_norm` takes x: its normalised dim a power of two between 16 and 1024, and the
    ``FOLDCP_TRITON`` switch (:func:`~.triangle_attention.kernel_wanted`) on for x's device."""
    from .triangle_attention import kernel_wanted

    return 16 <= dims <= 1024 and dims & (dims - 1) == 0 and kernel_wanted(x.device, _kernel)


def row_dims(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """The leading dims of a [..., C] tensor as at most two row dims: (n_outer, n_inner, stride_outer,
    stride_inner), merging neighbours whose strides chain; None when more than two remain. Pure layout maths.

    For example the ending node's chunk of columns, ``z[:, :, cols].transpose(1, 2)`` of a [1, N, N, C] tile
    ([1, w, N, C], strides (N N C, C, N C, 1)), is (w, N, C, N C): rows j of the chunk outer, rows i inner.
    """
    groups: list[list[int]] = []  # [size, stride] from the innermost leading dim outwards
    for size, stride in zip(reversed(shape[:-1]), reversed(strides[:-1])):
        if size == 1:
            continue
        if groups and stride == groups[-1][0] * groups[-1][1]:
            groups[-1][0] *= size
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        return None
    while len(groups) < 2:
        groups.append([1, 0])
    (n_inner, s_inner), (n_outer, s_outer) = groups
    return n_outer, n_inner, s_outer, s_inner


def rows_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    """LayerNorm of every row of x over its last dim; x: [..., C] with any strides (read in place when the
    leading dims make at most two row dims, :func:`row_dims`; copied first otherwise); returns a contiguous
    [..., C] in ``out_dtype``."""
    shape = x.shape
    out = torch.empty(shape, device=x.device, dtype=out_dtype)
    dims = row_dims(tuple(shape), tuple(x.stride()))
    if dims is None:
        x = x.contiguous()
        dims = row_dims(tuple(shape), tuple(x.stride()))
    n_outer, n_inner, s_outer, s_inner = dims
    n_rows, channels = n_outer * n_inner, shape[-1]
    if n_rows:
        block = max(1, 4096 // channels)
        _kernel()[(-(-n_rows // block),)](x, weight, bias, out, n_rows, n_inner, s_outer, s_inner, x.stride(-1),
                                          float(eps), C=channels, BLOCK_M=block)
    return out
