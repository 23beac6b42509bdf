"""The fixed-shift flash kernel warp-specialised for Hopper (Gluon): three rows of a batch entry per CTA.

The first launch of :func:`~.triangle_attention.flash_triangle_attention` with a fixed shift, on an sm_90 GPU
(:func:`ws_wanted`). The triangle bias is the same for every row i of a batch entry, so one CTA takes ``ROWS``
(3) rows for one head and one block of 128 queries:

- a loader warp brings the rows' queries, then per block of 64 keys each row's keys and values and the one
  bias block they share, by TMA into a ring of ``STAGES`` shared-memory stages (an mbarrier per stage says it
  is full, another that every consumer is done with it);
- three consumer warpgroups, one per row, each compute q . k on the tensor cores asynchronously (wgmma), take
  one FMA and the exponential per logit (the bias arrives shifted and in log2 units, widened by bit moves as in
  :func:`~.flash_block.widen_bf16`), and multiply the bfloat16 weights into the values and into a block of
  ones (the sums), so the weights summed are those that multiply the values.

Each bias block is read from L2 once for three rows, and the consumers issue no loads. At N = 4,096 on an H100
one launch took 123.9 ms against the Triton kernel's ~137 ms (docs/performance.md). The results are those of
the Triton kernel's fixed-shift launch: o (gated where a gate is given) and lse, NaN where a query's sum is
outside [2^-80, 2^100], so that the Triton kernel's second launch redoes those blocks and the rows with a key
mask of their own.

This module imports Triton's Gluon when it is imported (Triton 3.6 or later); :mod:`.triangle_attention` imports
it on first use and falls back to the Triton kernel where it is missing.
"""

from __future__ import annotations

from torch import Tensor
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["ws_launch", "BLOCK_N"]

# a TMA load into shared memory: ``async_load`` in later Tritons (3.9 refuses the older name)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

BLOCK_M = 128  # queries per CTA
BLOCK_N = 64  # keys per stage (the fold pads the bias's keys to a multiple of it)
ROWS = 3  # rows per CTA, one consumer warpgroup each
STAGES = 3
GROUP = 8  # row triples per group: consecutive CTAs take a group's triples for one query block
MAX_REGS = 128  # the launch's register cap; setmaxnreg then moves them to the consumers
CONSUMER_REGS = 160
LOADER_REGS = 24


