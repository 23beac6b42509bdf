"""The Triton kernels against PyTorch, in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _interpreted(monkeypatch):
    monkeypatch.setenv("FOLDCP_TRITON", "1")


def test_layer_norm_rows_reads_channel_first():
    from foldcp_hpc.kernels.layer_norm import fast_layer_norm_ok, rows_layer_norm

    torch.manual_seed(0)
    product = torch.randn(32, 1, 5, 7) * 3 + 1  # [C, B, I, J] channel-first, as the triangle product
    x = product.permute(1, 2, 3, 0)  # [B, I, J, C], channel stride B*I*J
    norm = torch.nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
        assert fast_layer_norm_ok(x, 32) and not fast_layer_norm_ok(x, 24)
        out = rows_layer_norm(x, norm.weight, norm.bias, norm.eps, torch.float32)
        assert out.is_contiguous() and out.shape == x.shape
        torch.testing.assert_close(out, norm(x), rtol=1e-5, atol=1e-5)


def test_row_dims_many_layouts():
    """Pure layout maths: every row's first element found by (outer, inner) strides, for slices and transposes."""
    from foldcp_hpc.kernels.layer_norm import row_dims

    gen = torch.Generator().manual_seed(0)

    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=gen))

    checked = 0
    for _ in range(200):
        size = [draw(1, 6) for _ in range(draw(1, 5))]  # leading dims; rows of 3 channels
        parent = [s + draw(0, 3) for s in size] + [6]
        x = torch.arange(float(math.prod(parent))).view(parent)
        for d, s in enumerate(size):  # a window of each leading dim
            x = x.narrow(d, draw(0, parent[d] - s + 1), s)
        x = x[..., ::2] if draw(0, 2) else x[..., 1:4]  # channel stride 2 or 1
        if len(size) > 1 and draw(0, 2):
            a, b = sorted(torch.randperm(len(size), generator=gen)[:2].tolist())
            x = x.transpose(a, b)
        found = row_dims(tuple(x.shape), tuple(x.stride()))
        rows = x.reshape(-1, x.shape[-1])
        if found is None:
            continue
        n_outer, n_inner, s_outer, s_inner = found
        assert n_outer * n_inner == rows.shape[0]
        flat = x.as_strided((x.untyped_storage().nbytes() // x.element_size(),), (1,), 0)
        for r in range(rows.shape[0]):
            at = x.storage_offset() + (r // n_inner) * s_outer + (r % n_inner) * s_inner
            assert torch.equal(flat[at:at + 3 * x.stride(-1):x.stride(-1)], rows[r])
        checked += 1
    assert checked > 100
    assert row_dims((1, 4, 6, 8), (4 * 6 * 8, 8, 4 * 8, 1)) == (4, 6, 8, 32)  # the ending node's column chunk
    assert row_dims((2, 4, 6, 8), (99 * 8, 8, 4 * 8, 1)) is None


def test_layer_norm_reads_a_column_chunk_in_place():
    from foldcp_hpc.kernels.layer_norm import rows_layer_norm

    torch.manual_seed(2)
    z = torch.randn(1, 9, 9, 16)
    x = z[:, :, 2:7].transpose(1, 2)  # [B,I,j,C] -> [B,j,I,C]: the ending node's chunk, two row dims
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
        torch.testing.assert_close(rows_layer_norm(x, norm.weight, norm.bias, norm.eps, torch.float32), norm(x),
                                   rtol=1e-5, atol=1e-5)
        wide = torch.randn(2, 9, 9, 16)[:, :, 2:7].transpose(1, 2)  # three row dims: copied first
        torch.testing.assert_close(rows_layer_norm(wide, norm.weight, norm.bias, norm.eps, torch.float32),
                                   norm(wide), rtol=1e-5, atol=1e-5)


def test_flash_triangle_attention_and_merge():
    from foldcp_hpc.kernels.triangle_attention import flash_triangle_attention, merge_partial

    torch.manual_seed(1)
    batch, rows, n_j, n_k, heads, width = 2, 3, 21, 19, 2, 16
    q, k, v = (torch.randn(batch * rows, n, heads, width) for n in (n_j, n_k, n_k))
    bias = torch.randn(batch, heads, n_j, n_k)
    mask_bias = torch.zeros(batch * rows, n_k)
    mask_bias[:, 4] = -1e9
    mask_bias[0, 10:] = -1e30  # padded keys
    scale = 1 / math.sqrt(width)
    logits = torch.einsum("rjhd,rkhd->rhjk", q, k) * scale + bias.repeat_interleave(rows, 0) \
        + mask_bias[:, None, None, :]
    expected = torch.einsum("rhjk,rkhd->rjhd", logits.softmax(-1), v)
    out, lse = flash_triangle_attention(q, k, v, bias, mask_bias, scale, rows)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=1e-5, atol=1e-5)
    # two key blocks merged (a ring of two steps) give the same
    halves = [slice(0, 8), slice(8, n_k)]
    state = None
    for keys in halves:
        part = flash_triangle_attention(q, k[:, keys], v[:, keys], bias[..., keys], mask_bias[:, keys], scale, rows)
        state = merge_partial(state, *part)
    torch.testing.assert_close(state[0], expected, rtol=1e-5, atol=1e-5)
    # bfloat16 operands, float32 accumulation: within bfloat16 rounding
    out16, _ = flash_triangle_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, mask_bias, scale, rows)
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - expected).abs().max() < 5e-2


