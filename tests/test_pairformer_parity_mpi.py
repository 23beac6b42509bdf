"""Context-parallel Pairformer layers against boltz 2.2.1's own modules, float64, forward and backward.

At 1, 4 and 9 ranks (p = 1, 2, 3) with N not divisible by p, some masked tokens, and every parameter
perturbed. The serial objective is sum(out * G); each rank's share is the sum over its tile (pair outputs)
or 1/P of it (replicated outputs), so summing every rank's gradients gives the serial gradients.
"""

from __future__ import annotations

import numpy
import pytest
import torch
from torch import nn

import foldcp_hpc.model as ours
from boltz_reference import float64_reference, perturb_, relative_error, shared_randn, token_mask
from conftest import everywhere

pytestmark = pytest.mark.mpi

N = 37  # not divisible by 2 or 3
N_FUSED = 19  # the fused kernels' tests (one rank): 361 pair rows, 22 whole blocks of 16 rows and a partial one
B = 1
C_Z = 8
C_S = 16
FORWARD_TOL = 1e-10
GRAD_TOL = 1e-8


def counted(monkeypatch, module, name: str) -> list:
    """``module.name`` wrapped for the test: returns a list that gains an entry per call (a kernel path taken)."""
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def build(ref_cls, our_cls, args, kwargs, grid, seed):
    """boltz's module with the same (perturbed) weights on every rank, and ours loaded from it strictly."""
    torch.manual_seed(seed)
    numpy.random.seed(seed)  # boltz's initialisers draw truncated normals from numpy's generator
    ref = perturb_(ref_cls(*args, **kwargs).double(), seed=seed)
    checksum = sum(float(p.detach().sum()) for p in ref.parameters())
    assert everywhere(grid, checksum == grid.comm.bcast(checksum, root=0)), "ranks built different weights"
    mine = our_cls(*args, **kwargs, grid=grid).double()
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), mine.eval()


def summed(grid, tensor, like=None):
    """Sum of a tensor over all ranks (each rank's gradient of its share of the objective); a missing gradient
    (a parameter that took no part, e.g. the template stack without templates) counts as zeros like ``like``."""
    from foldcp_hpc.distributed import collectives as raw

    if tensor is None:
        tensor = torch.zeros_like(like)
    return raw.all_reduce(tensor.contiguous(), grid, "grid", "sum")


def parameter_pairs(grid, ref, mine):
    """(summed gradient, boltz's gradient, tolerance) for every parameter boltz gave a gradient."""
    return {f"grad {name}": (summed(grid, p_mine.grad, p_mine), p_ref.grad, GRAD_TOL)
            for (name, p_ref), (_, p_mine) in zip(ref.named_parameters(), mine.named_parameters())
            if p_ref.grad is not None}


def compare(grid, pairs):
    """Relative errors, each against max|ref|; for gradients the denominator is floored at 1e-6 of the test's
    largest reference gradient, since some gradients are zero up to rounding (a bias added to every logit of
    a softmax has none: boltz's and ours then both hold ~1e-17 noise)."""
    pairs = {name: pair for name, pair in pairs.items() if pair[1].numel()}  # a tile may hold only padding
    largest = max((float(r.abs().max()) for name, (_, r, _) in pairs.items() if name.startswith("grad")), default=0.0)
    errors = {name: relative_error(o, r, floor=1e-6 * largest if name.startswith("grad") else 0.0)
              for name, (o, r, _) in pairs.items()}
    bad = {name: err for name, err in errors.items() if not err <= pairs[name][2]}
    assert everywhere(grid, not bad), f"rank {grid.rank}: {bad}"


