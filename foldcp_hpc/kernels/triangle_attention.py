"""Flash-style triangle attention: one Triton kernel for the logits, the online softmax and the weighted values.

For every row r (a query row i of the pair tile, batch folded in) and head h::

    o[r, j, h] = sum_k softmax_k(scale * q[r, j, h] . k[r, k, h] + bias[b(r), h, j, k] + mask_bias[r, k]) v[r, k, h]

The [J, K] logits never exist in memory: each program holds a block of queries and walks the keys in blocks,
keeping the running max and sum in float32 registers (exp2 domain). The triangle bias is shared by all rows r
of a batch entry, so programs are ordered rows-fastest: the programs on the GPU at one time read the same bias
block, which stays in L2. Products run on tensor cores in the input dtype (bfloat16 under autocast) with
float32 accumulation, as Boltz's kernel path; float32 inputs use IEEE float32 products.

Returns the normalised output and the log-sum-exp of each query, so that partial results over key blocks
(one per ring step on a grid) merge exactly (:func:`merge_partial`).

Where the key mask is folded into the bias (:func:`fold_key_mask`) and the operands are bfloat16 or float16, the
kernel keeps no running max: each query's weights are exp(logit - m) with m fixed beforehand, the largest bias of
the query's row over its keys. A logit is q . k scaled plus the bias, so logit - m <= q . k scaled, and for the
model's logits (tens at most) no weight overflows and the sum does not vanish. That saves the max, the rescaling
of the accumulator and its exponential in every key block (0.153 -> 0.149 s at N = 4,096 on an H100,
docs/performance.md). The fold writes that bias already shifted and in log2 units, (b - m) log2(e), summed in
float32 and rounded once to bfloat16 (the model hands it the float32 bias), and the kernel widens it by bit moves:
per logit one FMA, the exponential and one bit move remain (403 instructions per key block against 496; 0.145 ->
0.137 s). On Hopper GPUs that first launch is the warp-specialised Gluon kernel of :mod:`.flash_ws` (three rows
per CTA share each bias block; 0.116 s), the second launch this one (:func:`ws_wanted`). The sum is the tensor
cores' product of the rounded weights with ones: the weights that multiply the values are those summed. The
kernel checks each query's sum (within [2^-80, 2^100]); a query outside it (a weight may have overflowed, or
those that count underflowed) gets lse NaN, and the second launch does its block of queries again with the
running max, as it does the rows with a key mask of their own. What it costs:
the largest weight of a query is rounded to bfloat16 like every other (with the running max it is exactly 1), so
where one key dominates a query the output's rounding error is up to twice the running max's; the layer's error
is unchanged (docs/performance.md). ``FOLDCP_SOFTMAX=online`` keeps the running max everywhere (to compare).

The same kernel serves the single track's attention with pair bias (Boltz's ``AttentionPairBias``: the rows
are the samples, the bias is shared by a batch entry's samples), whose head widths (24, 48) are not powers of
two: the head dim is padded to one inside the kernel. Boltz computes that attention in float32; with
``exact_weights`` the kernel multiplies the softmax weights into the values as two bfloat16 halves (the weight
rounded, then its remainder), which carries ~16 bits of each weight instead of 8, so that bfloat16 operands
(exact in float32) give float32's result up to summation order.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .lazy import autotune_options

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

key_block = None  # the kernel's callee (:mod:`.flash_block`): set among this module's globals when it is built


def kernels_available(device: torch.device) -> bool:
    """Whether the model uses the kernel on ``device`` (see :func:`kernel_wanted`)."""
    return kernel_wanted(device, _triton)


def kernel_wanted(device: torch.device, build) -> bool:
    """The ``FOLDCP_TRITON`` switch for a kernel that ``build()`` compiles (None without Triton).

    Unset or ``auto``: on CUDA devices when Triton imports; ``0``: never (to compare with the PyTorch path);
    ``1``: wherever Triton runs, including its CPU interpreter (``TRITON_INTERPRET=1`` set before Triton is
    first imported: the tests).
    """
    choice = os.environ.get("FOLDCP_TRITON", "auto")
    if choice == "0":
        return False
    if choice == "1" and os.environ.get("TRITON_INTERPRET") == "1":
        return build() is not None
    return device.type == "cuda" and build() is not None


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return _build()


def _build():
    import triton
    import triton.language as tl

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, maxnreg=regs)
        for bm, bn, warps, stages, regs in ((128, 64, 4, 3, 168), (128, 64, 4, 2, 128), (128, 64, 4, 2, 168),
                                            (128, 64, 4, 3, None), (64, 64, 4, 3, None), (64, 64, 4, 2, 96),
                                            (128, 32, 4, 3, None), (128, 128, 8, 3, None))
    ]
    if os.environ.get("TRITON_INTERPRET") == "1":
        configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    from .flash_block import HELPERS

    globals().update(HELPERS)  # the kernel's callee, found among this module's globals (see .tiles)

    @triton.autotune(configs=configs, key=["n_j", "n_k", "HEAD_DIM", "IEEE", "SPLIT_P", "FOLDED", "REDO", "FIXED"],
                     **autotune_options(triton))
    @triton.heuristics({"EVEN_J": lambda a: a["n_j"] % a["BLOCK_M"] == 0,
                        "EVEN_K": lambda a: a["n_k"] % a["BLOCK_N"] == 0,
                        "WHOLE": lambda a: a["n_k"] >= a["BLOCK_N"]})
    @triton.jit
    def forward(q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, out_ptr, lse_ptr, g_ptr, flag_ptr, shift_ptr,
                sq_r, sq_j, sq_h, sk_r, sk_k, sk_h, sv_r, sv_k, sv_h, sg_r, sg_j, sg_h,
                sb_b, sb_h, sb_j, sb_k, sm_r, so_r, so_j, so_h, sl_r, sl_h, ss_b, ss_h,
                n_rows, rows_per_batch, rows_per_group, n_j, n_k, scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, SPLIT_P: tl.constexpr,
                UPCAST: tl.constexpr, GATE: tl.constexpr, FOLDED: tl.constexpr, REDO: tl.constexpr,
                FIXED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN_J: tl.constexpr, EVEN_K: tl.constexpr, WHOLE: tl.constexpr):
        # Programs in groups of rows: consecutive programs take the group's rows for one query block, then the
        # next query block, so the group's keys and values and the bias block in use are read from L2.
        pid = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)  # head x (J x K) bias stride: 64-bit at large N
        blocks_j = tl.cdiv(n_j, BLOCK_M)
        per_group = rows_per_group * blocks_j
        first_row = (pid // per_group) * rows_per_group
        group_rows = tl.minimum(n_rows - first_row, rows_per_group)
        row = (first_row + (pid % per_group) % group_rows).to(tl.int64)
        block_j = (pid % per_group) // group_rows
        batch = row // rows_per_batch
        offs_j = block_j * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)  # the head dim padded to a power of two; in_d masks the padding
        in_d = offs_d < HEAD_DIM
        offs_n = tl.arange(0, BLOCK_N)
        in_j = offs_j < n_j
        if REDO > 0:  # a second launch: only a row flagged in flag_ptr (a key mask of its own) is done, and with
            # REDO == 2 a query block whose first-launch lse holds a NaN (its fixed shift did not fit); the other
            # programs stop here
            redo = tl.load(flag_ptr + row) != 0
            if REDO == 2:
                first = tl.load(lse_ptr + row * sl_r + head * sl_h + offs_j, mask=in_j, other=0.0)
                redo = redo | (tl.max((first != first).to(tl.int32), 0) > 0)
            if not redo:
                return

        q = tl.load(q_ptr + row * sq_r + head * sq_h + offs_j[:, None] * sq_j + offs_d[None, :],
                    mask=in_j[:, None] & in_d[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot mishandles bfloat16 operands
            q = q.to(tl.float32)
        k_base = k_ptr + row * sk_r + head * sk_h
        v_base = v_ptr + row * sv_r + head * sv_h
        b_base = bias_ptr + batch * sb_b + head * sb_h + offs_j[:, None] * sb_j
        m_base = mask_ptr + row * sm_r

        run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if FIXED:  # (with FOLDED) each query's bias row max as a fixed shift, no running max (module docstring)
            shift = tl.load(shift_ptr + batch * ss_b + head * ss_h + offs_j, mask=in_j, other=0.0) \
                * 1.4426950408889634  # natural units -> log2 units
            acc, run_sum = keys_loop_fixed(
                acc, q, k_base, v_base, b_base, offs_n, offs_d, in_j, in_d, sk_k, sv_k, sb_k, n_k,
                scale * 1.4426950408889634, HEAD_DIM < BLOCK_D, not EVEN_J, EVEN_K, WHOLE, BLOCK_N, UPCAST)
            run_max = shift
        else:
            # FOLDED: the key mask is in the bias and the logits are in natural units (see flash_block.key_block)
            acc, run_max, run_sum = keys_loop(
                acc, run_max, run_sum, q, k_base, v_base, b_base, m_base, offs_n, offs_d, in_j, in_d, sk_k, sv_k,
                sb_k, n_k, scale if FOLDED else scale * 1.4426950408889634, HEAD_DIM < BLOCK_D, not EVEN_J, EVEN_K,
                WHOLE, BLOCK_N, IEEE, SPLIT_P, UPCAST, FOLDED)
            if FOLDED:
                run_max = run_max * 1.4426950408889634  # natural units -> log2 units

        empty = run_sum == 0.0
        norm = tl.where(empty, 1.0, run_sum)
        out = acc / norm[:, None]
        if GATE:  # o * sigmoid(g), in float32
            g = tl.load(g_ptr + row * sg_r + head * sg_h + offs_j[:, None] * sg_j + offs_d[None, :],
                        mask=in_j[:, None] & in_d[None, :], other=0.0).to(tl.float32)
            out = out / (1.0 + tl.exp(-g))
        tl.store(out_ptr + row * so_r + head * so_h + offs_j[:, None] * so_j + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=in_j[:, None] & in_d[None, :])
        safe_max = tl.where(run_max == float("-inf"), 0.0, run_max)
        lse = tl.where(empty, float("-inf"), (safe_max + tl.log2(norm)) * 0.6931471805599453)
        if FIXED:  # a sum outside [2^-80, 2^100] (or NaN): a weight may have overflowed, or those that count
            # underflowed; lse NaN marks the query, and the caller has its row done again with the running max
            fits = (run_sum >= 8.271806125530277e-25) & (run_sum <= 1.2676506002282294e30)
            lse = tl.where(fits, lse, float("nan"))
        tl.store(lse_ptr + row * sl_r + head * sl_h + offs_j, lse, mask=in_j)

    return forward


SHIFTED_KEYS = 64  # the shifted fold's rows are padded to a multiple of this many keys (flash_ws.BLOCK_N)
MASKED = -1e4  # an additive key bias at or below this masks the key (exp(-1e4) underflows float32 ~100-fold)
# Without a fold cache, rows per batch entry below which the bias is not copied to fold the mask: the copy costs
# ~2 reads of the bias, the fold saves ~15% of the kernel's ~1 read per row (break-even ~15 rows). The single
# track's attention (a handful of sample rows per call) stays below it.
FOLD_MIN_ROWS = 32


def fold_key_mask(bias: Tensor, mask_bias: Tensor, rows_per_batch: int, cache: dict | None = None,
                  shifted: bool = False, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """The key mask put into a copy of the triangle bias: (folded bias [B, H, J, K], own [R] int8, row max
    [B, H, J] float32 of the folded bias over its keys), or None.

    shifted: the folded bias is returned in bfloat16 and in log2 units with its row max subtracted,
    ``(bias + common - row_max) * log2(e)``, summed in float32 and rounded once: the fixed-shift kernel's
    operand, one FMA per logit. The largest weights, whose bias is near the row max, then carry the smallest
    rounding errors. It is a view of rows of a multiple of ``SHIFTED_KEYS`` keys, -inf past the last key (so
    that whole blocks of keys can be read without bounds checks). dtype: the unshifted folded copy's (default
    the bias's).

    bias: [B, H, J, K]; mask_bias: [R, K] float32 (R = B x rows_per_batch). A batch entry's common key mask is
    the largest bias of each key over its rows (the keys any row sees). Where every common value is 0 or masked
    (<= ``MASKED``), bias + common is the bias itself on every key a row sees, so a row whose key mask is the
    common one (in a triangle attention: every row but those of masked tokens, whose keys are all masked) needs
    no mask of its own: own[r] = 0. The other rows, and all rows of an entry whose common mask is not of this
    kind, have own[r] = 1 and keep their mask and the unfolded bias. Made on the device, without waiting for it.
    ``cache``: a dict kept by the caller across calls on one bias tensor (the chunks of rows of one attention):
    the fold is made once per bias view, from the first call's rows, and later rows are measured against it.
    None where the shapes do not fit or the bias is float16 (whose range would turn masked keys into -inf).
    """
    n_batch, n_keys = bias.shape[0], bias.shape[-1]
    if bias.dtype == torch.float16 or mask_bias.shape != (n_batch * rows_per_batch, n_keys) or mask_bias.numel() == 0:
        return None
    per_batch = mask_bias.view(n_batch, rows_per_batch, n_keys)
    dtype = torch.bfloat16 if shifted else (dtype or bias.dtype)
    key = (bias.data_ptr(), tuple(bias.shape), tuple(bias.stride()), bias.dtype, dtype, shifted)
    hit = None if cache is None else cache.get(key)
    if hit is None:
        common = per_batch.amax(1)  # [B, K]
        exact = ((common == 0) | (common <= MASKED)).all(-1)  # [B]
        folded = bias.to(torch.float32, copy=True).add_(common[:, None, None, :])  # [B,H,J,K] + [B,1,1,K]
        row_max = folded.amax(-1)  # [B, H, J]
        if shifted:  # rows of a multiple of SHIFTED_KEYS keys, -inf past the last (read whole by flash_ws)
            padded = torch.full((*folded.shape[:-1], -(-n_keys // SHIFTED_KEYS) * SHIFTED_KEYS), float("-inf"),
                                device=folded.device, dtype=dtype)
            folded = padded[..., :n_keys].copy_(folded.sub_(row_max[..., None]).mul_(LOG2E))
        else:
            folded = folded.to(dtype)
        hit = (common, exact, folded, row_max)
        if cache is not None:
            cache[key] = hit
    common, exact, folded, row_max = hit
    own = (per_batch != common[:, None, :]).any(-1) | ~exact[:, None]  # [B, rows]
    return folded, own.flatten().to(torch.int8), row_max


def flash_triangle_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask_bias: Tensor, scale: float,
                             rows_per_batch: int, *, exact_weights: bool = False,
                             out_dtype: torch.dtype | None = None, gate: Tensor | None = None,
                             fold_cache: dict | None = None) -> tuple[Tensor, Tensor]:
    """Attention of every row's queries over the same row's keys, with a per-batch [H, J, K] bias.

    q: [R, J, H, D] queries of R rows (R = B x rows, batch-major; any strides with D contiguous; D <= 256);
    k, v: [R, K, H, D] keys and values of the same rows; bias: [B, H, J, K] triangle bias (any float dtype and
    strides); mask_bias: [R, K] float32 additive key bias (the mask and padding); scale: multiplies q . k;
    rows_per_batch: R // B; exact_weights: the weights reach the values' product with ~16 bits (see the module
    docstring), for bfloat16 / float16 operands; out_dtype: o's dtype (default q's); gate: [R, J, H, D] (any
    strides with D contiguous), o is returned as o * sigmoid(gate), computed in float32 before o is rounded (only
    where o is final: all keys in this call); fold_cache: see :func:`fold_key_mask`.
    returns: (o [R, J, H, D], lse [R, H, J] float32 natural-log sum of exponentials of the ungated attention;
    -inf where a query saw no key).

    With a fold_cache, or at least ``FOLD_MIN_ROWS`` rows per batch entry, where a row's key mask is its batch
    entry's common one (:func:`fold_key_mask`), the kernel reads the bias
    with the mask folded in and no mask: one FMA fewer per logit (the logits, in natural units, reach the
    exponential's log2 units in the FMA that subtracts the max). The rows with a mask of their own (masked
    tokens') are then done again by a second launch with their mask, whose programs read the rows' flags on the
    device (the others stop at once), so nothing here waits for the GPU.
    """
    forward = _triton()
    if forward is None:
        raise RuntimeError("the flash triangle-attention kernel needs Triton (pip install triton)")
    n_rows, n_j, heads, width = q.shape
    n_k = k.shape[1]
    if not 1 <= width <= 256:
        raise ValueError(f"the kernel takes head widths 1 to 256, got {width}")
    if gate is not None and gate.shape != q.shape:
        raise ValueError(f"gate {tuple(gate.shape)} does not fit q {tuple(q.shape)}")
    g = q if gate is None else gate  # the kernel reads g only with a gate
    for name, t in (("q", q), ("k", k), ("v", v), ("gate", g)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, strides {tuple(t.stride())}")
    if bias.shape[1:] != (heads, n_j, n_k) or mask_bias.shape != (n_rows, n_k):
        raise ValueError(f"bias {tuple(bias.shape)} / mask_bias {tuple(mask_bias.shape)} do not fit q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype if out_dtype is None else out_dtype)
    lse = torch.empty(n_rows, heads, n_j, device=q.device, dtype=torch.float32)
    if n_rows == 0 or n_j == 0:
        return out, lse
    mask_bias = mask_bias.float()
    # the fold copies the bias once; worth it where many rows read it (or the copy serves many calls)
    fixed = os.environ.get("FOLDCP_SOFTMAX", "fixed") != "online" and q.dtype != torch.float32 \
        and not exact_weights
    # a float32 bias (the model's, so that the fold rounds it once) is read as bfloat16 by bfloat16 operands
    fold = fold_key_mask(bias, mask_bias, rows_per_batch, cache=fold_cache, shifted=fixed,
                         dtype=torch.bfloat16 if q.dtype == torch.bfloat16 else None) \
        if fold_cache is not None or rows_per_batch >= FOLD_MIN_ROWS else None
    shared = (q, k, v, (mask_bias * LOG2E).contiguous(), gate, out, lse, scale, rows_per_batch, exact_weights)
    if fold is None:
        _launch(forward, bias, *shared)
        return out, lse
    folded, own, row_max = fold
    # every row (those with their own mask are redone below)
    if fixed and ws_wanted(q, k, v, folded, gate):
        _flash_ws().ws_launch(q, k, v, folded, row_max, scale, rows_per_batch, out, lse, gate)
    else:
        _launch(forward, folded, *shared, folded=True, shift=row_max if fixed else None)
    # the rows with a key mask of their own, and with the fixed shift the query blocks whose shift did not fit
    # (lse NaN): the kernel's programs find them on the device, so nothing here waits for the GPU
    _launch(forward, bias, *shared, redo=(own, fixed))
    return out, lse


def _launch(forward, bias: Tensor, q: Tensor, k: Tensor, v: Tensor, mask_bias: Tensor, gate: Tensor | None,
            out: Tensor, lse: Tensor, scale: float, rows_per_batch: int, exact_weights: bool, *,
            folded: bool = False, redo: tuple[Tensor, bool] | None = None, shift: Tensor | None = None) -> None:
    """One kernel launch into out and lse (arguments as :func:`flash_triangle_attention`'s; mask_bias in log2
    units). folded: bias has the key mask in it and mask_bias is not read; redo: (flags [R] int8, nan) on the
    device: a second launch over out and lse that does only the rows r with flags[r] != 0 and, with nan, the query
    blocks whose lse (from the first launch) holds a NaN; shift: [B, H, J] float32 (with folded), each
    query's fixed shift in place of the running max (the bias's row max)."""
    n_rows, n_j, heads, width = q.shape
    n_k = k.shape[1]
    g = q if gate is None else gate  # the kernel reads g only with a gate
    # rows per group: their keys and values (per head) within ~16 MiB of L2; 16 rows at most (at N = 4,096 on an
    # H100, groups of 8 or 16 rows took 165 ms against 170-175 ms with 64: more of the programs on the GPU at one
    # time share a bias block)
    row_bytes = 2 * n_k * width * k.element_size()
    rows_per_group = max(1, min(n_rows, 16, (16 << 20) // row_bytes))
    flags = redo[0] if redo is not None else lse  # (any tensor where there is none)
    shifts = shift if shift is not None else lse

    def grid(meta):
        return (n_rows * -(-n_j // meta["BLOCK_M"]), heads)

    forward[grid](q, k, v, bias, mask_bias, out, lse, g, flags, shifts,
                  q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), g.stride(0), g.stride(1), g.stride(2),
                  bias.stride(0), bias.stride(1), bias.stride(2), bias.stride(3), mask_bias.stride(0),
                  out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), shifts.stride(0),
                  shifts.stride(1),
                  n_rows, rows_per_batch, rows_per_group, n_j, n_k, float(scale),
                  HEAD_DIM=width, BLOCK_D=max(16, 1 << (width - 1).bit_length()), IEEE=q.dtype == torch.float32,
                  SPLIT_P=exact_weights and q.dtype != torch.float32,
                  UPCAST=os.environ.get("TRITON_INTERPRET") == "1" and q.dtype != torch.float32,
                  GATE=gate is not None, FOLDED=folded, REDO=0 if redo is None else 1 + redo[1],
                  FIXED=shift is not None)


@functools.lru_cache(maxsize=1)
def _flash_ws():
    """:mod:`.flash_ws`, or None where this Triton has no Gluon for Hopper (or another Gluon API)."""
    try:
        from . import flash_ws
    except (ImportError, AttributeError):
        return None
    return flash_ws


def _aligned(t: Tensor, rows: int) -> bool:
    """t: [R, L, H, D] with D contiguous, the heads adjacent and the R x L lines one stride apart: the
    [R L, H D] matrix a TMA descriptor reads (16-byte aligned start and line stride)."""
    return (t.stride(3) == 1 and t.stride(2) == t.shape[3] and t.stride(0) == rows * t.stride(1)
            and t.stride(1) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0)


def ws_wanted(q: Tensor, k: Tensor, v: Tensor, folded: Tensor, gate: Tensor | None) -> bool:
    """Whether the fixed-shift first launch runs as the warp-specialised Gluon kernel (:mod:`.flash_ws`).

    On an sm_90 GPU (Hopper) with a Triton that has Gluon, for bfloat16 heads of width 32 whose q, k and v are
    TMA-readable (:func:`_aligned`) and the shifted fold (:func:`fold_key_mask`, rows padded to a multiple of
    ``SHIFTED_KEYS`` keys). ``FOLDCP_WS=0`` keeps the Triton kernel (to compare).
    """
    if os.environ.get("FOLDCP_WS", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1" or not q.is_cuda:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0) or q.shape[3] != 32:
        return False
    if any(t.dtype != torch.bfloat16 for t in (q, k, v, folded)) or (gate is not None and gate.dtype != q.dtype):
        return False
    n_j, n_k = q.shape[1], k.shape[1]
    if not (_aligned(q, n_j) and _aligned(k, n_k) and _aligned(v, n_k)):
        return False
    if gate is not None and gate.stride(3) != 1:
        return False
    padded = folded.stride(2)
    if not (folded.stride(3) == 1 and padded % SHIFTED_KEYS == 0 and padded >= n_k
            and folded.stride(1) == n_j * padded and folded.stride(0) == q.shape[2] * folded.stride(1)
            and folded.data_ptr() % 16 == 0):
        return False
    return _flash_ws() is not None


def merge_partial(state: tuple[Tensor, Tensor] | None, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Combine normalised partial attention over disjoint key sets (one ring step each).

    state: (o [R, J, H, D] float32, lse [R, H, J]) so far, or None; out, lse: this step's.
    returns the merged (o float32, lse): o = sum_t exp(lse_t - lse) o_t with lse = logsumexp_t lse_t.
    """
    if state is None:
        return out.float(), lse
    run_out, run_lse = state
    new_lse = torch.logaddexp(run_lse, lse)
    new_lse_safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_run = torch.exp(run_lse - new_lse_safe).transpose(1, 2).unsqueeze(-1)  # [R,H,J] -> [R,J,H,1]
    w_new = torch.exp(lse - new_lse_safe).transpose(1, 2).unsqueeze(-1)
    return run_out.mul_(w_run).add_(out.float() * w_new), new_lse