def _token_mask_bias(token_mask: torch.Tensor) -> torch.Tensor:
    """[B, N] token mask -> [B*N, N] key bias of a triangle attention's rows: -1e9 unless row and key are kept."""
    pair = token_mask[:, :, None] & token_mask[:, None, :]
    return ((~pair).float() * -1e9).flatten(0, 1)


def test_fold_key_mask_plan():
    from foldcp_hpc.kernels.triangle_attention import fold_key_mask

    torch.manual_seed(3)
    n = 12
    tokens = torch.ones(2, n, dtype=torch.bool)
    tokens[0, 5] = False
    tokens[1, 9:] = False  # padding
    mask_bias = _token_mask_bias(tokens)
    bias = torch.randn(2, 3, n, n)
    folded, own, row_max = fold_key_mask(bias, mask_bias, n)
    common = torch.where(tokens, 0.0, -1e9)  # [B, K]: the keys of the kept rows
    torch.testing.assert_close(folded, bias + common[:, None, None, :], rtol=0, atol=0)
    assert torch.equal(folded[:, :, :, 0], bias[:, :, :, 0])  # kept keys keep their bias exactly (x + 0.0)
    assert own.dtype == torch.int8 and torch.nonzero(own).flatten().tolist() == [5, n + 9, n + 10, n + 11]
    assert row_max.dtype == torch.float32 and torch.equal(row_max, folded.amax(-1))  # [B, H, J]
    soft = mask_bias.clone()
    soft[:n, 2] = -5.0  # the first entry's key bias is not a mask: all its rows keep their own
    assert fold_key_mask(bias, soft, n)[1].tolist() == [1] * n + own[n:].tolist()
    assert fold_key_mask(bias.half(), mask_bias, n) is None
    # a cache kept across chunks of rows: one fold per bias view, from the first chunk's rows
    cache = {}
    first, _, _ = fold_key_mask(bias, mask_bias, n, cache=cache)
    other = mask_bias.clone()
    other[:, 0] = -1e9  # later rows with another mask: measured against the first fold, so their own
    again, own_again, _ = fold_key_mask(bias, other, n, cache=cache)
    assert again is first and len(cache) == 1 and own_again.tolist() == [1] * (2 * n)
    block, _, _ = fold_key_mask(bias[..., 1:], mask_bias[:, 1:], n, cache=cache)  # another view: folded anew
    assert len(cache) == 2 and torch.equal(block, first[..., 1:])
    # shifted (the fixed-shift kernel's operand): (bias + common - row max) log2(e), rounded once to bfloat16
    shifted, own_s, max_s = fold_key_mask(bias, mask_bias, n, shifted=True)
    exact = ((bias.double() + common.double()[:, None, None, :] - row_max.double()[..., None]) * math.log2(math.e))
    assert shifted.dtype == torch.bfloat16 and torch.equal(own_s, own) and torch.equal(max_s, row_max)
    assert torch.equal(shifted, exact.to(torch.bfloat16))  # one rounding
    assert shifted.stride(2) == 64  # rows padded to whole blocks of 64 keys, -inf past the last
    padding = shifted.as_strided((*shifted.shape[:-1], 64), shifted.stride())[..., n:]
    assert torch.isinf(padding).all() and (padding < 0).all()
    assert (shifted.amax(-1) == 0).all()  # each query's largest weight is exp2(0) before its q . k
    assert fold_key_mask(bias, mask_bias, n, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_flash_attention_folded_mask_matches_reference(monkeypatch):
    """Rows reading the folded bias (first launch) and rows keeping their own mask (second launch, through the
    device's row list) match float64; queries and keys both end in a partial block, before them whole ones."""
    from foldcp_hpc.kernels import triangle_attention as ta

    torch.manual_seed(4)
    batch, rows, n_j, n_k, heads, width = 2, 10, 21, 37, 2, 16
    q = torch.randn(batch * rows, n_j, heads, width)
    k, v, = (torch.randn(batch * rows, n_k, heads, width) for _ in range(2))
    bias = torch.randn(batch, heads, n_j, n_k)
    mask_bias = torch.zeros(batch * rows, n_k)
    mask_bias[:, 3] = -1e9  # masked for every row
    mask_bias[rows:, n_k - 4:] = -1e30  # the second entry's padding
    mask_bias[rows + 2, 7] = -1e9  # one row with a key mask of its own
    assert ta.fold_key_mask(bias, mask_bias, rows)[1].tolist() == [0] * (rows + 2) + [1] + [0] * (rows - 3)
    folds = []
    fold = ta.fold_key_mask
    monkeypatch.setattr(ta, "fold_key_mask", lambda *a, **kw: folds.append(len(a)) or fold(*a, **kw))
    ta.flash_triangle_attention(q, k, v, bias, mask_bias, width**-0.5, rows)
    assert rows < ta.FOLD_MIN_ROWS and not folds  # few rows, no cache: the bias is not copied
    out, lse = ta.flash_triangle_attention(q, k, v, bias, mask_bias, width**-0.5, rows, fold_cache={})
    assert folds
    expected = _attention_reference(q, k, v, bias, mask_bias, width**-0.5, rows)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    logits = torch.einsum("rjhd,rkhd->rhjk", q, k) * width**-0.5 + bias.repeat_interleave(rows, 0) \
        + mask_bias[:, None, None, :]
    torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=1e-5, atol=1e-5)
    gate = torch.randn_like(q)
    gated, _ = ta.flash_triangle_attention(q, k, v, bias, mask_bias, width**-0.5, rows, gate=gate, fold_cache={})
    torch.testing.assert_close(gated.double(), expected * torch.sigmoid(gate.double()), rtol=1e-5, atol=1e-5)
    bf16, _ = ta.flash_triangle_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias.bfloat16(), mask_bias,
                                          width**-0.5, rows, fold_cache={})
    assert (bf16.double() - expected).abs().max() < 5e-2


