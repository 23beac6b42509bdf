"""The whole model (trunk, diffusion conditioning, sampler, confidence) against ``Boltz2.forward`` as
``boltz predict`` runs it (confidence one sample at a time), float64, reduced architecture, at 1, 4 and 9
ranks: coordinates after 3 sampler steps and every confidence output within 1e-8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boltz_reference import boltz2_forward, narrow_boltz2_hparams, perturb_, relative_error
from conftest import everywhere, quiet_bcast
from foldcp_hpc.distributed.autograd import take_tile
from foldcp_hpc.model.boltz2 import FoldModel
from test_features import mol_dir, shared_features  # noqa: F401 - mol_dir is a fixture

pytestmark = pytest.mark.mpi

SCALARS = ("complex_plddt", "complex_iplddt", "complex_pde", "complex_ipde", "ptm", "iptm", "ligand_iptm",
           "protein_iptm")


def test_fold_model_equals_boltz2_forward(grid, mol_dir):  # noqa: F811
    from boltz.model.models.boltz2 import Boltz2

    ref_feats, ours = shared_features(grid, "protein_dna_rna_ligand", mol_dir)
    n_tokens = ours.n_tokens

    hp = narrow_boltz2_hparams(pairformer_blocks=1, token_transformer_depth=2)
    torch.manual_seed(0)
    np.random.seed(0)
    model = perturb_(Boltz2(**hp).double().eval(), seed=8)
    feats = {k: (v.double() if v.is_floating_point() else v)[None] for k, v in ref_feats.items()
             if isinstance(v, torch.Tensor)}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # boltz draws its noise in the default dtype
    try:
        reference = None
        if grid.rank == 0:
            out = boltz2_forward(model, feats, recycling_steps=1, num_sampling_steps=3, diffusion_samples=2,
                                 max_parallel_samples=2, run_confidence_sequentially=True)
            reference = {k: out[k] for k in ("sample_atom_coords", "plddt", "pae", "pde", "pair_chains_iptm", *SCALARS)}
        reference = quiet_bcast(grid, reference)

        mine = FoldModel(hp, grid=grid).double().eval()
        mine.load_boltz_state(model.state_dict())
        del model
        prediction = mine.predict(ours, recycling_steps=1, sampling_steps=3, diffusion_samples=2,
                                  max_parallel_samples=2, generator=torch.Generator().manual_seed(123),
                                  dtype=torch.float64, gather_pae=True)
    finally:
        torch.set_default_dtype(default)

    layout = grid.layout(n_tokens)
    valid = (slice(None), layout.valid_local(grid.row), layout.valid_local(grid.col))
    errors = {"coords": relative_error(prediction.coords, reference["sample_atom_coords"]),
              "pae gathered": relative_error(prediction.pae, reference["pae"])}
    for k, conf in enumerate(prediction.confidence):
        errors[f"{k} plddt"] = relative_error(conf.plddt, reference["plddt"][k:k + 1])
        if conf.pde[valid].numel():
            errors[f"{k} pde"] = relative_error(conf.pde[valid], take_tile(reference["pde"][k:k + 1], grid.p, grid.row,
                                                                           grid.col)[valid])
        for name in SCALARS:
            errors[f"{k} {name}"] = relative_error(getattr(conf, name), reference[name][k:k + 1])
        for a, row in reference["pair_chains_iptm"].items():
            for b, value in row.items():
                errors[f"{k} chains {a},{b}"] = relative_error(conf.pair_chains_iptm[a][b], value[k:k + 1])
    bad = {name: e for name, e in errors.items() if not e <= 1e-8}
    assert everywhere(grid, not bad), bad
