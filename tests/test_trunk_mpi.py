"""The whole trunk on the grid (input embedder with atoms split by windows, pair init, recycling, templates, MSA
module, Pairformer, distogram) against Boltz-2's own modules run the way ``Boltz2.forward`` runs them, float64,
at 1, 4 and 9 ranks, from the same features: our featurizer's for our trunk, boltz's for boltz's (their equality
is tested in test_features / test_msa).

Rank 0 runs the reference and broadcasts it; every rank compares its own tiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boltz_reference import double, float64_reference, narrow_boltz2_hparams, perturb_, relative_error
from conftest import everywhere, quiet_bcast
from foldcp_hpc.data.features import featurize
from foldcp_hpc.distributed.autograd import take_tile
from foldcp_hpc.model.trunk import Trunk
from test_features import mol_dir, reference_features, shared_features, synthetic_templates  # noqa: F401 - fixture
from test_msa import tokenized_with_msas, write_msa_input

pytestmark = pytest.mark.mpi

RECYCLES = 1  # the mixed input's; the MSA and template input's is 0 (recycling is the same code path)


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


def run_and_compare(grid, ref_feats, ours, templates=None, recycles=RECYCLES):
    """Boltz's trunk on rank 0 (broadcast) and ours on every rank; s_inputs, s, z and distogram within 1e-10."""
    hp = narrow_boltz2_hparams(pairformer_blocks=1)  # two blocks in a row: test_pairformer_parity_mpi
    torch.manual_seed(0)
    np.random.seed(0)
    from boltz.model.models.boltz2 import Boltz2

    model = perturb_(Boltz2(**hp).double().eval(), seed=4)
    feats = {k: v[None] for k, v in double(ref_feats).items()}
    template = double(ours.template)
    if templates is not None:
        feats.update({k: v[None] for k, v in double(templates).items()})
        template = double(templates)
    reference = None
    if grid.rank == 0:
        with torch.no_grad(), float64_reference():
            reference = boltz_trunk(model, feats, recycling_steps=recycles)
    s_inputs_ref, s_ref, z_ref, d_ref = quiet_bcast(grid, reference)

    trunk = Trunk(hp, grid=grid).double().eval()
    trunk.load_state_dict(trunk.boltz_state(model.state_dict()), strict=True)
    del model
    token = {k: v[None] for k, v in double(ours.token).items()}
    atom = {k: v[None] for k, v in double(ours.atom).items() if v.dim() and v.shape[0] == ours.n_atoms}
    pair = {k: v[None] for k, v in ours.pair_tile(grid.p, grid.row, grid.col).items()}
    msa = ours.msa_model_block(grid.p, grid.row, grid.col)
    with torch.no_grad():
        out = trunk(token, atom, pair, template, msa, ours.msa.n_rows, recycling_steps=recycles)

    layout = grid.layout(ours.n_tokens)
    valid = (slice(None), layout.valid_local(grid.row), layout.valid_local(grid.col))
    z_expected = take_tile(z_ref, grid.p, grid.row, grid.col)[valid]
    d_expected = take_tile(d_ref, grid.p, grid.row, grid.col)[valid]
    errors = {"s_inputs": relative_error(out.s_inputs, s_inputs_ref), "s": relative_error(out.s, s_ref)}
    if z_expected.numel():
        errors["z"] = relative_error(out.z[valid], z_expected)
        errors["distogram"] = relative_error(out.distogram[valid], d_expected)
    assert everywhere(grid, all(e <= 1e-10 for e in errors.values())), errors
    return errors


def test_trunk_equals_boltz_on_a_mixed_input(grid, mol_dir):  # noqa: F811
    """Protein with a modified residue, DNA, RNA, a ligand bonded to the protein, pocket and contact constraints
    (no MSA, no template: the template module must add exactly 0)."""
    ref_feats, ours = shared_features(grid, "protein_dna_rna_ligand", mol_dir)
    run_and_compare(grid, ref_feats, ours)


@pytest.fixture(scope="module")
def msa_template_input(tmp_path_factory):
    """Proteins with paired .csv MSAs (shared taxonomy keys, one of them a homodimer), one with an .a3m, one in
    single-sequence mode, and a ligand."""
    from mpi4py import MPI

    seq_a, seq_b, seq_d = "MKTAYIAKQRQISFVKSHFS", "GSHMSLFDFFKNKG", "MSLFDFFKNKGS"  # 96 tokens with E and F
    return write_msa_input(tmp_path_factory.mktemp(f"trunk-msa{MPI.COMM_WORLD.Get_rank()}"), seq_a, seq_b, seq_d,
                           rows=(10, 8, 6))


def test_trunk_equals_boltz_with_msas_and_templates(grid, msa_template_input):
    """Paired and unpaired MSA rows, a ligand, and two templates (template features given to both sides)."""
    from foldcp_hpc.data.inputs import parse_input

    from conftest import REPO

    def make():  # rank 0 featurizes, the others wait asleep (each would make the same)
        tokenized = tokenized_with_msas(msa_template_input)
        molecules = parse_input(msa_template_input, REPO / ".cache" / "test-mols").molecules
        ref = reference_features(tokenized, molecules, None, None)
        torch.manual_seed(0)
        return ref, featurize(tokenized, molecules, np.random.default_rng(42), None, None)

    ref_feats, ours = quiet_bcast(grid, make() if grid.rank == 0 else None)
    assert ours.msa.n_rows > 10 and bool(ref_feats["msa_paired"].sum() > 0)
    # Boltz accumulates the deletion mean in float32 (equal to 1e-7, test_msa); give both sides the same values
    ours.token["deletion_mean"] = torch.as_tensor(ref_feats["deletion_mean"]).clone()
    run_and_compare(grid, ref_feats, ours, templates=synthetic_templates(ours.n_tokens, n_templates=2, seed=5),
                    recycles=0)