def run_pair_layer(grid, ref, mine, call_ref, call_ours, seed, out_channels=C_Z, backward=True):
    """A layer mapping (z, pair_mask) -> a pair output; compares output, dz and every parameter gradient
    (``backward=False``: the forwards with and without autograd only)."""
    z = shared_randn(B, N, N, C_Z, seed=seed)
    mask = token_mask(B, N, seed + 1)
    pair_mask = mask[:, :, None] * mask[:, None, :]
    weight = shared_randn(B, N, N, out_channels, seed=seed + 2)

    z_ref = z.clone().requires_grad_(backward)
    with float64_reference():
        out_ref = call_ref(ref, z_ref, pair_mask)
    if backward:
        (out_ref * weight).sum().backward()

    z_mine = z.clone().requires_grad_(backward)
    tile = grid.scatter_pair(z_mine)
    out_tile = call_ours(mine, tile, grid.scatter_pair(pair_mask))
    if backward:
        (out_tile * grid.scatter_pair(weight)).sum().backward()

    with torch.no_grad():  # the inference path (in-place, preallocated chunks) must agree too
        out_inference = call_ours(mine, tile, grid.scatter_pair(pair_mask))
    pairs = {"forward": (grid.gather_pair(out_tile.detach(), N), out_ref.detach(), FORWARD_TOL),
             "forward without autograd": (grid.gather_pair(out_inference, N), out_ref.detach(), FORWARD_TOL)}
    if backward:
        pairs["grad z"] = (summed(grid, z_mine.grad, z_mine), z_ref.grad, GRAD_TOL)
        pairs.update(parameter_pairs(grid, ref, mine))
    compare(grid, pairs)


def test_triangle_multiplication_outgoing(grid):
    from boltz.model.layers.triangular_mult import TriangleMultiplicationOutgoing as Ref

    ref, mine = build(Ref, ours.TriangleMultiplicationOutgoing, (C_Z,), {}, grid, seed=1)
    run_pair_layer(grid, ref, mine, lambda m, z, pm: m(z, mask=pm), lambda m, z, pm: m(z, mask=pm), seed=10)


def test_triangle_multiplication_incoming(grid):
    from boltz.model.layers.triangular_mult import TriangleMultiplicationIncoming as Ref

    ref, mine = build(Ref, ours.TriangleMultiplicationIncoming, (C_Z,), {}, grid, seed=2)
    run_pair_layer(grid, ref, mine, lambda m, z, pm: m(z, mask=pm), lambda m, z, pm: m(z, mask=pm), seed=20)


@pytest.mark.parametrize("outgoing", [True, False])
def test_triangle_multiplication_fused(grid, outgoing, monkeypatch):
    """Under autocast, ``add_update``'s operands and output gate run as one fused kernel each (LayerNorm,
    projections, gates; Triton's interpreter on the CPU): equal to the unfused autocast path up to float32
    summation order and the odd LayerNorm output rounded to the other neighbouring bfloat16 (their statistics
    are summed in another order), and within bfloat16 rounding of boltz's module in float64."""
    import foldcp_hpc.model.triangular_mult as trimul
    from boltz.model.layers import triangular_mult as boltz_mult

    pytest.importorskip("triton")
    if grid.p > 1:  # keep the suite's time (22 s at 4 ranks): the operands' Cannon ring is the unfused path's
        pytest.skip("the fused kernels in Triton's interpreter run on one rank")
    name = "TriangleMultiplicationOutgoing" if outgoing else "TriangleMultiplicationIncoming"
    dim, n = 32, N_FUSED
    ref, mine = build(getattr(boltz_mult, name), getattr(ours, name), (dim,), {}, grid, seed=11 + outgoing)
    z = shared_randn(B, n, n, dim, seed=110)
    mask = token_mask(B, n, 111)
    pair_mask = mask[:, :, None] * mask[:, None, :]
    with float64_reference(), torch.no_grad():
        expected = z + ref(z, mask=pair_mask)
    mine = mine.float()
    calls = counted(monkeypatch, trimul, "norm_gate")
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("FOLDCP_TRITON", switch)
        tile = grid.scatter_pair(z.float()).contiguous()  # as the model's tiles (the kernel reads z as rows)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            results[switch] = grid.gather_pair(mine.add_update(tile, grid.scatter_pair(pair_mask.float())), n)
    assert calls, "the fused kernel was not used"
    keep = pair_mask[..., None]
    against_unfused = relative_error(results["1"].double() * keep, results["0"].double() * keep)
    against_boltz = relative_error(results["1"].double() * keep, expected * keep)
    assert everywhere(grid, against_unfused <= 1e-3 and against_boltz <= 2e-2), \
        f"rank {grid.rank}: {against_unfused:.2e} against the unfused path, {against_boltz:.2e} against boltz"


