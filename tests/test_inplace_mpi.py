"""The in-place inference paths (``add_update``) of the triangle multiplication and the transition.

At 1, 4 and 9 ranks (p = 1, 2, 3) with N not divisible by p, some masked tokens and every parameter perturbed:
in float64, ``add_update(z)`` equals ``z + module(z)`` on the tile and boltz 2.2.1's ``z + module(z)`` on the
gathered tensor, and returns z's own storage. In bfloat16 (z stored in it, the fast path) the triangle product
is contracted in bfloat16 and stays within a stated tolerance of the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

import foldcp_hpc.model as ours
import foldcp_hpc.model.triangular_mult as triangular_mult
from boltz_reference import float64_reference, relative_error, shared_randn, token_mask
from conftest import everywhere
from test_pairformer_parity_mpi import build

pytestmark = pytest.mark.mpi

N = 37  # not divisible by 2 or 3
B = 1
C_Z = 8
EXACT_TOL = 1e-12  # float64: the same operations as z + module(z), chunked differently
# bfloat16 z: relative Frobenius error of z + update against float64, and of the update alone (which carries the
# product's bfloat16 rounding without z's to hide it)
BF16_TOL = 1e-2
BF16_UPDATE_TOL = 2e-2
UPDATE_SCALE = 40.0

TRIANGLE_MULTIPLICATIONS = {
    "outgoing": ("TriangleMultiplicationOutgoing", ours.TriangleMultiplicationOutgoing, 1),
    "incoming": ("TriangleMultiplicationIncoming", ours.TriangleMultiplicationIncoming, 2),
}


def pair_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z: [B, N, N, C_Z] and the pair mask [B, N, N] of some masked tokens, float64, the same on every rank."""
    mask = token_mask(B, N, seed + 1)
    return shared_randn(B, N, N, C_Z, seed=seed), mask[:, :, None] * mask[:, None, :]


def build_triangle_multiplication(grid, direction: str):
    from boltz.model.layers import triangular_mult as boltz_triangular_mult

    name, cls, seed = TRIANGLE_MULTIPLICATIONS[direction]
    return build(getattr(boltz_triangular_mult, name), cls, (C_Z,), {}, grid, seed=seed)


def frobenius_error(ours_: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours_.double() - ref).norm() / ref.norm())


def check_in_place(grid, ref, mine, call_ref, call_ours, add_update, seed):
    """add_update on the tile against z + module(z) on the tile (ours) and on the whole tensor (boltz's)."""
    z, pair_mask = pair_inputs(seed)
    with torch.no_grad(), float64_reference():
        expected = z + call_ref(ref, z, pair_mask)
    tile, mask_tile = grid.scatter_pair(z).clone(), grid.scatter_pair(pair_mask)
    with torch.no_grad():
        tile_expected = tile + call_ours(mine, tile, mask_tile)
        storage = tile.data_ptr()
        out = add_update(mine, tile, mask_tile)
    errors = {"against z + module(z)": relative_error(out, tile_expected),
              "against boltz": relative_error(grid.gather_pair(out, N), expected)}
    bad = {name: err for name, err in errors.items() if not err <= EXACT_TOL}
    assert everywhere(grid, not bad), f"rank {grid.rank}: {bad}"
    assert everywhere(grid, out.data_ptr() == storage), f"rank {grid.rank}: add_update returned new storage"


@pytest.mark.parametrize("direction", ["outgoing", "incoming"])
def test_triangle_multiplication_add_update(grid, direction):
    ref, mine = build_triangle_multiplication(grid, direction)
    check_in_place(grid, ref, mine, lambda m, z, pm: m(z, mask=pm), lambda m, z, pm: m(z, mask=pm),
                   lambda m, z, pm: m.add_update(z, pm), seed=10 * TRIANGLE_MULTIPLICATIONS[direction][2])


@pytest.mark.parametrize("chunk", [None, 8])
def test_transition_add_update(grid, chunk):
    from boltz.model.layers.transition import Transition as Ref

    ref, mine = build(Ref, lambda *a, grid: ours.Transition(*a), (C_Z, 4 * C_Z), {}, grid, seed=5)
    check_in_place(grid, ref, mine, lambda m, z, pm: m(z, chunk_size=chunk), lambda m, z, pm: m(z, chunk),
                   lambda m, z, pm: m.add_update(z, chunk), seed=50)


