"""The trunk on the grid (from s_inputs: pair init, recycling, templates, MSA module, Pairformer, distogram)
against Boltz-2's own modules run the way ``Boltz2.forward`` runs them, float64, at 1, 4 and 9 ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boltz_reference import float64_reference, perturb_, relative_error
from conftest import everywhere
from foldcp_hpc.data.boltz2_hparams import reduced_boltz2_hparams
from foldcp_hpc.data.features import featurize
from foldcp_hpc.distributed.autograd import take_tile
from foldcp_hpc.model.trunk import Trunk
from test_features import mol_dir, reference_features, tokenize  # noqa: F401 - mol_dir is a fixture

pytestmark = pytest.mark.mpi


def boltz_trunk(model, feats, recycling_steps):
    """Boltz2.forward's trunk part, with boltz's own submodules."""
    s_inputs = model.input_embedder(feats)
    s_init = model.s_init(s_inputs)
    z_init = model.z_init_1(s_inputs)[:, :, None] + model.z_init_2(s_inputs)[:, None, :]
    z_init = z_init + model.rel_pos(feats)
    z_init = z_init + model.token_bonds(feats["token_bonds"].float())
    z_init = z_init + model.token_bonds_type(feats["type_bonds"].long())
    z_init = z_init + model.contact_conditioning(feats)
    s, z = torch.zeros_like(s_init), torch.zeros_like(z_init)
    mask = feats["token_pad_mask"].float()
    pair_mask = mask[:, :, None] * mask[:, None, :]
    for _ in range(recycling_steps + 1):
        s = s_init + model.s_recycle(model.s_norm(s))
        z = z_init + model.z_recycle(model.z_norm(z))
        z = z + model.template_module(z, feats, pair_mask)
        z = z + model.msa_module(z, s_inputs, feats)
        s, z = model.pairformer_module(s, z, mask=mask, pair_mask=pair_mask)
    return s_inputs, s, z, model.distogram_module(z)


def test_trunk_equals_boltz(grid, mol_dir, tmp_path_factory):  # noqa: F811
    from boltz.model.models.boltz2 import Boltz2

    tmp_path = tmp_path_factory.mktemp(f"trunk{grid.rank}")
    tokenized, molecules, pockets, contacts = tokenize("protein_dna_rna_ligand", mol_dir, tmp_path)
    ref_feats = reference_features(tokenized, molecules, pockets, contacts)
    ours = featurize(tokenized, molecules, np.random.default_rng(42), pockets, contacts)
    n_tokens = ours.n_tokens

    hp = reduced_boltz2_hparams()
    torch.manual_seed(0)
    np.random.seed(0)
    model = perturb_(Boltz2(**hp).double().eval(), seed=4)
    feats = {k: (v.double() if v.is_floating_point() else v)[None] for k, v in ref_feats.items()
             if isinstance(v, torch.Tensor)}
    with torch.no_grad(), float64_reference():
        s_inputs, s_ref, z_ref, d_ref = boltz_trunk(model, feats, recycling_steps=1)

    trunk = Trunk(hp, grid=grid).double().eval()
    trunk.load_state_dict(trunk.boltz_state(model.state_dict()), strict=True)
    token = {k: v[None] for k, v in ours.token.items()}
    pair = {k: v[None] for k, v in ours.pair_tile(grid.p, grid.row, grid.col).items()}
    template = {k: (v.double() if v.is_floating_point() else v) for k, v in ours.template.items()}
    msa = ours.msa_model_block(grid.p, grid.row, grid.col)
    with torch.no_grad():
        s, z, distogram = trunk(s_inputs, token, pair, template, msa, ours.msa.n_rows, recycling_steps=1)

    layout = grid.layout(n_tokens)
    valid = (slice(None), layout.valid_local(grid.row), layout.valid_local(grid.col))
    z_expected = take_tile(z_ref, grid.p, grid.row, grid.col)[valid]
    d_expected = take_tile(d_ref, grid.p, grid.row, grid.col)[valid]
    errors = {"s": relative_error(s, s_ref)}
    if z_expected.numel():
        errors["z"] = relative_error(z[valid], z_expected)
        errors["distogram"] = relative_error(distogram[valid], d_expected)
    assert everywhere(grid, all(e <= 1e-10 for e in errors.values())), errors