@pytest.mark.parametrize("chunk", [None, 2])
def test_triangle_attention_starting_node(grid, chunk):
    from boltz.model.layers.triangular_attention.attention import TriangleAttentionStartingNode as Ref

    ref, mine = build(Ref, ours.TriangleAttentionStartingNode, (C_Z, 4, 2), {"inf": 1e9}, grid, seed=3)
    run_pair_layer(grid, ref, mine, lambda m, z, pm: m(z, mask=pm, chunk_size=chunk),
                   lambda m, z, pm: m(z, mask=pm, chunk_size=chunk, n_tokens=N), seed=30)


def test_triangle_attention_ending_node(grid):
    from boltz.model.layers.triangular_attention.attention import TriangleAttentionEndingNode as Ref

    ref, mine = build(Ref, ours.TriangleAttentionEndingNode, (C_Z, 4, 2), {"inf": 1e9}, grid, seed=4)
    run_pair_layer(grid, ref, mine, lambda m, z, pm: m(z, mask=pm, chunk_size=3),
                   lambda m, z, pm: m(z, mask=pm, chunk_size=3, n_tokens=N), seed=40)


@pytest.mark.parametrize("starting", [True, False])
@pytest.mark.parametrize("kernel", [False, True])
def test_triangle_attention_in_place(grid, starting, kernel, monkeypatch):
    """``add_update`` (inference, into z's storage, no transposed copy) equals z + boltz's module: float64 on
    the PyTorch ring; float32 through the flash kernel (Triton's interpreter on the CPU; head width 16)."""
    from boltz.model.layers.triangular_attention import attention as boltz_attention

    if kernel:
        pytest.importorskip("triton")
        if grid.p > 2:  # keep the suite's time: the merge over ring steps is covered at p = 2
            pytest.skip("the kernel in Triton's interpreter runs at 1 and 4 ranks")
        monkeypatch.setenv("FOLDCP_TRITON", "1")  # conftest chose Triton's interpreter
    name = "TriangleAttentionStartingNode" if starting else "TriangleAttentionEndingNode"
    width, heads = (16, 2) if kernel else (4, 2)
    ref, mine = build(getattr(boltz_attention, name), getattr(ours, name), (C_Z, width, heads), {"inf": 1e9}, grid,
                      seed=5 + starting)
    z = shared_randn(B, N, N, C_Z, seed=50)
    mask = token_mask(B, N, 51)
    pair_mask = mask[:, :, None] * mask[:, None, :]
    with float64_reference(), torch.no_grad():
        expected = z + ref(z, mask=pair_mask, chunk_size=3)
    dtype = torch.float32 if kernel else torch.float64
    mine = mine.to(dtype)
    tile = grid.scatter_pair(z.to(dtype))
    with torch.no_grad():
        out = mine.add_update(tile, grid.scatter_pair(pair_mask.to(dtype)), chunk_size=3, n_tokens=N)
    assert everywhere(grid, out.data_ptr() == tile.data_ptr()), "the update was not added in place"
    # float32 cannot hold q.k beside the mask bias -1e9 (Boltz's float32 can't either): lines whose every key
    # is masked differ from float64 in any float32 path, so the kernel is compared where both tokens are real
    keep = pair_mask[..., None] if kernel else 1.0
    error = relative_error(grid.gather_pair(out, N).double() * keep, expected * keep)
    assert everywhere(grid, error <= (1e-5 if kernel else FORWARD_TOL)), f"rank {grid.rank}: error {error:.2e}"


def test_distogram_head(grid):
    from boltz.model.modules.trunkv2 import DistogramModule as Ref

    from foldcp_hpc.model.distogram import DistogramModule

    ref, mine = build(Ref, DistogramModule, (C_Z, 16), {}, grid, seed=11)
    call = lambda m, z, pm: m(z).flatten(-2)  # noqa: E731 - [B,I,J,D,bins] -> [B,I,J,D*bins]
    run_pair_layer(grid, ref, mine, call, call, seed=110, out_channels=16)


@pytest.mark.parametrize("with_templates", [True, False])
def test_template_module(grid, with_templates):
    from boltz.model.modules.trunkv2 import TemplateV2Module as Ref

    from foldcp_hpc.model.template import TemplateV2Module
    from test_features import synthetic_templates

    kwargs = {"template_dim": 6, "template_blocks": 1, "pairwise_head_width": 4, "pairwise_num_heads": 2}
    ref, mine = build(Ref, TemplateV2Module, (C_Z,), kwargs, grid, seed=12)
    template = {k: v.double() if v.is_floating_point() else v for k, v in synthetic_templates(N, 2, seed=3).items()}
    if not with_templates:
        template["template_mask"] = torch.zeros_like(template["template_mask"])
    batched = {k: v[None] for k, v in template.items()}
    run_pair_layer(grid, ref, mine, lambda m, z, pm: m(z, batched, pm),
                   lambda m, z, pm: m(z, template, pm, n_tokens=N), seed=120)