@gluon.jit
def _loader(q_desc, k_desc, v_desc, b_desc, q_smem, k_smem, v_smem, b_smem, ones_smem, q_bar, ready, empty,
            out_ptr, lse_ptr, g_ptr, shift_ptr, so_r, so_j, so_h, sg_r, sg_j, sg_h, sl_r, sl_h,
            row0, row1, head, j0, b_row, n_j, n_k, qk_scale,
            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GATE: gl.constexpr,
            WHICH: gl.constexpr):
    """The loader warp: the rows' queries once, then per key block each row's keys and values and the shared
    bias block into the next free stage. Rows past row1 (the batch entry's or the tensor's end) load row1."""
    col = head * HEAD_DIM
    stages: gl.constexpr = b_smem.type.shape[0]
    rows: gl.constexpr = q_smem.type.shape[0]
    mbarrier.expect(q_bar, rows * q_desc.block_type.nbytes)
    for r in gl.static_range(rows):
        _tma_load(q_desc, [gl.minimum(row0 + r, row1) * n_j + j0, col], q_bar, q_smem.index(r))
    n_blocks = gl.cdiv(n_k, BLOCK_N)
    nbytes: gl.constexpr = rows * k_desc.block_type.nbytes + rows * v_desc.block_type.nbytes \
        + b_desc.block_type.nbytes
    for j in range(n_blocks):
        stage = j % stages
        phase = (j // stages) & 1
        mbarrier.wait(empty.index(stage), phase ^ 1)
        bar = ready.index(stage)
        mbarrier.expect(bar, nbytes)
        start = j * BLOCK_N
        _tma_load(b_desc, [b_row, start], bar, b_smem.index(stage))
        for r in gl.static_range(rows):
            line = gl.minimum(row0 + r, row1)
            _tma_load(k_desc, [line * n_k + start, col], bar, k_smem.index(rows * stage + r))
            _tma_load(v_desc, [line * n_k + start, col], bar, v_smem.index(rows * stage + r))


@gluon.jit
def _consumer(q_desc, k_desc, v_desc, b_desc, q_smem, k_smem, v_smem, b_smem, ones_smem, q_bar, ready, empty,
              out_ptr, lse_ptr, g_ptr, shift_ptr, so_r, so_j, so_h, sg_r, sg_j, sg_h, sl_r, sl_h,
              row0, row1, head, j0, b_row, n_j, n_k, qk_scale,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GATE: gl.constexpr,
              WHICH: gl.constexpr):
    """One consumer warpgroup: row row0 + WHICH's softmax with the fixed shift, its output and lse."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    sum_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 16, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ps_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=sum_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    stages: gl.constexpr = b_smem.type.shape[0]
    rows: gl.constexpr = q_smem.type.shape[0]
    row = row0 + WHICH
    q = q_smem.index(WHICH)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    sums = gl.zeros([BLOCK_M, 16], gl.float32, sum_layout)
    n_blocks = gl.cdiv(n_k, BLOCK_N)
    mbarrier.wait(q_bar, 0)
    for j in range(n_blocks):
        stage = j % stages
        phase = (j // stages) & 1
        mbarrier.wait(ready.index(stage), phase)
        s_tok = warpgroup_mma(q, k_smem.index(rows * stage + WHICH).permute((1, 0)), zero_s, use_acc=False,
                              is_async=True)
        bias = b_smem.index(stage).load(s_layout)  # bfloat16, log2 units, the shift subtracted
        bias = gl.inline_asm_elementwise("shl.b32 $0, $2, 16;\n\tand.b32 $1, $2, 0xffff0000;", "=r,=r,r", [bias],
                                         dtype=gl.float32, is_pure=True, pack=2)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        weights = gl.exp2(s * qk_scale + bias).to(gl.bfloat16)
        acc_tok = warpgroup_mma(gl.convert_layout(weights, p_layout), v_smem.index(rows * stage + WHICH), acc,
                                is_async=True)
        sum_tok = warpgroup_mma(gl.convert_layout(weights, ps_layout), ones_smem, sums, is_async=True)
        acc, sums = warpgroup_mma_wait(0, deps=(acc_tok, sum_tok))
        fence_async_shared()
        mbarrier.arrive(empty.index(stage), count=1)
    run_sum = gl.convert_layout(gl.max(sums, 1), row_o)  # 16 equal columns
    offs_j = j0 + gl.arange(0, BLOCK_M, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=col_o)
    keep = offs_j < n_j
    if WHICH > 0:
        keep = keep & (row <= row1)
    shift = gl.load(shift_ptr + b_row + gl.arange(0, BLOCK_M, layout=row_o), mask=keep, other=0.0) \
        * 1.4426950408889634  # natural units -> log2 units
    empty_rows = run_sum == 0.0
    norm = gl.where(empty_rows, 1.0, run_sum)
    out = acc / norm[:, None]
    row64 = row.to(gl.int64)
    if GATE:  # o * sigmoid(g), in float32
        g = gl.load(g_ptr + row64 * sg_r + head * sg_h + offs_j[:, None] * sg_j + offs_d[None, :],
                    mask=keep[:, None], other=0.0).to(gl.float32)
        out = out / (1.0 + gl.exp(-g))
    gl.store(out_ptr + row64 * so_r + head * so_h + offs_j[:, None] * so_j + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=keep[:, None])
    safe = gl.where(shift == float("-inf"), 0.0, shift)
    lse = gl.where(empty_rows, float("-inf"), (safe + gl.log2(norm)) * 0.6931471805599453)
    # a sum outside [2^-80, 2^100] (or NaN): the Triton kernel's second launch does the block again
    fits = (run_sum >= 8.271806125530277e-25) & (run_sum <= 1.2676506002282294e30)
    lse = gl.where(fits, lse, float("nan"))
    gl.store(lse_ptr + row64 * sl_r + head * sl_h + offs_j, lse, mask=keep)


@gluon.jit
def _kernel(q_desc, k_desc, v_desc, b_desc, out_ptr, lse_ptr, g_ptr, shift_ptr,
            so_r, so_j, so_h, sg_r, sg_j, sg_h, sl_r, sl_h,
            n_rows, rows_per_batch, n_j, n_k, n_heads, qk_scale,
            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GATE: gl.constexpr,
            STAGES: gl.constexpr, ROWS: gl.constexpr, GROUP: gl.constexpr, CONSUMER_REGS: gl.constexpr,
            LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):
    # CTAs in groups of row triples: consecutive CTAs take a group's triples for one query block, then the next
    # query block, so the bias block in use and the group's keys and values are read from L2
    pid = gl.program_id(0)
    head = gl.program_id(1)
    per_batch = gl.cdiv(rows_per_batch, ROWS)
    n_tuples = (n_rows // rows_per_batch) * per_batch
    blocks_j = gl.cdiv(n_j, BLOCK_M)
    per_group = GROUP * blocks_j
    first = (pid // per_group) * GROUP
    group_tuples = gl.minimum(n_tuples - first, GROUP)
    tuple_id = first + (pid % per_group) % group_tuples
    block_j = (pid % per_group) // group_tuples
    batch = tuple_id // per_batch
    row0 = batch * rows_per_batch + (tuple_id % per_batch) * ROWS
    # row1: the tuple's last row within its batch entry (rows past it load row1 again and store nothing)
    row1 = gl.minimum(row0 + ROWS - 1, (batch + 1) * rows_per_batch - 1)
    j0 = block_j * BLOCK_M
    b_row = (batch * n_heads + head) * n_j + j0  # this (batch, head, query block) in the [B H J, K] bias view

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [ROWS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [ROWS * STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [ROWS * STAGES] + v_desc.block_type.shape, v_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    ones_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, 16],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_N, 16], gl.bfloat16))
    ones_smem.store(gl.full([BLOCK_N, 16], 1.0, gl.bfloat16,
                            gl.BlockedLayout([1, 16], [32, 1], [num_warps, 1], [1, 0])))
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=ROWS)  # every consumer releases a stage
    fence_async_shared()

    # (ROWS == 3: one consumer warpgroup per row, then the loader warp)
    gl.warp_specialize([
        (_consumer, (q_desc, k_desc, v_desc, b_desc, q_smem, k_smem, v_smem, b_smem, ones_smem, q_bar, ready, empty,
                out_ptr, lse_ptr, g_ptr, shift_ptr, so_r, so_j, so_h, sg_r, sg_j, sg_h, sl_r, sl_h,
                row0, row1, head, j0, b_row, n_j, n_k, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, GATE, 0)),
        (_consumer, (q_desc, k_desc, v_desc, b_desc, q_smem, k_smem, v_smem, b_smem, ones_smem, q_bar, ready, empty,
                out_ptr, lse_ptr, g_ptr, shift_ptr, so_r, so_j, so_h, sg_r, sg_j, sg_h, sl_r, sl_h,
                row0, row1, head, j0, b_row, n_j, n_k, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, GATE, 1)),
        (_consumer, (q_desc, k_desc, v_desc, b_desc, q_smem, k_smem, v_smem, b_smem, ones_smem, q_bar, ready, empty,
                out_ptr, lse_ptr, g_ptr, shift_ptr, so_r, so_j, so_h, sg_r, sg_j, sg_h, sl_r, sl_h,
                row0, row1, head, j0, b_row, n_j, n_k, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, GATE, 2)),
        (_loader, (q_desc, k_desc, v_desc, b_desc, q_smem, k_smem, v_smem, b_smem, ones_smem, q_bar, ready, empty,
                out_ptr, lse_ptr, g_ptr, shift_ptr, so_r, so_j, so_h, sg_r, sg_j, sg_h, sl_r, sl_h,
                row0, row1, head, j0, b_row, n_j, n_k, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, GATE, 0)),
    ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])


def ws_launch(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, shift: Tensor, scale: float, rows_per_batch: int,
              out: Tensor, lse: Tensor, gate: Tensor | None) -> None:
    """The fixed-shift first launch into out and lse (see :func:`~.triangle_attention.ws_wanted` for what the
    arguments must be).

    q: [R, J, H, 32] bfloat16; k, v: [R, K, H, 32] (each [rows x tokens, H x 32] with rows 16-byte aligned);
    bias: [B, H, J, K] bfloat16, shifted and in log2 units, a view of rows of K_pad = stride(2) keys (a multiple
    of BLOCK_N), those past K -inf (:func:`~.triangle_attention.fold_key_mask`); shift: [B, H, J] float32
    contiguous, natural units; out: [R, J, H, 32]; lse: [R, H, J] float32; gate: like q or None.
    """
    n_rows, n_j, heads, width = q.shape
    n_k = k.shape[1]
    q_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, width], gl.bfloat16)
    k_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, width], gl.bfloat16)
    b_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.bfloat16)
    q_desc = TensorDescriptor(q, [n_rows * n_j, heads * width], [q.stride(1), 1], [BLOCK_M, width], q_layout)
    k_desc = TensorDescriptor(k, [n_rows * n_k, heads * width], [k.stride(1), 1], [BLOCK_N, width], k_layout)
    v_desc = TensorDescriptor(v, [n_rows * n_k, heads * width], [v.stride(1), 1], [BLOCK_N, width], k_layout)
    # the bias rows hold stride(2) keys (padded with -inf to a multiple of BLOCK_N): all are described
    b_desc = TensorDescriptor(bias, [bias.shape[0] * heads * n_j, bias.stride(2)], [bias.stride(2), 1],
                              [BLOCK_M, BLOCK_N], b_layout)
    g = q if gate is None else gate
    n_batch = n_rows // rows_per_batch
    grid = (n_batch * triton.cdiv(rows_per_batch, ROWS) * triton.cdiv(n_j, BLOCK_M), heads)
    _kernel[grid](q_desc, k_desc, v_desc, b_desc, out, lse, g, shift,
                  out.stride(0), out.stride(1), out.stride(2), g.stride(0), g.stride(1), g.stride(2),
                  lse.stride(0), lse.stride(1), n_rows, rows_per_batch, n_j, n_k, heads,
                  float(scale) * 1.4426950408889634,
                  HEAD_DIM=width, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GATE=gate is not None, STAGES=STAGES, ROWS=ROWS,
                  GROUP=GROUP, CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, num_warps=4,
                  maxnreg=MAX_REGS)
