"""The affinity pass against boltz: the cropped affinity features equal boltz's (serial), and the affinity model on
the grid equals ``Boltz2.forward`` with the affinity ensemble (float64, reduced architecture, 1 / 4 / 9 ranks).

The first pass's prediction is replaced by seeded random coordinates around a line, so that the crop (nearest
residues to the ligand by predicted coordinates) is not the whole chain.
"""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import pytest
import torch

from boltz_reference import boltz2_forward, narrow_boltz2_hparams, perturb_, relative_error
from conftest import everywhere, quiet_bcast
from foldcp_hpc.data.affinity import affinity_features
from foldcp_hpc.data.inputs import ParsedInput
from test_features import SAME_AS_BOLTZ, feature_pairs, mismatches, mol_dir  # noqa: F401 - fixture

LONG_PROTEIN = "MKTAYIAKQRQISFVKSHFSRQ" * 12  # 264 residues: more than the crop's 200 protein tokens
SHORT_PROTEIN = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"


def affinity_input(tmp_path, mol_dir, sequence: str) -> ParsedInput:  # noqa: F811
    from boltz.data.mol import load_canonicals, load_molecules
    from boltz.data.parse.yaml import parse_yaml

    from foldcp_hpc.data.inputs import expose_descriptors

    expose_descriptors()  # boltz's parser reads AllChem.Descriptors for the ligand's molecular weight

    path = tmp_path / "affinity.yaml"
    path.write_text(textwrap.dedent(f"""
        version: 1
        sequences:
          - protein:
              id: A
              sequence: {sequence}
              msa: empty
          - ligand:
              id: B
              ccd: SAH
        properties:
          - affinity:
              binder: B
    """))
    canonicals = load_canonicals(str(mol_dir))
    target = parse_yaml(path, canonicals, str(mol_dir), True)
    molecules = dict(canonicals)
    names = {str(r["name"]) for r in target.structure.residues} - set(molecules)
    molecules.update(load_molecules(str(mol_dir), sorted(names)))
    return ParsedInput(path=path, target=target, molecules=molecules)


def predicted_coords(parsed: ParsedInput, seed: int = 3) -> np.ndarray:
    """A stand-in for the first pass's top sample: residues along a line (3.8 A apart, atoms jittered), the ligand
    placed near residue 40. [M_valid, 3] float32."""
    structure = parsed.target.structure.remove_invalid_chains()
    rng = np.random.default_rng(seed)
    coords = np.zeros((len(structure.atoms), 3), dtype=np.float32)
    for k, residue in enumerate(structure.residues):
        start, count = residue["atom_idx"], residue["atom_num"]
        centre = np.array([3.8 * k, 0.0, 0.0]) if k < len(structure.residues) - 1 else np.array([3.8 * 40, 6.0, 0.0])
        coords[start:start + count] = centre + rng.normal(scale=1.5, size=(count, 3))
    return coords


def boltz_affinity_features(parsed: ParsedInput, coords: np.ndarray, tmp_path):
    """What ``boltz predict``'s affinity pass featurizes: the writer's pre_affinity structure saved and loaded,
    tokenized, cropped, featurized with compute_affinity and method "other"."""
    from boltz.data import const
    from boltz.data.crop.affinity import AffinityCropper
    from boltz.data.feature.featurizerv2 import Boltz2Featurizer
    from boltz.data.tokenize.boltz2 import Boltz2Tokenizer
    from boltz.data.types import Coords, Input, Interface, StructureV2

    structure = parsed.target.structure.remove_invalid_chains()
    atoms, residues = structure.atoms.copy(), structure.residues.copy()
    atoms["coords"], atoms["is_present"], residues["is_present"] = coords, True, True
    new = dataclasses.replace(structure, atoms=atoms, residues=residues, interfaces=np.array([], dtype=Interface),
                              coords=np.array([(x,) for x in coords], dtype=Coords))
    path = tmp_path / "pre_affinity.npz"
    np.savez_compressed(path, **dataclasses.asdict(new))
    target = parsed.target
    data = Input(structure=StructureV2.load(path), msa={}, record=target.record,
                 residue_constraints=target.residue_constraints, templates=target.templates,
                 extra_mols=target.extra_mols)
    tokenized = AffinityCropper().crop(Boltz2Tokenizer().tokenize(data), max_tokens=256, max_atoms=2048)
    torch.manual_seed(0)
    return Boltz2Featurizer().process(
        tokenized, molecules=parsed.molecules, random=np.random.default_rng(42), training=False, max_atoms=None,
        max_tokens=None, max_seqs=const.max_msa_seqs, pad_to_max_seqs=False, single_sequence_prop=0.0,
        compute_frames=True, inference_pocket_constraints=None, inference_contact_constraints=None,
        compute_constraint_features=True, override_method="other", compute_affinity=True)


