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


def test_flash_triangle_attention_refuses_bad_shapes():
    from foldcp_hpc.kernels.triangle_attention import flash_triangle_attention

    q = torch.randn(2, 5, 2, 12)
    with pytest.raises(ValueError, match="power of two"):
        flash_triangle_attention(q, q, q, torch.zeros(1, 2, 5, 5), torch.zeros(2, 5), 1.0, 2)


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
