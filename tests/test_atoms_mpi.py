"""The input embedder with atoms split by windows over the grid, against boltz's InputEmbedder, float64, at 1, 4
and 9 ranks: forward and every parameter gradient; and the halo exchange's adjoint on layouts where ranks own
no window or fewer windows than the halo spans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boltz_reference import float64_reference, perturb_, relative_error, shared_randn
from conftest import everywhere
from foldcp_hpc.data.boltz2_hparams import embedder_args, reduced_boltz2_hparams
from foldcp_hpc.distributed.atom_layout import AtomWindowLayout
from foldcp_hpc.distributed.autograd import halo_extend
from foldcp_hpc.model.input_embedder import InputEmbedder
from test_features import mol_dir, shared_features  # noqa: F401 - mol_dir is a fixture
from test_pairformer_parity_mpi import compare, parameter_pairs

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n_windows", [1, 5, 9, 40])
def test_halo_extend_is_the_serial_window_and_its_adjoint(grid, n_windows):
    """Every rank's extended atoms equal the zero-padded serial slice; <halo(x), y> summed over ranks equals
    <x, halo^T(y)> (the backward is the exact adjoint), also when windows are fewer than ranks."""
    layout = AtomWindowLayout(32 * n_windows, grid.axis("grid").size)
    me = grid.axis("grid").index
    full = shared_randn(2, layout.n_atoms, 3, seed=n_windows)
    a0, a1 = layout.atoms(me)
    x = full[:, a0:a1].clone().requires_grad_()
    out = halo_extend(x, grid, layout)
    if a1 > a0:
        padded = torch.nn.functional.pad(full, (0, 0, layout.halo, layout.halo))
        expected = padded[:, a0:a1 + 2 * layout.halo]
    else:
        expected = x.detach()
    ok = out.shape == expected.shape and torch.equal(out.detach(), expected)
    weight = shared_randn(*out.shape, seed=100 + me)
    (out * weight).sum().backward()
    # adjoint: d/dx of sum_r <halo_r(x), w_r> is sum over the ranks reading each atom of their weights
    grad_full = torch.zeros_like(full)
    for rank in range(layout.n_ranks):
        b0, b1 = layout.atoms(rank)
        if b1 == b0:
            continue
        w = shared_randn(2, b1 - b0 + 2 * layout.halo, 3, seed=100 + rank)
        lo = b0 - layout.halo
        inside = slice(max(0, lo), min(layout.n_atoms, b1 + layout.halo))
        grad_full[:, inside] += w[:, inside.start - lo:inside.stop - lo]
    ok = ok and torch.allclose(x.grad, grad_full[:, a0:a1], rtol=0, atol=1e-12)
    assert everywhere(grid, ok)


def embedder_inputs(features):
    token = {k: v[None] for k, v in features.token.items()}
    atom = {k: v[None] for k, v in features.atom.items()
            if v.dim() >= 1 and v.shape[0] == features.n_atoms}
    return token, atom


@pytest.mark.parametrize("name", ["protein_dna_rna_ligand", "tiny_peptide"])
def test_input_embedder_equals_boltz(grid, mol_dir, name):  # noqa: F811
    from boltz.model.modules.trunkv2 import InputEmbedder as Ref

    ref_feats, ours = shared_features(grid, name, mol_dir)
    if name == "protein_dna_rna_ligand":
        # 13 windows: at 9 ranks every rank owns one or two, so halos come from ranks two places away
        assert ours.n_atoms // 32 >= grid.axis("grid").size, "the input must give every rank windows"
    else:  # 2 windows: at 4 and 9 ranks most ranks own none and only serve halos
        assert ours.n_atoms // 32 == 2

    args = embedder_args(reduced_boltz2_hparams(atom_depth=2))
    torch.manual_seed(0)
    np.random.seed(0)
    ref = perturb_(Ref(**args).double(), seed=7)
    mine = InputEmbedder(**args, grid=grid).double()
    mine.load_state_dict(ref.state_dict(), strict=True)

    feats = {k: (v.double() if v.is_floating_point() else v)[None] for k, v in ref_feats.items()
             if isinstance(v, torch.Tensor)}
    weight = shared_randn(1, ours.n_tokens, args["token_s"], seed=3)
    with float64_reference():
        s_ref = ref(feats)
    (s_ref * weight).sum().backward()

    token, atom = embedder_inputs(ours)
    token = {k: (v.double() if v.is_floating_point() else v) for k, v in token.items()}
    atom = {k: (v.double() if v.is_floating_point() else v) for k, v in atom.items()}
    s = mine(token, atom)
    (s * weight / grid.axis("grid").size).sum().backward()  # s is replicated: each rank owns 1/P of the objective
    pairs = {"forward": (s.detach(), s_ref.detach(), 1e-10)}
    pairs.update(parameter_pairs(grid, ref, mine))
    compare(grid, pairs)
    same = grid.comm.allgather(float(s.detach().sum()))
    assert everywhere(grid, len(set(same)) == 1), "s_inputs differs between ranks"


@pytest.mark.parametrize("n_tokens", [5, 23])
def test_gather_pair_entries_and_its_adjoint(grid, n_tokens):
    """Any rank's entries of a tiled pair tensor, whoever owns them; the backward accumulates into the owners'
    tiles (repeated entries included)."""
    from foldcp_hpc.distributed.autograd import gather_pair_entries

    full = shared_randn(2, n_tokens, n_tokens, 3, seed=n_tokens)
    g = torch.Generator().manual_seed(1000 + grid.rank)
    count = int(torch.randint(0, 40, (1,), generator=g))
    rows = torch.randint(0, n_tokens, (count,), generator=g)
    cols = torch.randint(0, n_tokens, (count,), generator=g)
    tile = grid.scatter_pair(full).clone().requires_grad_()
    got = gather_pair_entries(tile, grid, n_tokens, rows, cols)
    ok = torch.equal(got.detach(), full[:, rows, cols])
    weight = shared_randn(*got.shape, seed=2000 + grid.rank)
    (got * weight).sum().backward()
    expected = torch.zeros_like(full)
    for rank in range(grid.world_size):  # every rank's requests, rebuilt from its seeds
        g = torch.Generator().manual_seed(1000 + rank)
        k = int(torch.randint(0, 40, (1,), generator=g))
        r = torch.randint(0, n_tokens, (k,), generator=g)
        c = torch.randint(0, n_tokens, (k,), generator=g)
        w = shared_randn(2, k, 3, seed=2000 + rank)
        expected.index_put_((torch.arange(2)[:, None], r[None], c[None]), w, accumulate=True)
    ok = ok and torch.allclose(tile.grad, grid.scatter_pair(expected), rtol=0, atol=1e-12)
    assert everywhere(grid, ok)


def test_gather_atoms_round_trip(grid):
    from foldcp_hpc.distributed.autograd import gather_atoms

    layout = AtomWindowLayout(32 * 7, grid.axis("grid").size)
    a0, a1 = layout.atoms(grid.axis("grid").index)
    full = shared_randn(2, layout.n_atoms, 3, seed=9)
    x = full[:, a0:a1].clone().requires_grad_()
    out = gather_atoms(x, grid, layout)
    ok = torch.equal(out.detach(), full)
    (out * shared_randn(*out.shape, seed=10)).sum().backward()
    # each rank's objective uses the whole output: the gradient of the own run is P times the weights
    ok = ok and torch.allclose(x.grad, grid.axis("grid").size * shared_randn(*out.shape, seed=10)[:, a0:a1])
    assert everywhere(grid, ok)
