"""The warp-specialised Gluon first launch (:mod:`foldcp_hpc.kernels.flash_ws`) on a Hopper GPU.

CI has no GPU: these run on the H100 with Triton compiling (``TRITON_INTERPRET=0 pytest
tests/test_flash_ws_gpu.py``: conftest otherwise chooses Triton's CPU interpreter); on the CPU the routing is
checked by ``test_kernels.py`` and the kernel's machine code by ``test_kernel_codegen.py``. Against float64 and
against the Triton kernel's fixed-shift launch (``FOLDCP_WS=0``): batch entries whose rows are not a multiple of
three, queries and keys ending in partial blocks, rows with a key mask of their own, a gate, and queries whose
weights overflow the fixed shift (redone by the second launch).
"""

from __future__ import annotations

import os

import pytest
import torch

ws_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0)
                            or os.environ.get("TRITON_INTERPRET") == "1",
                            reason="needs a Hopper (sm_90) GPU and Triton compiling (TRITON_INTERPRET=0)")


def _case(seed: int, batch: int, rows: int, n_j: int, n_k: int, heads: int = 4, width: int = 32):
    """q, k, v, gate as views of one [R, L, 4 H D] projection (as the model makes them), bias, mask_bias."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = torch.device("cuda")
    qg = torch.randn(batch * rows, n_j, 2 * heads * width, device=dev, generator=gen).bfloat16()
    kv = torch.randn(batch * rows, n_k, 2 * heads * width, device=dev, generator=gen).bfloat16()
    q, gate = (t.unflatten(-1, (heads, width)) for t in qg.split(heads * width, -1))
    k, v = (t.unflatten(-1, (heads, width)) for t in kv.split(heads * width, -1))
    bias = 2 * torch.randn(batch, heads, n_j, n_k, device=dev, generator=gen)
    mask_bias = torch.zeros(batch * rows, n_k, device=dev)
    mask_bias[:, 5] = -1e9  # masked for every row: folded into the bias
    mask_bias[rows:, n_k - 7:] = -1e9  # the second entry's padding
    mask_bias[rows + 4, 11] = -1e9  # a row with a key mask of its own (the second launch)
    return q, k, v, gate, bias, mask_bias, width ** -0.5, rows


def _reference(q, k, v, bias, mask_bias, scale, rows, gate=None):
    q, k, v, bias, mask_bias = (t.double() for t in (q, k, v, bias, mask_bias))
    logits = torch.einsum("rjhd,rkhd->rhjk", q, k) * scale + bias.repeat_interleave(rows, 0) \
        + mask_bias[:, None, None, :]
    out = torch.einsum("rhjk,rkhd->rjhd", logits.softmax(-1), v)
    if gate is not None:
        out = out * torch.sigmoid(gate.double())
    return out, logits.logsumexp(-1)


@ws_gpu
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n_j, n_k", [(200, 200), (128, 256), (77, 130)])
def test_ws_launch_matches_float64_and_the_triton_kernel(monkeypatch, gated, n_j, n_k):
    from foldcp_hpc.kernels import triangle_attention as ta

    q, k, v, gate, bias, mask_bias, scale, rows = _case(1, batch=2, rows=40, n_j=n_j, n_k=n_k)
    gate = gate if gated else None
    used = []
    wanted = ta.ws_wanted
    monkeypatch.setattr(ta, "ws_wanted", lambda *a: used.append(wanted(*a)) or used[-1])
    out, lse = ta.flash_triangle_attention(q, k, v, bias, mask_bias, scale, rows, gate=gate, fold_cache={})
    assert used == [True]
    monkeypatch.setenv("FOLDCP_WS", "0")
    out_t, lse_t = ta.flash_triangle_attention(q, k, v, bias, mask_bias, scale, rows, gate=gate, fold_cache={})
    assert used == [True, False]
    expected, expected_lse = _reference(q, k, v, bias, mask_bias, scale, rows, gate)
    error = (out.double() - expected).abs().max().item()
    error_t = (out_t.double() - expected).abs().max().item()
    assert error < 2e-2 and error <= 1.5 * error_t + 1e-3, (error, error_t)
    assert (lse.double() - expected_lse).abs().max().item() < 1e-2
    # the same products and roundings in another order: close to the Triton kernel's
    assert (out.float() - out_t.float()).abs().max().item() < 1e-2
    assert (lse - lse_t).abs().max().item() < 1e-3


@ws_gpu
def test_ws_launch_marks_overflowing_queries_for_the_second_launch():
    """Queries whose weights overflow the fixed shift get lse NaN from the Gluon kernel and are redone."""
    from foldcp_hpc.kernels import triangle_attention as ta

    q, k, v, _, bias, mask_bias, scale, rows = _case(2, batch=2, rows=40, n_j=130, n_k=200)
    hot = [4, rows + 11]
    q = q.clone()
    q[hot] = (q[hot].float() * 400).bfloat16()
    out, lse = ta.flash_triangle_attention(q, k, v, bias, mask_bias, scale, rows, fold_cache={})
    assert torch.isfinite(lse).all() and torch.isfinite(out.float()).all()
    expected, _ = _reference(q, k, v, bias, mask_bias, scale, rows)
    assert (out.double() - expected).abs().max().item() < 2e-2
