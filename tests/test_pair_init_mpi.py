"""z_init tiles against Boltz-2's own pair initialisation (float64), at 1, 4 and 9 ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boltz_reference import float64_reference, narrow_boltz2_hparams, perturb_, relative_error, shared_randn
from conftest import everywhere
from foldcp_hpc.distributed.autograd import take_tile
from foldcp_hpc.model.pair_init import PairInitializer
from test_features import mol_dir, shared_features  # noqa: F401 - mol_dir is a fixture

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def boltz_model():
    from boltz.model.models.boltz2 import Boltz2

    torch.manual_seed(0)
    np.random.seed(0)
    return perturb_(Boltz2(**narrow_boltz2_hparams()).double().eval(), seed=3)


@pytest.mark.parametrize("name", ["protein_dna_rna_ligand", "cyclic_peptide_ions_smiles"])
def test_z_init_tiles_equal_boltz(grid, boltz_model, mol_dir, name):  # noqa: F811
    ref_feats, ours = shared_features(grid, name, mol_dir)
    n_tokens = ours.n_tokens
    model = boltz_model
    s_inputs = shared_randn(1, n_tokens, model.z_init_1.in_features, seed=5)

    feats = {k: (v.double() if v.is_floating_point() else v)[None] for k, v in ref_feats.items()
             if isinstance(v, torch.Tensor)}
    with torch.no_grad(), float64_reference():
        z_ref = model.z_init_1(s_inputs)[:, :, None] + model.z_init_2(s_inputs)[:, None, :]
        rel_ref = model.rel_pos(feats)
        z_ref = z_ref + rel_ref
        z_ref = z_ref + model.token_bonds(feats["token_bonds"].float())
        z_ref = z_ref + model.token_bonds_type(feats["type_bonds"].long())
        z_ref = z_ref + model.contact_conditioning(feats)

    hp = narrow_boltz2_hparams()
    mine = PairInitializer(hp["token_s"], hp["token_z"], grid=grid, fix_sym_check=hp["fix_sym_check"],
                           cyclic_pos_enc=hp["cyclic_pos_enc"], bond_type_feature=hp["bond_type_feature"],
                           conditioning_cutoff_min=hp["conditioning_cutoff_min"],
                           conditioning_cutoff_max=hp["conditioning_cutoff_max"]).double()
    mine.load_state_dict(PairInitializer.state_from_boltz(model.state_dict()), strict=True)
    token = {k: v[None] for k, v in ours.token.items()}
    pair = {k: v[None] for k, v in ours.pair_tile(grid.p, grid.row, grid.col).items()}
    with torch.no_grad():
        z_tile, rel_tile = mine(s_inputs, token, pair)

    layout = grid.layout(n_tokens)
    valid = (slice(None), layout.valid_local(grid.row), layout.valid_local(grid.col))
    expected = take_tile(z_ref, grid.p, grid.row, grid.col)
    expected_rel = take_tile(rel_ref, grid.p, grid.row, grid.col)
    error = relative_error(z_tile[valid], expected[valid]) if expected[valid].numel() else 0.0
    error_rel = relative_error(rel_tile[valid], expected_rel[valid]) if expected[valid].numel() else 0.0
    assert everywhere(grid, error <= 1e-12 and error_rel <= 1e-12), (error, error_rel)
    assert everywhere(grid, torch.isfinite(z_tile).all())
