"""Diffusion conditioning, score model and sampler on the grid against boltz 2.2.1's modules, float64, at 1, 4
and 9 ranks (atoms split by windows, z and the token-transformer bias as tiles), forward and backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boltz_reference import float64_reference, perturb_, relative_error, shared_randn
from conftest import everywhere
from foldcp_hpc.data.boltz2_hparams import diffusion_conditioning_args, reduced_boltz2_hparams
from foldcp_hpc.data.features import featurize
from foldcp_hpc.distributed.autograd import take_tile
from test_features import mol_dir, reference_features, tokenize  # noqa: F401 - mol_dir is a fixture
from test_pairformer_parity_mpi import compare, parameter_pairs, summed

pytestmark = pytest.mark.mpi


def double(features: dict) -> dict:
    return {k: (v.double() if v.is_floating_point() else v) for k, v in features.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def mixed_features(mol_dir, tmp_path_factory):  # noqa: F811
    """(boltz's feats [1, ...] float64, our token and atom dicts [1, ...] float64, N) of the mixed input."""
    from mpi4py import MPI

    tmp_path = tmp_path_factory.mktemp(f"diffusion{MPI.COMM_WORLD.Get_rank()}")
    tokenized, molecules, pockets, contacts = tokenize("protein_dna_rna_ligand", mol_dir, tmp_path)
    ref_feats = reference_features(tokenized, molecules, pockets, contacts)
    torch.manual_seed(0)
    ours = featurize(tokenized, molecules, np.random.default_rng(42), pockets, contacts)
    feats = {k: v[None] for k, v in double(ref_feats).items()}
    token = {k: v[None] for k, v in double(ours.token).items()}
    atom = {k: v[None] for k, v in double(ours.atom).items() if v.dim() and v.shape[0] == ours.n_atoms}
    return feats, token, atom, ours.n_tokens


def test_diffusion_conditioning_equals_boltz(grid, mixed_features):
    from boltz.model.modules.diffusion_conditioning import DiffusionConditioning as Ref

    from foldcp_hpc.model.diffusion_conditioning import DiffusionConditioning

    feats, token, atom, n_tokens = mixed_features
    hp = reduced_boltz2_hparams(atom_depth=2, token_transformer_depth=2)
    args = diffusion_conditioning_args(hp)
    torch.manual_seed(0)
    np.random.seed(0)
    ref = perturb_(Ref(**args).double(), seed=11)
    mine = DiffusionConditioning(**args, grid=grid).double()
    mine.load_state_dict(ref.state_dict(), strict=True)

    c_s, c_z = args["token_s"], args["token_z"]
    s_trunk = shared_randn(1, n_tokens, c_s, seed=1)
    z_trunk = shared_randn(1, n_tokens, n_tokens, c_z, seed=2)
    rel = shared_randn(1, n_tokens, n_tokens, c_z, seed=3)

    leaves_ref = [t.clone().requires_grad_() for t in (s_trunk, z_trunk, rel)]
    with float64_reference():
        q, c, _, enc, dec, tok = ref(*leaves_ref, feats)
    outputs_ref = {"q": q, "c": c, "atom_enc_bias": enc, "atom_dec_bias": dec, "token_trans_bias": tok}
    weights = {name: shared_randn(*t.shape, seed=20 + i) for i, (name, t) in enumerate(outputs_ref.items())}
    sum((t * weights[name]).sum() for name, t in outputs_ref.items()).backward()

    s_mine = s_trunk.clone().requires_grad_()
    z_tile = grid.scatter_pair(z_trunk).clone().requires_grad_()
    rel_tile = grid.scatter_pair(rel).clone().requires_grad_()
    out = mine(s_mine, z_tile, rel_tile, token, atom)
    layout = out.layout
    a0, a1 = layout.atoms(grid.axis("grid").index)
    k0, k1 = layout.windows(grid.axis("grid").index)
    own = {"q": (out.q, slice(a0, a1)), "c": (out.c, slice(a0, a1)), "atom_enc_bias": (out.atom_enc_bias, slice(k0, k1)),
           "atom_dec_bias": (out.atom_dec_bias, slice(k0, k1))}
    objective = sum((t * weights[name][:, sl]).sum() for name, (t, sl) in own.items())
    objective = objective + (out.token_trans_bias * grid.scatter_pair(weights["token_trans_bias"])).sum()
    objective.backward()

    pairs = {f"forward {name}": (t.detach(), outputs_ref[name][:, sl].detach(), 1e-10) for name, (t, sl) in own.items()}
    nl = grid.layout(n_tokens)
    valid = (slice(None), nl.valid_local(grid.row), nl.valid_local(grid.col))
    pairs["forward token_trans_bias"] = (out.token_trans_bias.detach()[valid],
                                         take_tile(tok.detach(), grid.p, grid.row, grid.col)[valid], 1e-10)
    pairs["grad s_trunk"] = (summed(grid, s_mine.grad), leaves_ref[0].grad, 1e-8)
    pairs["grad z_trunk"] = (z_tile.grad[valid], take_tile(leaves_ref[1].grad, grid.p, grid.row, grid.col)[valid], 1e-8)
    pairs["grad rel"] = (rel_tile.grad[valid], take_tile(leaves_ref[2].grad, grid.p, grid.row, grid.col)[valid], 1e-8)
    pairs.update(parameter_pairs(grid, ref, mine))
    compare(grid, pairs)