def test_flash_triangle_attention_refuses_bad_shapes():
    from foldcp_hpc.kernels.triangle_attention import flash_triangle_attention

    q = torch.randn(2, 5, 2, 300)
    with pytest.raises(ValueError, match="head widths 1 to 256, got 300"):
        flash_triangle_attention(q, q, q, torch.zeros(1, 2, 5, 5), torch.zeros(2, 5), 1.0, 2)
    q = torch.randn(2, 5, 2, 16)
    with pytest.raises(ValueError, match="do not fit"):
        flash_triangle_attention(q, q, q, torch.zeros(1, 2, 5, 4), torch.zeros(2, 5), 1.0, 2)


def _attention_reference(q, k, v, bias, mask_bias, scale, rows):
    """float64 softmax attention of float32 (or bfloat16, taken exactly) q, k, v: [R, J|K, H, D]."""
    q, k, v, bias, mask_bias = (t.double() for t in (q, k, v, bias, mask_bias))
    logits = torch.einsum("rjhd,rkhd->rhjk", q, k) * scale + bias.repeat_interleave(rows, 0) \
        + mask_bias[:, None, None, :]
    return torch.einsum("rhjk,rkhd->rjhd", logits.softmax(-1), v)


def _fixed_shift_case(seed: int):
    """bfloat16 q, k, v of 2 x 40 rows (the fold's many rows), a bias, a common key mask and padding."""
    torch.manual_seed(seed)
    batch, rows, n_j, n_k, heads, width = 2, 40, 21, 37, 2, 16
    q = torch.randn(batch * rows, n_j, heads, width).bfloat16()
    k, v = (torch.randn(batch * rows, n_k, heads, width).bfloat16() for _ in range(2))
    bias = (3 * torch.randn(batch, heads, n_j, n_k)).bfloat16()
    mask_bias = torch.zeros(batch * rows, n_k)
    mask_bias[:, 3] = -1e9
    mask_bias[rows:, n_k - 4:] = -1e30
    return q, k, v, bias, mask_bias, width**-0.5, rows