def test_add_update_refuses_autograd(grid):
    """With autograd on, parameters requiring grad (or z requiring it) make add_update refuse; off, it runs."""
    _, mine = build_triangle_multiplication(grid, "outgoing")
    transition = ours.Transition(C_Z, 4 * C_Z).double()
    z, pair_mask = pair_inputs(seed=60)
    tile, mask_tile = grid.scatter_pair(z).clone(), grid.scatter_pair(pair_mask)
    for module, call in ((mine, lambda t: mine.add_update(t, mask_tile)), (transition, transition.add_update)):
        with pytest.raises(ValueError, match="autograd is on"):
            call(tile)
        module.requires_grad_(False)
        with pytest.raises(ValueError, match="the input"):
            call(tile.clone().requires_grad_())
        call(tile)


@pytest.mark.parametrize("direction", ["outgoing", "incoming"])
@pytest.mark.parametrize("params", ["float32 under autocast", "bfloat16"])
def test_triangle_multiplication_bfloat16(grid, monkeypatch, direction, params):
    """z stored in bfloat16: a, b and the product in bfloat16 (one GEMM dtype), close to float64.

    "float32 under autocast" is Boltz's mixed precision (float32 parameters, autocast to bfloat16); "bfloat16"
    is a module cast to bfloat16 without autocast. Both forward and add_update are checked (at 1 and 4 ranks:
    the suite's time; the contraction's ring is the float64 tests' at 9).
    """
    if grid.p > 2:
        pytest.skip("the bfloat16 contraction is checked at 1 and 4 ranks")
    ref, mine64 = build_triangle_multiplication(grid, direction)
    with torch.no_grad():  # an update about as large as z (3% of it as built), so that its own error shows
        ref.p_out.weight.mul_(UPDATE_SCALE)
    mine = type(mine64)(C_Z, grid=grid).eval()
    mine.load_state_dict(ref.state_dict())
    if params == "bfloat16":
        mine = mine.to(torch.bfloat16)
    z, pair_mask = pair_inputs(seed=70)
    with torch.no_grad(), float64_reference():
        update_ref = ref(z, mask=pair_mask)
    z_low = z.to(torch.bfloat16)
    tile = grid.scatter_pair(z_low)
    mask_tile = grid.scatter_pair(pair_mask).float()

    contracted = []
    contract = triangular_mult.tile_matmul

    def recording(a, b, grid_):
        contracted.append((a.dtype, b.dtype))
        return contract(a, b, grid_)

    monkeypatch.setattr(triangular_mult, "tile_matmul", recording)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=params != "bfloat16")
    with torch.no_grad(), autocast:
        update = mine(tile, mask_tile)
        out = mine.add_update(tile.clone(), mask_tile)
    expected = z + update_ref
    z_stored = z_low.double()  # the update is measured from the z the module saw
    errors = {"forward update": frobenius_error(grid.gather_pair(update, N), update_ref),
              "add_update": frobenius_error(grid.gather_pair(out, N), expected),
              "add_update's update": frobenius_error(grid.gather_pair(out, N).double() - z_stored, update_ref)}
    tolerances = {"forward update": BF16_UPDATE_TOL, "add_update": BF16_TOL, "add_update's update": BF16_UPDATE_TOL}
    bad = {name: err for name, err in errors.items() if not err <= tolerances[name]}
    dtypes = {dtype for pair in contracted for dtype in pair} | {update.dtype, out.dtype}
    assert everywhere(grid, not bad), f"rank {grid.rank}: {bad}"
    # on one rank add_update's GEMM writes straight into the product (no tile_matmul call)
    assert everywhere(grid, len(contracted) >= 1 and dtypes == {torch.bfloat16}), f"rank {grid.rank}: {dtypes}"


def test_float32_contraction_under_autocast(grid, monkeypatch):
    """float32 z under bfloat16 autocast (Boltz's mixed precision) still contracts in float32, on one rank too."""
    _, mine64 = build_triangle_multiplication(grid, "outgoing")
    mine = type(mine64)(C_Z, grid=grid).eval()
    mine.load_state_dict(mine64.state_dict())
    z, pair_mask = pair_inputs(seed=80)
    tile, mask_tile = grid.scatter_pair(z.float()), grid.scatter_pair(pair_mask).float()
    products = []
    matmul = torch.matmul

    def recording(a, b, *args, **kwargs):
        out = matmul(a, b, *args, **kwargs)
        products.append(out.dtype)
        return out

    monkeypatch.setattr(torch, "matmul", recording)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        update = mine(tile, mask_tile)
    monkeypatch.undo()
    assert everywhere(grid, update.dtype == torch.bfloat16 and set(products) == {torch.float32}), \
        f"rank {grid.rank}: update {update.dtype}, products {products}"