def test_affinity_features_equal_boltz(mol_dir, tmp_path):  # noqa: F811
    from boltz.data import const

    parsed = affinity_input(tmp_path, mol_dir, LONG_PROTEIN)
    coords = predicted_coords(parsed)
    ref = boltz_affinity_features(parsed, coords, tmp_path)
    torch.manual_seed(0)
    ours, tokenized = affinity_features(parsed, {}, coords)
    assert 1 < ours.n_tokens < len(LONG_PROTEIN), "the crop must drop residues far from the ligand"

    problems = mismatches(feature_pairs(ours, ref, [*SAME_AS_BOLTZ, "profile_affinity", "deletion_mean_affinity",
                                                     "deletion_mean"]))
    assert not problems, problems
    assert ours.affinity_mw == ref["affinity_mw"] > 0
    assert int(ours.token["method_feature"][0]) == const.method_types_ids["other"]


@pytest.mark.mpi
def test_affinity_model_equals_boltz2_forward(grid, mol_dir, tmp_path_factory):  # noqa: F811
    from boltz.model.models.boltz2 import Boltz2

    from foldcp_hpc.data.boltz2_hparams import with_affinity
    from foldcp_hpc.model.boltz2 import FoldModel

    def make():  # rank 0 featurizes, the others wait asleep (each would make the same)
        tmp_path = tmp_path_factory.mktemp("affinity")
        parsed = affinity_input(tmp_path, mol_dir, SHORT_PROTEIN)
        coords = predicted_coords(parsed)
        ref = boltz_affinity_features(parsed, coords, tmp_path)
        torch.manual_seed(0)
        return ref, affinity_features(parsed, {}, coords)[0]

    ref_feats, ours = quiet_bcast(grid, make() if grid.rank == 0 else None)

    hp = with_affinity(narrow_boltz2_hparams(pairformer_blocks=1, token_transformer_depth=1), pairformer_blocks=1,
                       mw_correction=True)
    for key in ("affinity_model_args1", "affinity_model_args2"):  # the heads as narrow as the rest
        hp[key]["pairformer_args"]["pairwise_head_width"] = 8
        hp[key]["transformer_args"]["token_s"] = 64
    torch.manual_seed(0)
    np.random.seed(0)  # boltz's truncated-normal initialisers draw from numpy: the same weights on every rank
    model = perturb_(Boltz2(**hp).double().eval(), seed=9)
    feats = {k: (v.double() if v.is_floating_point() else v)[None] for k, v in ref_feats.items()
             if isinstance(v, torch.Tensor)}
    feats["affinity_mw"] = [ref_feats["affinity_mw"]]  # boltz's collate keeps it a list
    keys = ("affinity_pred_value", "affinity_probability_binary", "affinity_pred_value1", "affinity_pred_value2",
            "affinity_probability_binary1", "affinity_probability_binary2")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        reference = None
        if grid.rank == 0:
            out = boltz2_forward(model, feats, recycling_steps=0, num_sampling_steps=2, diffusion_samples=2,
                                 max_parallel_samples=1, run_confidence_sequentially=True)
            reference = {k: out[k] for k in (*keys, "iptm")}
        reference = quiet_bcast(grid, reference)

        mine = FoldModel(hp, grid=grid).double().eval()
        mine.load_boltz_state(model.state_dict())
        del model
        prediction = mine.predict(ours, recycling_steps=0, sampling_steps=2, diffusion_samples=2,
                                  max_parallel_samples=1, generator=torch.Generator().manual_seed(123),
                                  dtype=torch.float64)
    finally:
        torch.set_default_dtype(default)

    errors = {key: relative_error(prediction.affinity[key].reshape(-1), reference[key].reshape(-1)) for key in keys}
    errors["iptm"] = relative_error(torch.cat([c.iptm for c in prediction.confidence]), reference["iptm"])
    bad = {name: e for name, e in errors.items() if not e <= 1e-8}
    assert everywhere(grid, not bad), bad
    # the heads saw something: the two models' values differ and are not zero
    values = [float(prediction.affinity[f"affinity_pred_value{k}"]) for k in (1, 2)]
    assert values[0] != values[1] and min(abs(v) for v in values) > 0