def test_fixed_shift_matches_the_running_max(monkeypatch):
    """With the mask folded and bfloat16 operands the kernel keeps no running max (each query's bias row max is
    its shift): the output matches float64 to bfloat16 rounding and the running max's output; lse to the
    rounding of the summed weights."""
    from foldcp_hpc.kernels import triangle_attention as ta

    q, k, v, bias, mask_bias, scale, rows = _fixed_shift_case(5)
    launches = []
    launch = ta._launch
    monkeypatch.setattr(ta, "_launch",
                        lambda *a, **kw: launches.append(kw.get("shift") is not None) or launch(*a, **kw))
    out, lse = ta.flash_triangle_attention(q, k, v, bias, mask_bias, scale, rows)
    assert launches == [True, False]  # the fixed shift, then the (empty) launch for rows of their own
    expected = _attention_reference(q, k, v, bias, mask_bias, scale, rows)
    assert (out.double() - expected).abs().max() < 2e-2
    logits = torch.einsum("rjhd,rkhd->rhjk", q.double(), k.double()) * scale \
        + bias.double().repeat_interleave(rows, 0) + mask_bias.double()[:, None, None, :]
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1), rtol=0, atol=1e-2)
    monkeypatch.setenv("FOLDCP_SOFTMAX", "online")
    launches.clear()
    online, online_lse = ta.flash_triangle_attention(q, k, v, bias, mask_bias, scale, rows)
    assert launches == [False, False]
    assert (out.float() - online.float()).abs().max() < 2e-2
    torch.testing.assert_close(lse, online_lse, rtol=0, atol=1e-2)


