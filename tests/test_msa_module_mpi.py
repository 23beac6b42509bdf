"""MSA-module layers on the grid (MSA rows block c of token block r on rank (r, c)) against boltz, float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from boltz_reference import float64_reference, shared_randn, token_mask
from foldcp_hpc.distributed.autograd import take_tile
from test_pairformer_parity_mpi import FORWARD_TOL, GRAD_TOL, build, compare, parameter_pairs, summed

pytestmark = pytest.mark.mpi

N, S, C_M, C_Z = 37, 11, 8, 8


def msa_block(full, grid):
    """Rows block c, tokens block r of a replicated [B, S, N, ...] tensor, zero-padded."""
    s_layout, n_layout = grid.layout(full.shape[1]), grid.layout(full.shape[2])
    padded = F.pad(full, [0, 0] * (full.dim() - 3) + [0, n_layout.n_pad, 0, s_layout.n_pad])
    return padded[:, s_layout.block(grid.col), n_layout.block(grid.row)]


def test_outer_product_mean(grid):
    from boltz.model.layers.outer_product_mean import OuterProductMean as Ref

    from foldcp_hpc.model.outer_product_mean import OuterProductMean

    ref, mine = build(Ref, OuterProductMean, (C_M, 4, C_Z), {}, grid, seed=21)
    m = shared_randn(1, S, N, C_M, seed=22)
    mask = token_mask(1, N, 23)[:, None, :] * (torch.rand(1, S, N, generator=torch.Generator().manual_seed(24)) > 0.1)
    mask = mask.double()
    weight = shared_randn(1, N, N, C_Z, seed=25)

    m_ref = m.clone().requires_grad_()
    with float64_reference():
        out_ref = ref(m_ref, mask)
    (out_ref * weight).sum().backward()

    m_mine = m.clone().requires_grad_()
    out = mine(msa_block(m_mine, grid), msa_block(mask, grid))
    (out * take_tile(weight, grid.p, grid.row, grid.col)).sum().backward()

    layout = grid.layout(N)
    valid = (slice(None), layout.valid_local(grid.row), layout.valid_local(grid.col))
    expected = take_tile(out_ref.detach(), grid.p, grid.row, grid.col)
    pairs = {"forward": (out.detach()[valid], expected[valid], FORWARD_TOL),
             "grad m": (summed(grid, m_mine.grad), m_ref.grad, GRAD_TOL)}
    compare(grid, {**pairs, **parameter_pairs(grid, ref, mine)})


def test_pair_weighted_averaging(grid):
    from boltz.model.layers.pair_averaging import PairWeightedAveraging as Ref

    from foldcp_hpc.model.pair_averaging import PairWeightedAveraging

    ref, mine = build(Ref, PairWeightedAveraging, (C_M, C_Z, 4, 2), {}, grid, seed=31)
    m = shared_randn(1, S, N, C_M, seed=32)
    z = shared_randn(1, N, N, C_Z, seed=33)
    token = token_mask(1, N, 34)
    pair_mask = token[:, :, None] * token[:, None, :]
    weight = shared_randn(1, S, N, C_M, seed=35)

    m_ref, z_ref = m.clone().requires_grad_(), z.clone().requires_grad_()
    with float64_reference():
        out_ref = ref(m_ref, z_ref, pair_mask)
    (out_ref * weight).sum().backward()

    m_mine, z_mine = m.clone().requires_grad_(), z.clone().requires_grad_()
    out = mine(msa_block(m_mine, grid), take_tile(z_mine, grid.p, grid.row, grid.col),
               take_tile(pair_mask, grid.p, grid.row, grid.col), n_tokens=N)
    (out * msa_block(weight, grid)).sum().backward()

    s_valid = grid.layout(S).valid_local(grid.col)
    n_valid = grid.layout(N).valid_local(grid.row)
    expected = msa_block(out_ref.detach(), grid)[:, s_valid, n_valid]
    pairs = {"forward": (out.detach()[:, s_valid, n_valid], expected, FORWARD_TOL),
             "grad m": (summed(grid, m_mine.grad), m_ref.grad, GRAD_TOL),
             "grad z": (summed(grid, z_mine.grad), z_ref.grad, GRAD_TOL)}
    compare(grid, {**pairs, **parameter_pairs(grid, ref, mine)})


def test_msa_module(grid):
    from boltz.model.modules.trunkv2 import MSAModule as Ref

    from foldcp_hpc.model.msa_module import MSAModule

    kwargs = {"msa_dropout": 0.0, "z_dropout": 0.0, "pairwise_head_width": 4, "pairwise_num_heads": 2}
    ref, mine = build(Ref, MSAModule, (C_M, C_Z, 16, 2), kwargs, grid, seed=41)
    g = torch.Generator().manual_seed(42)
    feats = {"msa": torch.randint(0, 33, (1, S, N), generator=g),
             "has_deletion": torch.rand(1, S, N, generator=g) > 0.8,
             "deletion_value": torch.rand(1, S, N, generator=g, dtype=torch.float64),
             "msa_paired": (torch.rand(1, S, N, generator=g) > 0.5).double(),
             "msa_mask": (torch.rand(1, S, N, generator=g) > 0.1).long(),
             "token_pad_mask": token_mask(1, N, 43)}
    z = shared_randn(1, N, N, C_Z, seed=44)
    emb = shared_randn(1, N, 16, seed=45)
    weight = shared_randn(1, N, N, C_Z, seed=46)
    pair_mask = feats["token_pad_mask"][:, :, None] * feats["token_pad_mask"][:, None, :]

    z_ref, emb_ref = z.clone().requires_grad_(), emb.clone().requires_grad_()
    with float64_reference():
        out_ref = ref(z_ref, emb_ref, feats)
    (out_ref * weight).sum().backward()

    z_mine, emb_mine = z.clone().requires_grad_(), emb.clone().requires_grad_()
    block = {k: msa_block(feats[k], grid) for k in ("msa", "has_deletion", "deletion_value", "msa_paired", "msa_mask")}
    out = mine(take_tile(z_mine, grid.p, grid.row, grid.col), emb_mine, block,
               take_tile(pair_mask, grid.p, grid.row, grid.col), n_rows=S)
    (out * take_tile(weight, grid.p, grid.row, grid.col)).sum().backward()

    layout = grid.layout(N)
    valid = (slice(None), layout.valid_local(grid.row), layout.valid_local(grid.col))
    expected = take_tile(out_ref.detach(), grid.p, grid.row, grid.col)
    pairs = {"forward": (out.detach()[valid], expected[valid], FORWARD_TOL),
             "grad z": (summed(grid, z_mine.grad), z_ref.grad, GRAD_TOL),
             "grad emb": (summed(grid, emb_mine.grad), emb_ref.grad, GRAD_TOL)}
    compare(grid, {**pairs, **parameter_pairs(grid, ref, mine)})