def test_transition_on_tiles(grid):
    from boltz.model.layers.transition import Transition as Ref

    ref, mine = build(Ref, lambda *a, grid: ours.Transition(*a), (C_Z, 4 * C_Z), {}, grid, seed=5)
    run_pair_layer(grid, ref, mine, lambda m, z, pm: m(z), lambda m, z, pm: m(z), seed=50)


def _triangle_attention_case(grid, starting: bool, seed: int):
    """boltz's triangle attention and ours (float32) with the same weights, z [B, N_FUSED, N_FUSED, 16], a pair
    mask with masked tokens, and z + boltz's module in float64: (ours, z, pair_mask, expected)."""
    from boltz.model.layers.triangular_attention import attention as boltz_attention

    name = "TriangleAttentionStartingNode" if starting else "TriangleAttentionEndingNode"
    dim, n = 16, N_FUSED
    ref, mine = build(getattr(boltz_attention, name), getattr(ours, name), (dim, 16, 2), {"inf": 1e9}, grid,
                      seed=seed + starting)
    z = shared_randn(B, n, n, dim, seed=10 * seed)
    mask = token_mask(B, n, 10 * seed + 1)
    pair_mask = mask[:, :, None] * mask[:, None, :]
    with float64_reference(), torch.no_grad():
        expected = z + ref(z, mask=pair_mask, chunk_size=4)
    return mine.float(), z, pair_mask, expected


@pytest.mark.parametrize("starting", [True, False])
def test_triangle_attention_fused_projections(grid, starting, monkeypatch):
    """Under autocast, ``add_update`` normalises and projects each chunk's rows (q, k, v, gate) and the triangle
    bias in one kernel pass (Triton's interpreter on the CPU; the ending node's column chunks read in place):
    equal to the LayerNorm-then-Linear path into the same flash kernel up to bfloat16 roundings moved by float32
    summation order, and within bfloat16 rounding of boltz's module in float64."""
    import foldcp_hpc.model.triangular_attention as tri_att

    pytest.importorskip("triton")
    if grid.p > 1:  # the projections are tile-local; the ring of keys is covered by the tests above
        pytest.skip("the fused kernels in Triton's interpreter run on one rank")
    monkeypatch.setenv("FOLDCP_TRITON", "1")  # conftest chose Triton's interpreter
    n = N_FUSED
    mine, z, pair_mask, expected = _triangle_attention_case(grid, starting, seed=12)
    calls = counted(monkeypatch, tri_att, "norm_linear")
    attend = tri_att.flash.flash_triangle_attention
    biases = []
    monkeypatch.setattr(tri_att.flash, "flash_triangle_attention",
                        lambda q, k, v, bias, *a, **kw: biases.append(bias.dtype) or attend(q, k, v, bias, *a, **kw))
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(tri_att, "norm_linear_ok", lambda x, fused=fused: fused)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            results[fused] = mine.add_update(z.float().contiguous(), pair_mask.float(), chunk_size=4, n_tokens=n)
    assert len(calls) > 2, "the fused kernel was not used for the bias and the chunks"
    # the triangle bias reaches the kernel unrounded (its fold shifts it and rounds it once), either way
    assert biases and set(biases) == {torch.float32}, biases
    keep = pair_mask[..., None]  # the updates compared (z itself would hide them)
    update, unfused = ((results[fused].double() - z) * keep for fused in (True, False))
    boltz_update = (expected - z) * keep
    errors = (relative_error(update, unfused), relative_error(update, boltz_update),
              relative_error(unfused, boltz_update))
    # a bfloat16 rounding of q, k or v moved by the summation order moves a sharp softmax: ~6e-4 here; both
    # paths are ~7e-3 from boltz in float64 (bfloat16 projections)
    assert errors[0] <= 5e-3 and errors[1] <= 2e-2 and errors[1] <= 1.1 * errors[2], errors