def test_warp_specialised_launch_routing(monkeypatch):
    """Where the Gluon kernel is wanted (a Hopper GPU: emulated here), the fixed-shift first launch goes to
    :func:`~foldcp_hpc.kernels.flash_ws.ws_launch` with the shifted fold (rows padded with -inf to a multiple of
    64 keys) and the row max; the second launch (own masks, overflowing queries) stays the Triton kernel's. The
    kernel itself runs in ``tests/test_flash_ws_gpu.py`` on the H100."""
    from types import SimpleNamespace

    from foldcp_hpc.kernels import triangle_attention as ta

    q, k, v, bias, mask_bias, scale, rows = _fixed_shift_case(7)
    assert not ta.ws_wanted(q, k, v, bias, None)  # not on a CPU (nor in Triton's interpreter)
    expected, expected_lse = ta.flash_triangle_attention(q, k, v, bias, mask_bias, scale, rows)
    calls, launches = [], []
    launch = ta._launch

    def ws_launch(q, k, v, folded, shift, scale, rows_per_batch, out, lse, gate):
        calls.append((folded, shift))
        # the same result by the Triton kernel's fixed-shift launch
        launch(ta._triton(), folded, q, k, v, (mask_bias * ta.LOG2E).contiguous(), gate, out, lse, scale,
               rows_per_batch, False, folded=True, shift=shift)

    monkeypatch.setattr(ta, "ws_wanted", lambda *a: True)
    monkeypatch.setattr(ta, "_flash_ws", lambda: SimpleNamespace(ws_launch=ws_launch))
    monkeypatch.setattr(ta, "_launch", lambda *a, **kw: launches.append(kw) or launch(*a, **kw))
    out, lse = ta.flash_triangle_attention(q, k, v, bias, mask_bias, scale, rows)
    assert len(calls) == 1 and len(launches) == 1 and launches[0]["redo"] == (launches[0]["redo"][0], True)
    folded, shift = calls[0]
    n_k = k.shape[1]
    assert folded.dtype == torch.bfloat16 and folded.shape[-1] == n_k and folded.stride(2) == 64
    padding = folded.as_strided((*folded.shape[:-1], 64), folded.stride())[..., n_k:]
    assert torch.isinf(padding).all() and (padding < 0).all()
    assert shift.dtype == torch.float32 and shift.shape == bias.shape[:-1]
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)


def test_warp_specialised_launch_reads_only_tma_layouts():
    """The Gluon kernel's TMA descriptors read [rows x tokens, H x D] matrices: q, k and v as the model's
    projection gives them (views of one [R, L, 4 H D] tensor) pass; heads apart, or lines not 16-byte aligned,
    do not."""
    from foldcp_hpc.kernels.triangle_attention import _aligned

    projection = torch.zeros(6, 10, 4 * 4 * 32, dtype=torch.bfloat16)
    q = projection[..., :128].unflatten(-1, (4, 32))  # [R, L, H, D]
    k = projection[..., 128:256].unflatten(-1, (4, 32))
    assert _aligned(q, 10) and _aligned(k, 10)
    assert not _aligned(q.transpose(0, 1), 6)  # rows and tokens swapped: the R x L lines are not one stride apart
    odd = torch.zeros(6, 10, 4 * 36 + 4, dtype=torch.bfloat16)[..., 4:].unflatten(-1, (4, 36))[..., :32]
    assert not _aligned(odd, 10)  # heads 36 apart, the start 8 bytes in


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_fixed_shift_redoes_the_rows_whose_weights_overflow(monkeypatch):
    """Rows whose logits exceed the fixed shift by far more than float32's range (q scaled up 400-fold: weights
    overflow) are marked by a NaN lse and done again with the running max, by the launch that does the rows with a
    key mask of their own; every other row keeps the fixed shift's result, bit for bit."""
    from foldcp_hpc.kernels import triangle_attention as ta

    q, k, v, bias, mask_bias, scale, rows = _fixed_shift_case(6)
    hot = [4, rows + 11]
    q[hot] = (q[hot].float() * 400).bfloat16()
    redo = []
    launch = ta._launch

    def first_only(*args, **kw):  # the fixed-shift launch alone: what the second launch starts from
        if kw.get("redo") is None:
            launch(*args, **kw)
        else:
            redo.append(kw["redo"])

    monkeypatch.setattr(ta, "_launch", first_only)
    first, first_lse = ta.flash_triangle_attention(q, k, v, bias, mask_bias, scale, rows)
    monkeypatch.undo()
    out, lse = ta.flash_triangle_attention(q, k, v, bias, mask_bias, scale, rows)
    assert len(redo) == 1 and redo[0][1] and not redo[0][0].any()  # no row has a key mask of its own here
    marked = torch.isnan(first_lse).flatten(1).any(1)
    assert marked.nonzero().flatten().tolist() == hot
    assert torch.isfinite(lse).all() and torch.isfinite(out.float()).all()
    cold = ~marked
    assert torch.equal(out[cold], first[cold]) and torch.equal(lse[cold], first_lse[cold])
    expected = _attention_reference(q, k, v, bias, mask_bias, scale, rows)
    assert (out.double() - expected).abs().max() < 2e-2


