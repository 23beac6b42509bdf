"""The flash attention kernel's inner step (:mod:`.triangle_attention`): one block of keys into the running
softmax.

This module imports Triton when it is imported; the kernel builder imports it on first use and puts
:func:`key_block` among its module's globals (see :mod:`.tiles` for why).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["key_block", "keys_loop", "key_block_fixed", "keys_loop_fixed", "HELPERS"]


@triton.jit
def key_rows(base, offs_k, stride, offs_d, in_k, in_d, MASK_K: tl.constexpr, MASK_D: tl.constexpr):
    """The [BLOCK_N, BLOCK_D] rows offs_k of a row's keys or values, zero past n_k (MASK_K) or the head dim
    (MASK_D)."""
    ptrs = base + offs_k[:, None] * stride + offs_d[None, :]
    if MASK_K:
        rows = tl.load(ptrs, mask=in_k[:, None] & in_d[None, :], other=0.0)
    elif MASK_D:
        rows = tl.load(ptrs, mask=in_d[None, :], other=0.0)
    else:
        rows = tl.load(ptrs)
    return rows


@triton.jit
def key_block(acc, run_max, run_sum, q, k_base, v_base, b_base, m_base, start, offs_n, offs_d, in_j, in_d,
              sk_k, sv_k, sb_k, n_k, qk_scale, MASK_D: tl.constexpr,
              MASK_J: tl.constexpr, MASK_K: tl.constexpr, IEEE: tl.constexpr, SPLIT_P: tl.constexpr,
              UPCAST: tl.constexpr, FOLDED: tl.constexpr):
    """The keys start .. start + BLOCK_N of one row and head into the running (acc, max, sum) of its queries.

    acc: [BLOCK_M, BLOCK_D] float32 unnormalised output; run_max, run_sum: [BLOCK_M] float32 (log2 units);
    q: [BLOCK_M, BLOCK_D] queries; k_base, v_base, b_base, m_base: pointers to the row's keys, values, its
    batch entry's bias rows of these queries ([BLOCK_M, 1] pointers) and its key mask. MASK_D, MASK_J, MASK_K:
    bounds checks on the padded head dim, the queries past n_j (bias only), the keys past n_k; whole blocks
    skip them. FOLDED: the key mask is in the bias (no m_base), and the logits, max and qk_scale are in natural
    units, taken to log2 units by the one FMA before each exponential (two FMAs and a subtraction per logit
    become two FMAs); otherwise all are in log2 units.
    """
    offs_k = start + offs_n
    in_k = offs_k < n_k
    k = key_rows(k_base, offs_k, sk_k, offs_d, in_k, in_d, MASK_K, MASK_D)
    if UPCAST:  # the interpreter's dot mishandles bfloat16 operands
        k = k.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    b_ptrs = b_base + offs_k[None, :] * sb_k
    if MASK_K:  # keys past n_k: -inf from the key mask, or from the bias when the mask is in it
        if FOLDED:
            bias = tl.load(b_ptrs, mask=in_j[:, None] & in_k[None, :], other=float("-inf"))
        else:
            bias = tl.load(b_ptrs, mask=in_j[:, None] & in_k[None, :], other=0.0)
    elif MASK_J:
        bias = tl.load(b_ptrs, mask=in_j[:, None], other=0.0)
    else:
        bias = tl.load(b_ptrs)
    if FOLDED:  # natural units, taken to log2 units in the FMA before each exponential
        logits = qk * qk_scale + bias.to(tl.float32)
        to_log2 = 1.4426950408889634
    else:  # log2 units (the key bias arrives in them): two FMAs per element
        if MASK_K:
            key_bias = tl.load(m_base + offs_k, mask=in_k, other=float("-inf"))
        else:
            key_bias = tl.load(m_base + offs_k)
        logits = qk * qk_scale + (bias.to(tl.float32) * 1.4426950408889634 + key_bias[None, :])
        to_log2 = 1.0
    new_max = tl.maximum(run_max, tl.max(logits, 1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    weights = tl.exp2(logits * to_log2 - (safe_max * to_log2)[:, None])
    alpha = tl.exp2((run_max - safe_max) * to_log2)
    run_sum = run_sum * alpha + tl.sum(weights, 1)
    v = key_rows(v_base, offs_k, sv_k, offs_d, in_k, in_d, MASK_K, MASK_D)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(weights, v, acc, input_precision="ieee")
    else:
        # the weights rounded to the values' dtype (as the GPU rounds them); with SPLIT_P their remainder is
        # rounded and multiplied too: ~16 of float32's 24 bits of each weight reach the product
        high = weights.to(v.dtype)
        if UPCAST:  # the interpreter's dot mishandles bfloat16 operands: multiply in float32
            v = v.to(tl.float32)
            acc = tl.dot(high.to(tl.float32), v, acc, input_precision="ieee")
            if SPLIT_P:
                low = (weights - high.to(tl.float32)).to(high.dtype)
                acc = tl.dot(low.to(tl.float32), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(high, v, acc)
            if SPLIT_P:
                acc = tl.dot((weights - high.to(tl.float32)).to(v.dtype), v, acc)
    return acc, new_max, run_sum


@triton.jit
def keys_loop(acc, run_max, run_sum, q, k_base, v_base, b_base, m_base, offs_n, offs_d, in_j, in_d,
              sk_k, sv_k, sb_k, n_k, qk_scale, MASK_D: tl.constexpr, MASK_J: tl.constexpr, EVEN_K: tl.constexpr,
              WHOLE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, SPLIT_P: tl.constexpr,
              UPCAST: tl.constexpr, FOLDED: tl.constexpr):
    """All of one row's keys into the running (acc, max, sum): the whole key blocks without bounds checks (the
    masks cost ~10% at N = 4096), then the partial one. Arguments as :func:`key_block`'s."""
    n_whole = (n_k if EVEN_K else n_k - n_k % BLOCK_N) if WHOLE else 0
    if WHOLE:
        # At least one trip, said to the compiler: a loop that may run zero times leaves a path on which the
        # accumulator is set by moves while a tensor-core product is in flight, and ptxas then waits after
        # every product (its warning C7515: twelve round trips per key block at BLOCK_M = 128).
        tl.assume(n_whole > 0)
        for start in range(0, n_whole, BLOCK_N):
            acc, run_max, run_sum = key_block(
                acc, run_max, run_sum, q, k_base, v_base, b_base, m_base, start, offs_n, offs_d, in_j, in_d,
                sk_k, sv_k, sb_k, n_k, qk_scale, MASK_D, MASK_J, False, IEEE, SPLIT_P, UPCAST, FOLDED)
    if not EVEN_K:
        acc, run_max, run_sum = key_block(
            acc, run_max, run_sum, q, k_base, v_base, b_base, m_base, n_whole, offs_n, offs_d, in_j, in_d,
            sk_k, sv_k, sb_k, n_k, qk_scale, MASK_D, MASK_J, True, IEEE, SPLIT_P, UPCAST, FOLDED)
    return acc, run_max, run_sum