@pytest.mark.parametrize("starting", [True, False])
def test_triangle_attention_output_accumulates_in_float32(grid, starting, monkeypatch):
    """float32 z under bfloat16 autocast: the output projection's GEMM takes bfloat16 operands and adds its float32
    product into z's storage (``baddbmm(out_dtype=float32)``, CUDA only: emulated here with its documented
    semantics, so what is checked is the routing and the writes through z's row or column views). It equals the
    path that makes the bfloat16 update and adds it, up to that update's rounding, and boltz's module in float64
    to bfloat16 rounding."""
    import foldcp_hpc.model.triangular_attention as tri_att

    if grid.p > 1:  # the projection is tile-local
        pytest.skip("the output projection is checked on one rank")
    monkeypatch.setenv("FOLDCP_TRITON", "0")
    n = N_FUSED
    mine, z, pair_mask, expected = _triangle_attention_case(grid, starting, seed=14)
    real = torch.baddbmm
    calls = []

    def baddbmm(input, batch1, batch2, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real(input, batch1, batch2, out=out)
        calls.append((batch1.dtype, batch2.dtype, out_dtype, out.data_ptr() == input.data_ptr()))
        return out.copy_(input + torch.bmm(batch1.float(), batch2.float()))  # float32 product, one rounding

    monkeypatch.setattr(torch, "baddbmm", baddbmm)
    results = {}
    for widen in (True, False):
        monkeypatch.setattr(tri_att, "accumulates_in_float32", lambda z, low, o, widen=widen: widen and
                            z.dtype == torch.float32 and low == torch.bfloat16)
        tile = z.float().contiguous()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            results[widen] = mine.add_update(tile, pair_mask.float(), chunk_size=4, n_tokens=n)
        assert results[widen].data_ptr() == tile.data_ptr()
    assert calls and set(calls) == {(torch.bfloat16, torch.bfloat16, torch.float32, True)}, calls[:3]
    keep = pair_mask[..., None]
    update, unwidened = ((results[widen].double() - z) * keep for widen in (True, False))
    boltz_update = (expected - z) * keep
    errors = (relative_error(update, unwidened), relative_error(update, boltz_update),
              relative_error(unwidened, boltz_update))
    # the two differ by the bfloat16 rounding of the update (~2e-3), both ~1e-2 from float64
    assert 0 < errors[0] <= 5e-3 and errors[1] <= 1.05 * errors[2] and errors[2] <= 2e-2, errors


@pytest.mark.parametrize("autocast", [False, True])
def test_single_track_fused_pair_bias(grid, autocast, monkeypatch):
    """Without autograd the single track's pair bias is made in one kernel pass straight into its heads-first
    layout (Triton's interpreter on the CPU): in float32 with autocast off (as Boltz's layer runs it) equal to
    the LayerNorm-then-Linear path to float32 rounding; under autocast up to bfloat16 roundings moved by float32
    summation order."""
    import foldcp_hpc.model.attention as single
    from boltz.model.layers.attentionv2 import AttentionPairBias as Ref

    pytest.importorskip("triton")
    if grid.p > 1:  # tile-local
        pytest.skip("the fused kernel in Triton's interpreter runs on one rank")
    ref, mine = build(Ref, ours.AttentionPairBias, (C_S, 16, 4), {}, grid, seed=13)
    z = shared_randn(B, N_FUSED, N_FUSED, 16, seed=130)
    mine = mine.float()
    calls = counted(monkeypatch, single, "norm_linear")
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("FOLDCP_TRITON", switch)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results[switch] = mine._pair_bias(z.float())
    assert calls, "the fused kernel was not used"
    assert results["1"].shape == results["0"].shape == (B, 4, N_FUSED, N_FUSED)
    assert results["1"].dtype == results["0"].dtype == (torch.bfloat16 if autocast else torch.float32)
    with float64_reference():
        expected = ref.proj_z(z)
    # autocast: one bfloat16 unit at most; float32: summation order
    assert relative_error(results["1"].double(), results["0"].double()) <= (4e-3 if autocast else 1e-6)
    assert relative_error(results["1"].double(), expected) <= (2e-2 if autocast else 1e-6)


def test_transition_fused(grid, monkeypatch):
    """Under autocast, ``add_update`` runs the whole transition as one kernel (Triton's interpreter on the CPU),
    which keeps fc1 and fc2 in float32: its error against boltz's module in float64 is within bfloat16 rounding
    and no larger than the unfused autocast path's."""
    import foldcp_hpc.model.transition as transition
    from boltz.model.layers.transition import Transition as Ref

    pytest.importorskip("triton")
    if grid.p > 1:  # the transition is tile-local: one rank covers it
        pytest.skip("the fused kernel in Triton's interpreter runs on one rank")
    dim = 32
    ref, mine = build(Ref, lambda *a, grid: ours.Transition(*a), (dim, 4 * dim), {}, grid, seed=6)
    z = shared_randn(B, N_FUSED, N_FUSED, dim, seed=60)
    with float64_reference(), torch.no_grad():
        expected = z + ref(z)
    mine = mine.float()
    calls = counted(monkeypatch, transition, "swiglu_add")
    errors = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("FOLDCP_TRITON", switch)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = mine.add_update(z.float().contiguous())
        errors[switch] = relative_error(out.double(), expected)
    assert calls, "the fused kernel was not used"
    assert errors["1"] <= 2e-2 and errors["1"] <= 1.1 * errors["0"], errors


@pytest.mark.parametrize("tell_n", [True, False])
def test_pairformer_noseq_module(grid, tell_n):
    """With n_tokens given, or taken from what grid.scatter_pair recorded (boltz's own forward arguments; the
    forwards only: the backward is autograd's through the same operations)."""
    from boltz.model.layers.pairformer import PairformerNoSeqModule as Ref

    ref, mine = build(Ref, ours.PairformerNoSeqModule, (C_Z, 2), {"pairwise_head_width": 4, "pairwise_num_heads": 2},
                      grid, seed=6)
    extra = {"n_tokens": N} if tell_n else {}
    run_pair_layer(grid, ref, mine, lambda m, z, pm: m(z, pm), lambda m, z, pm: m(z, pm, **extra), seed=60,
                   backward=tell_n)


def run_single_track(grid, ref, mine, call, seed, rng_seed=None):
    """Layers with (s, z, mask) inputs; s replicated, z tiled. Compares s, z, ds, dz and parameter gradients."""
    s = shared_randn(B, N, C_S, seed=seed)
    z = shared_randn(B, N, N, C_Z, seed=seed + 1)
    mask = token_mask(B, N, seed + 2)
    pair_mask = mask[:, :, None] * mask[:, None, :]
    w_s = shared_randn(B, N, C_S, seed=seed + 3)
    w_z = shared_randn(B, N, N, C_Z, seed=seed + 4)

    s_ref, z_ref = s.clone().requires_grad_(), z.clone().requires_grad_()
    if rng_seed is not None:  # dropout: both draw their masks from the global generator in the same order
        torch.manual_seed(rng_seed)
    with float64_reference():
        out_s_ref, out_z_ref = call(ref, s_ref, z_ref, mask, pair_mask)
    loss = (out_s_ref * w_s).sum() + (0 if out_z_ref is None else (out_z_ref * w_z).sum())
    loss.backward()

    s_mine, z_mine = s.clone().requires_grad_(), z.clone().requires_grad_()
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    out_s, out_z = call(mine, s_mine, grid.scatter_pair(z_mine), mask, grid.scatter_pair(pair_mask))
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    with torch.no_grad():  # the inference path (in-place, preallocated chunks) must agree too
        inf_s, inf_z = call(mine, s, grid.scatter_pair(z), mask, grid.scatter_pair(pair_mask))
    share = (out_s * w_s).sum() / grid.world_size
    if out_z is not None:
        share = share + (out_z * grid.scatter_pair(w_z)).sum()
    share.backward()

    pairs = {"forward s": (out_s.detach(), out_s_ref.detach(), FORWARD_TOL),
             "forward s without autograd": (inf_s, out_s_ref.detach(), FORWARD_TOL),
             "grad s": (summed(grid, s_mine.grad), s_ref.grad, GRAD_TOL),
             "grad z": (summed(grid, z_mine.grad, z_mine), z_ref.grad, GRAD_TOL)}
    if out_z is not None:
        pairs["forward z"] = (grid.gather_pair(out_z.detach(), N), out_z_ref.detach(), FORWARD_TOL)
        pairs["forward z without autograd"] = (grid.gather_pair(inf_z, N), out_z_ref.detach(), FORWARD_TOL)
    pairs.update(parameter_pairs(grid, ref, mine))
    # every rank must hold the same s
    from foldcp_hpc.distributed import collectives as raw

    first = raw.broadcast(out_s.detach().contiguous(), grid, "grid", src=0)
    assert everywhere(grid, torch.equal(first, out_s.detach())), "s differs between ranks"
    compare(grid, pairs)


def test_attention_pair_bias(grid):
    from boltz.model.layers.attentionv2 import AttentionPairBias as Ref

    ref, mine = build(Ref, ours.AttentionPairBias, (C_S, C_Z, 4), {}, grid, seed=7)
    run_single_track(grid, ref, mine, lambda m, s, z, mask, pm: (m(s=s, z=z, mask=mask, k_in=s), None), seed=70)


@pytest.mark.parametrize("precomputed", [False, True])
def test_attention_pair_bias_kernel(grid, precomputed, monkeypatch):
    """Inference through the flash kernel (Triton's interpreter on the CPU), float32, against boltz's module in
    float64: the Pairformer's single track (bias projected from z; head width 24) and the token transformer's
    (a precomputed bias tile, 2 samples sharing it; head width 12). At p = 2 the rows' partial softmaxes merge."""
    from boltz.model.layers.attentionv2 import AttentionPairBias as Ref

    from foldcp_hpc.kernels import triangle_attention as flash

    pytest.importorskip("triton")
    if grid.p > 2:  # keep the suite's time: the merge along grid rows is covered at p = 2
        pytest.skip("the kernel in Triton's interpreter runs at 1 and 4 ranks")
    monkeypatch.setenv("FOLDCP_TRITON", "1")  # conftest chose Triton's interpreter
    calls = counted(monkeypatch, flash, "flash_triangle_attention")
    c_s, heads, samples = (48, 4, 2) if precomputed else (48, 2, 1)
    c_z = heads if precomputed else C_Z
    ref, mine = build(Ref, ours.AttentionPairBias, (c_s, None if precomputed else c_z, heads),
                      {"compute_pair_bias": not precomputed}, grid, seed=8 + precomputed)
    s = shared_randn(B * samples, N, c_s, seed=80)
    z = shared_randn(B, N, N, c_z, seed=81)
    mask = token_mask(B, N, 82).repeat_interleave(samples, 0)
    with float64_reference(), torch.no_grad():
        expected = ref(s=s, z=z, mask=mask, k_in=s, multiplicity=samples)
    mine = mine.float()
    with torch.no_grad():
        out = mine(s=s.float(), z=grid.scatter_pair(z.float()), mask=mask.float(), k_in=s.float(),
                   multiplicity=samples)
    assert calls, "the kernel was not used"
    error = relative_error(out.double(), expected)
    assert everywhere(grid, error <= 1e-5), f"rank {grid.rank}: error {error:.2e}"


@pytest.mark.parametrize("blocks", [2])
def test_pairformer_module(grid, blocks):
    from boltz.model.layers.pairformer import PairformerModule as Ref

    kwargs = {"num_heads": 4, "pairwise_head_width": 4, "pairwise_num_heads": 2, "v2": True}
    ref, mine = build(Ref, ours.PairformerModule, (C_S, C_Z, blocks), kwargs, grid, seed=8)
    run_single_track(grid, ref, mine, lambda m, s, z, mask, pm: m(s, z, mask, pm), seed=80)


def test_pairformer_module_training_with_dropout(grid):
    """Training mode: Boltz's row- and column-wise dropout masks, drawn for all N and sliced to the tiles."""
    from boltz.model.layers.pairformer import PairformerModule as Ref

    kwargs = {"num_heads": 4, "pairwise_head_width": 4, "pairwise_num_heads": 2, "v2": True, "dropout": 0.25}
    ref, mine = build(Ref, ours.PairformerModule, (C_S, C_Z, 1), kwargs, grid, seed=9)
    ref.train(), mine.train()
    run_single_track(grid, ref, mine, lambda m, s, z, mask, pm: m(s, z, mask, pm), seed=90, rng_seed=1234)


def test_state_dict_names_match_boltz(grid):
    from boltz.model.layers.pairformer import PairformerModule as Ref

    ref = Ref(C_S, C_Z, 1, num_heads=4, v2=True)
    mine = ours.PairformerModule(C_S, C_Z, 1, num_heads=4, grid=grid)
    assert list(ref.state_dict()) == list(mine.state_dict())
    assert isinstance(mine.layers[0].s_post_norm, nn.Identity)