@pytest.mark.parametrize("width", [24, 48])
def test_flash_attention_any_head_width(width):
    """The single track's head widths (384 / 16, 768 / 16) are padded inside the kernel: float32 IEEE products
    give the float64 result to float32 rounding; the bias is read through the strides of a channel-last view."""
    from foldcp_hpc.kernels.triangle_attention import flash_triangle_attention

    torch.manual_seed(2)
    samples, n_j, n_k, heads = 3, 13, 18, 2
    q, k, v = (torch.randn(samples, n, heads, width) for n in (n_j, n_k, n_k))
    bias = torch.randn(1, n_j, n_k, 3 * heads)[..., heads:2 * heads].movedim(-1, 1)  # [B,H,J,K], strided
    mask_bias = torch.zeros(samples, n_k)
    mask_bias[:, 5] = -1e6
    mask_bias[:, 15:] = -1e30
    scale = width**-0.5
    out, _ = flash_triangle_attention(q, k, v, bias, mask_bias, scale, samples)
    expected = _attention_reference(q, k, v, bias, mask_bias, scale, samples)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_j, n_k", [(32, 48), (32, 37), (35, 48)])
def test_flash_attention_whole_and_partial_blocks(n_j, n_k):
    """Whole key blocks skip the bounds checks and the partial last one keeps them (the interpreter's blocks are
    16): every mix of whole and partial query and key blocks, with masked keys, against float64."""
    from foldcp_hpc.kernels.triangle_attention import flash_triangle_attention

    torch.manual_seed(4)
    rows, heads, width = 2, 2, 32
    q, k, v = (torch.randn(rows, n, heads, width) for n in (n_j, n_k, n_k))
    bias = torch.randn(1, heads, n_j, n_k)
    mask_bias = torch.zeros(rows, n_k)
    mask_bias[0, 3] = -1e9
    mask_bias[1, n_k - 2:] = -1e30
    out, lse = flash_triangle_attention(q, k, v, bias, mask_bias, width**-0.5, rows)
    expected = _attention_reference(q, k, v, bias, mask_bias, width**-0.5, rows)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(lse).all()


def test_flash_attention_gate():
    """With a gate (a strided view, as the model's projection split), o comes back as o * sigmoid(gate), and the
    log-sum-exp is the ungated attention's; a gate of another shape is refused."""
    from foldcp_hpc.kernels.triangle_attention import flash_triangle_attention

    torch.manual_seed(5)
    rows, n_j, n_k, heads, width = 2, 19, 33, 2, 16
    q, k, v = (torch.randn(rows, n, heads, width) for n in (n_j, n_k, n_k))
    gate = torch.randn(rows, n_j, 3 * heads * width)[..., heads * width:2 * heads * width].unflatten(-1, (heads, width))
    bias = torch.randn(1, heads, n_j, n_k)
    mask_bias = torch.zeros(rows, n_k)
    mask_bias[1, 7] = -1e9
    plain, lse = flash_triangle_attention(q, k, v, bias, mask_bias, width**-0.5, rows)
    gated, gated_lse = flash_triangle_attention(q, k, v, bias, mask_bias, width**-0.5, rows, gate=gate)
    expected = _attention_reference(q, k, v, bias, mask_bias, width**-0.5, rows) * torch.sigmoid(gate.double())
    torch.testing.assert_close(gated.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated_lse, lse)
    assert not torch.allclose(gated, plain)
    with pytest.raises(ValueError, match="gate"):
        flash_triangle_attention(q, k, v, bias, mask_bias, width**-0.5, rows, gate=gate[:, 1:])