@triton.jit
def widen_bf16(x):
    """bfloat16 -> float32 by bit moves, one instruction per value: each 32-bit register holds two values, the
    low one shifted up, the high one masked (the compiler's conversion takes ~1.7 instructions per value)."""
    return tl.inline_asm_elementwise("shl.b32 $0, $2, 16;\n\tand.b32 $1, $2, 0xffff0000;", "=r,=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def key_block_fixed(acc, sums, q, k_base, v_base, b_base, start, offs_n, offs_d, in_j, in_d, sk_k, sv_k, sb_k, n_k,
                    qk_scale, ones, MASK_D: tl.constexpr, MASK_J: tl.constexpr, MASK_K: tl.constexpr,
                    UPCAST: tl.constexpr):
    """:func:`key_block` with the key mask in the bias and a fixed shift in place of the running max.

    b_base: the bias rows in bfloat16, in log2 units, each query's fixed shift already subtracted
    (:func:`~.triangle_attention.fold_key_mask`; the caller checks afterwards that no weight overflowed and the
    sum did not vanish); qk_scale: the scale in log2 units; sums: [BLOCK_M, 16] float32, each column the running
    sum of the weights; ones: [BLOCK_N, 16] ones in q's dtype. No max, no rescaling: per logit one bit move to
    widen the bias, one FMA, the exponential and half a conversion. The sum is a tensor-core product of the
    rounded weights with ones, so the weights that multiply the values are the ones summed. Returns (acc, sums).
    """
    offs_k = start + offs_n
    in_k = offs_k < n_k
    k = key_rows(k_base, offs_k, sk_k, offs_d, in_k, in_d, MASK_K, MASK_D)
    if UPCAST:  # the interpreter's dot mishandles bfloat16 operands
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k))
    b_ptrs = b_base + offs_k[None, :] * sb_k
    if MASK_K:
        bias = tl.load(b_ptrs, mask=in_j[:, None] & in_k[None, :], other=float("-inf"))
    elif MASK_J:
        bias = tl.load(b_ptrs, mask=in_j[:, None], other=0.0)
    else:
        bias = tl.load(b_ptrs)
    if UPCAST:  # the interpreter: no inline assembly
        bias = bias.to(tl.float32)
    else:
        bias = widen_bf16(bias)
    weights = tl.exp2(qk * qk_scale + bias)  # log2 units, the shift already in the bias: one FMA per logit
    v = key_rows(v_base, offs_k, sv_k, offs_d, in_k, in_d, MASK_K, MASK_D)
    high = weights.to(v.dtype)
    if UPCAST:  # float32 products of the rounded weights
        acc = tl.dot(high.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        sums = tl.dot(high.to(tl.float32), ones.to(tl.float32), sums, input_precision="ieee")
    else:
        acc = tl.dot(high, v, acc)
        sums = tl.dot(high, ones, sums)
    return acc, sums


@triton.jit
def keys_loop_fixed(acc, q, k_base, v_base, b_base, offs_n, offs_d, in_j, in_d, sk_k, sv_k, sb_k, n_k, qk_scale,
                    MASK_D: tl.constexpr, MASK_J: tl.constexpr, EVEN_K: tl.constexpr, WHOLE: tl.constexpr,
                    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """All of one row's keys through :func:`key_block_fixed`: whole blocks, then the partial one. Returns
    (acc, run_sum [BLOCK_M])."""
    n_whole = (n_k if EVEN_K else n_k - n_k % BLOCK_N) if WHOLE else 0
    ones = tl.full([BLOCK_N, 16], 1.0, q.dtype)  # (16: the narrowest product the compiler takes)
    sums = tl.zeros([acc.shape[0], 16], tl.float32)
    if WHOLE:
        tl.assume(n_whole > 0)  # see keys_loop
        for start in range(0, n_whole, BLOCK_N):
            acc, sums = key_block_fixed(
                acc, sums, q, k_base, v_base, b_base, start, offs_n, offs_d, in_j, in_d, sk_k, sv_k, sb_k, n_k,
                qk_scale, ones, MASK_D, MASK_J, False, UPCAST)
    if not EVEN_K:
        acc, sums = key_block_fixed(
            acc, sums, q, k_base, v_base, b_base, n_whole, offs_n, offs_d, in_j, in_d, sk_k, sv_k, sb_k, n_k,
            qk_scale, ones, MASK_D, MASK_J, True, UPCAST)
    return acc, tl.max(sums, 1)  # 16 equal columns


HELPERS = {"key_block": key_block, "keys_loop": keys_loop, "key_block_fixed": key_block_fixed,
           "keys_loop_fixed": keys_loop_fixed}