@pytest.mark.parametrize("direction", ["outgoing", "incoming"])
def test_add_update_under_autocast_rings_bfloat16_operands(grid, monkeypatch, direction):
    """float32 z under bfloat16 autocast (Boltz's bf16-mixed), in place: a and b stay bfloat16 (they hold
    bfloat16 values already) and travel the Cannon ring so, and the product accumulates in float32 (across the
    ring's steps too) and is stored rounded once to bfloat16. That is Boltz's float32 einsum of the same values,
    summed in another order and rounded once: the update equals boltz's module under autocast on the whole
    tensor up to that rounding and the roundings of its bfloat16 output projection."""
    from boltz.model.layers import triangular_mult as boltz_triangular_mult

    name, _, _ = TRIANGLE_MULTIPLICATIONS[direction]
    ref64, mine64 = build_triangle_multiplication(grid, direction)
    ref = getattr(boltz_triangular_mult, name)(C_Z).eval()
    ref.load_state_dict(ref64.state_dict())
    mine = type(mine64)(C_Z, grid=grid).eval()
    mine.load_state_dict(mine64.state_dict())
    z, pair_mask = pair_inputs(seed=90)
    z, pair_mask = z.float(), pair_mask.float()
    operands = []
    contract = type(mine)._contract

    def recording(self, a, b, out=None, sum_dtype=None):
        operands.append((a.dtype, b.dtype, None if out is None else out.dtype, sum_dtype))
        return contract(self, a, b, out=out, sum_dtype=sum_dtype)

    monkeypatch.setattr(type(mine), "_contract", recording)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(z, pair_mask).float()
        tile = grid.scatter_pair(z).clone()
        out = mine.add_update(tile, grid.scatter_pair(pair_mask))
    monkeypatch.undo()
    update = grid.gather_pair(out - grid.scatter_pair(z), N)
    error = frobenius_error(update, expected.double())
    # both round the same float32 sums to bfloat16 in their projections (one bfloat16 ulp is 3.9e-3 relative),
    # from sums taken in another order: measured 3.4e-3 / 2.9e-3 at 4 ranks
    assert everywhere(grid, error < 8e-3), f"rank {grid.rank}: update error {error:.2e} against boltz under autocast"
    wanted = {(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32)}
    assert everywhere(grid, operands and set(operands) == wanted), f"rank {grid.rank}: {set(operands)}"


@pytest.mark.parametrize("starting", [True, False])
def test_triangle_attention_bfloat16_adds_its_output_in_one_gemm(grid, monkeypatch, starting):
    """z stored in bfloat16 under autocast: each chunk's output projection is added into z's storage by one GEMM
    (``baddbmm_``, beta = 1: no update tensor; the ending node's columns a strided batch), close to float64.

    At 1 and 4 ranks (the suite's time; the float64 in-place tests cover the rings at 9).
    """
    from boltz.model.layers.triangular_attention import attention as boltz_attention

    if grid.p > 2:
        pytest.skip("the bfloat16 output GEMM is checked at 1 and 4 ranks")
    name = "TriangleAttentionStartingNode" if starting else "TriangleAttentionEndingNode"
    ref, mine64 = build(getattr(boltz_attention, name), getattr(ours, name), (C_Z, 4, 2), {"inf": 1e9}, grid,
                        seed=9 + starting)
    with torch.no_grad():  # an update about as large as z, so that its own error shows
        ref.mha.linear_o.weight.mul_(UPDATE_SCALE)
    mine = type(mine64)(C_Z, 4, 2, inf=1e9, grid=grid).eval()  # float32 parameters, as under Boltz's autocast
    mine.load_state_dict(ref.state_dict())
    z, pair_mask = pair_inputs(seed=90)
    with torch.no_grad(), float64_reference():
        expected = z + ref(z, mask=pair_mask, chunk_size=3)
    tile, mask_tile = grid.scatter_pair(z.to(torch.bfloat16)), grid.scatter_pair(pair_mask).float()
    targets = []
    gemm = torch.Tensor.baddbmm_
    monkeypatch.setattr(torch.Tensor, "baddbmm_", lambda t, *a, **k: targets.append(t.dtype) or gemm(t, *a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        storage = tile.data_ptr()
        out = mine.add_update(tile, mask_tile, chunk_size=3, n_tokens=N)
    keep = pair_mask[..., None]  # lines whose every key is masked differ in any float32 path (see the parity test)
    error = frobenius_error(grid.gather_pair(out, N).double() * keep, expected * keep)
    assert everywhere(grid, out.data_ptr() == storage and targets and set(targets) == {torch.bfloat16}), \
        f"rank {grid.rank}: the output was not added by the GEMM into z's storage ({targets[:3]})"
    assert everywhere(grid, error <= BF16_TOL), f"rank {grid.rank}: {error:.2e}"