def test_flash_attention_exact_weights():
    """bfloat16 q, k, v: with exact_weights the weights reach the values with ~16 bits, so the float32 output
    is within float32-like error of the exact result, far inside the plain kernel's bfloat16-weight error."""
    from foldcp_hpc.kernels.triangle_attention import flash_triangle_attention

    torch.manual_seed(3)
    samples, n, heads, width = 2, 40, 2, 48
    q, k, v = (torch.randn(samples, n, heads, width).bfloat16() for _ in range(3))
    bias = torch.randn(1, heads, n, n)
    mask_bias = torch.zeros(samples, n)
    expected = _attention_reference(q, k, v, bias, mask_bias, width**-0.5, samples)

    def error(exact):
        out, _ = flash_triangle_attention(q, k, v, bias, mask_bias, width**-0.5, samples, exact_weights=exact,
                                          out_dtype=torch.float32)
        assert out.dtype == torch.float32
        return float((out.double() - expected).norm() / expected.norm())

    plain, exact = error(False), error(True)
    assert exact < 2e-5 and plain > 20 * exact, (plain, exact)


@pytest.mark.parametrize("act", ["sigmoid", "silu"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gate_product_matches_pytorch(act, accumulate):
    """The fused gate kernel against its PyTorch form: row-strided views (two halves of one GEMM output, a slice
    of a wider out), a column mask, float32 math rounded once into a bfloat16 or float32 out."""
    from foldcp_hpc.kernels.gating import _reference, gate_product

    torch.manual_seed(2)
    both = torch.randn(37, 2 * 300) * 3  # [rows, 2C]: value and gate columns of one product, C not a block multiple
    value, gate = both[:, 300:], both[:, :300]
    mask = (torch.rand(300) > 0.2).float()
    for dtype in (torch.bfloat16, torch.float32):
        wide = torch.randn(37, 320).to(dtype)
        before = wide.clone()
        out, expected = wide[:, 10:310], wide.clone()[:, 10:310]
        _reference(value, gate, act, expected, mask, accumulate)
        gate_product(value, gate, act, out=out, mask=mask, accumulate=accumulate)
        tolerance = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(out, expected, **tolerance)
        # written in place, columns outside the view untouched
        assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 310:], before[:, 310:])
    y = value * (torch.sigmoid(gate) if act == "sigmoid" else torch.nn.functional.silu(gate)) * mask
    torch.testing.assert_close(_reference(value, gate, act, torch.zeros_like(y), mask, False), y)
    with pytest.raises(ValueError, match="act must be one of"):
        gate_product(value, gate, "relu", out=torch.empty_like(value))


@pytest.mark.parametrize("same", [True, False])
def test_norm_gate_matches_pytorch(same):
    """LayerNorm, two bfloat16 projections with float32 accumulation and the sigmoid gate in one pass: as
    PyTorch computes the same steps (LayerNorm in float32, rounded to bfloat16, products widened), to float32
    rounding. Channel-first input and output (the triangle product, the operands) and in-place accumulation."""
    from foldcp_hpc.kernels.norm_gate import norm_gate, norm_gate_ok

    torch.manual_seed(4)
    rows, channels, n_out = 37, 32, 72
    norm_v, norm_g = torch.nn.LayerNorm(channels), torch.nn.LayerNorm(channels, eps=1e-5)
    with torch.no_grad():
        for norm in (norm_v, norm_g):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    w_v, w_g = (torch.randn(n_out, channels).bfloat16() for _ in range(2))
    x_v = torch.randn(channels, rows).t() * 2 + 1  # [M, C] with channel-first strides
    x_g = None if same else torch.randn(rows, channels)
    mask = (torch.rand(rows) > 0.3).float()

    def reference(x, norm, w):
        return norm(x).bfloat16().float() @ w.float().t()

    gate = reference(x_v if same else x_g, norm_v if same else norm_g, w_g)
    expected = reference(x_v, norm_v, w_v) * torch.sigmoid(gate) * mask[:, None]
    assert norm_gate_ok(x_v, channels) and not norm_gate_ok(x_v, 24)
    with torch.no_grad():
        out = torch.empty(n_out, rows)  # channel-first output
        norm_gate(x_v, norm_v, w_v, w_g, out=out, x_g=x_g, norm_g=None if same else norm_g, mask=mask,
                  out_rows_first=False)
        torch.testing.assert_close(out.t(), expected, rtol=1e-4, atol=1e-4)
        base = torch.randn(rows, n_out)
        acc = base.clone()
        norm_gate(x_v, norm_v, w_v, w_g, out=acc, x_g=x_g, norm_g=None if same else norm_g, mask=mask,
                  accumulate=True)
        torch.testing.assert_close(acc, base + expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        norm_gate(x_v, norm_v, w_v.float(), w_g.float(), out=out, out_rows_first=False)


def test_norm_linear_matches_pytorch():
    """LayerNorm and one bfloat16 projection with float32 accumulation in one pass, as autocast computes
    ``Linear(LayerNorm(x))`` (LayerNorm in float32, rounded to bfloat16, products widened): rows read in place
    from an ending node's column chunk (two row dims), output written contiguous, heads-first through strides,
    and narrower than one output block; float32 weights as PyTorch's float32 Linear; bad weights and output
    strides refused."""
    from foldcp_hpc.kernels.norm_linear import norm_linear, norm_linear_ok

    torch.manual_seed(6)
    norm = torch.nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    z = torch.randn(1, 9, 11, 32) * 2 + 1
    w_wide, w_narrow = torch.randn(40, 32).bfloat16(), torch.randn(4, 32).bfloat16()

    def reference(x, w):
        return norm(x).bfloat16().float() @ w.float().t()

    assert norm_linear_ok(z) and not norm_linear_ok(z[..., :24])
    with torch.no_grad():
        chunk = z[:, :, 2:7].transpose(1, 2)  # [B,I,j,C] -> [B,j,I,C]: two row dims, read in place
        out = norm_linear(chunk, norm, w_wide)  # 40 outputs: a whole block of 16 and a partial one
        assert out.dtype == torch.bfloat16 and out.shape == (1, 5, 9, 40) and out.is_contiguous()
        expected = reference(chunk, w_wide)
        # bfloat16 output: at most one unit in the last place where float32 summation order moved a rounding
        assert ((out.float() - expected).abs() <= expected.abs() * 2**-7 + 1e-6).all()
        heads_first = torch.empty(1, 4, 9, 11)  # [B,H,I,J] float32, written from rows (i, j)
        norm_linear(z[0], norm, w_narrow, out=heads_first[0].permute(1, 2, 0))
        torch.testing.assert_close(heads_first, reference(z, w_narrow).permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)
        # float32 weights (the single track, autocast off): IEEE float32 products, nothing rounded
        single = norm_linear(z, norm, w_narrow.float())
        assert single.dtype == torch.float32
        torch.testing.assert_close(single, norm(z) @ w_narrow.float().t(), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
            norm_linear(z, norm, w_wide.double())
        with pytest.raises(ValueError, match="one row stride"):
            norm_linear(z, norm, w_narrow, out=torch.empty(1, 11, 9, 4).transpose(1, 2))


def test_swiglu_add_matches_pytorch():
    """The transition in one pass, in place: as PyTorch computes the same steps (LayerNorm in float32 rounded to
    bfloat16, fc1 and fc2 widened, silu(fc1) * fc2 in float32 rounded to bfloat16, fc3 widened), to float32
    rounding."""
    from foldcp_hpc.kernels.swiglu import swiglu_add, swiglu_ok

    torch.manual_seed(5)
    rows, channels, hidden = 37, 32, 128
    norm = torch.nn.LayerNorm(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    w1, w2 = (torch.randn(hidden, channels).bfloat16() for _ in range(2))
    w3 = (torch.randn(channels, hidden) / 8).bfloat16()
    x = torch.randn(rows, channels) * 2 + 1
    with torch.no_grad():
        xn = norm(x).bfloat16().float()
        a, b = xn @ w1.float().t(), xn @ w2.float().t()
        expected = x + (torch.nn.functional.silu(a) * b).bfloat16().float() @ w3.float().t()
        assert swiglu_ok(x, channels, hidden) and not swiglu_ok(x, channels, 96)
        out = x.clone()
        assert swiglu_add(out, norm, w1, w2, w3) is out
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
