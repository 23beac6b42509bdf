"""Sharded features against boltz's own featurizer: every feature at p = 1, and pair tiles on the grid.

Inputs are parsed and tokenized with boltz's parser and tokenizer, using CCD molecules built offline from
biotite's CCD (foldcp_hpc.data.ccd); the same tokenized data goes through boltz's ``Boltz2Featurizer`` and
through ``foldcp_hpc.data.features.featurize``.
"""

from __future__ import annotations

import copy
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from foldcp_hpc.data.features import featurize
from foldcp_hpc.distributed.autograd import take_tile
from conftest import REPO, everywhere, quiet_bcast

INPUTS = {
    "protein_dimer": """
        version: 1
        sequences:
          - protein:
              id: [A, B]
              sequence: MKTAYIAKQRQISFVKSHFSRQ
              msa: empty
    """,
    "protein_dna_rna_ligand": """
        version: 1
        sequences:
          - protein:
              id: A
              sequence: MSEVKLRGHWALCDEF
              msa: empty
              modifications:
                - position: 3
                  ccd: SEP
          - dna:
              id: B
              sequence: GATTACA
          - rna:
              id: C
              sequence: ACGU
          - ligand:
              id: D
              ccd: SAH
        constraints:
          - bond:
              atom1: [A, 13, SG]
              atom2: [D, 1, N]
          - pocket:
              binder: D
              contacts: [[A, 2], [A, 5], [B, 3]]
              max_distance: 6.0
          - contact:
              token1: [A, 10]
              token2: [C, 2]
              max_distance: 8.0
    """,
    "tiny_peptide": """
        version: 1
        sequences:
          - protein:
              id: A
              sequence: MKTAYIAK
              msa: empty
    """,
    "cyclic_peptide_ions_smiles": """
        version: 1
        sequences:
          - protein:
              id: A
              sequence: GCAVLKWG
              msa: empty
              cyclic: true
          - protein:
              id: B
              sequence: MQIFVKTLTG
              msa: empty
          - ligand:
              id: [C, D]
              ccd: ZN
          - ligand:
              id: E
              smiles: "CC(=O)Oc1ccccc1C(=O)O"
    """,
}


@pytest.fixture(scope="session")
def mol_dir():
    """CCD molecules built once into .cache/test-mols (rank 0 builds, the others wait; reruns reuse them)."""
    from mpi4py import MPI

    from foldcp_hpc.data.ccd import build_molecules, ensure_canonicals

    directory = REPO / ".cache" / "test-mols"
    if MPI.COMM_WORLD.Get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        ensure_canonicals(directory)
        build_molecules(["SEP", "SAH", "ZN"], directory)
    MPI.COMM_WORLD.Barrier()
    return directory


def tokenize(name, mol_dir, tmp_path):
    """boltz's parse_yaml + Boltz2Tokenizer; returns (tokenized, molecules, pockets, contacts)."""
    from boltz.data.mol import load_canonicals, load_molecules
    from boltz.data.parse.yaml import parse_yaml
    from boltz.data.tokenize.boltz2 import Boltz2Tokenizer
    from boltz.data.types import Input

    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(INPUTS[name]))
    canonicals = load_canonicals(str(mol_dir))
    target = parse_yaml(path, canonicals, str(mol_dir), True)
    data = Input(structure=target.structure, msa={}, record=target.record,
                 residue_constraints=target.residue_constraints, templates=target.templates,
                 extra_mols=target.extra_mols)
    tokenized = Boltz2Tokenizer().tokenize(data)
    molecules = dict(canonicals)
    molecules.update(target.extra_mols or {})
    names = set(tokenized.tokens["res_name"].tolist()) - set(molecules)
    molecules.update(load_molecules(str(mol_dir), names))
    options = target.record.inference_options
    pockets = options.pocket_constraints if options else None
    contacts = options.contact_constraints if options else None
    return tokenized, molecules, pockets, contacts


def reference_features(tokenized, molecules, pockets, contacts, seed=0):
    from boltz.data import const
    from boltz.data.feature.featurizerv2 import Boltz2Featurizer

    torch.manual_seed(seed)
    return Boltz2Featurizer().process(
        tokenized, molecules=molecules, random=np.random.default_rng(42), training=False, max_atoms=None,
        max_tokens=None, max_seqs=const.max_msa_seqs, pad_to_max_seqs=False, single_sequence_prop=0.0,
        compute_frames=True, inference_pocket_constraints=pockets, inference_contact_constraints=contacts,
        compute_constraint_features=True, override_method=None, compute_affinity=False)


_SHARED: dict = {}


def shared_features(grid, name, mol_dir):
    """(boltz's features, our Features) of ``INPUTS[name]`` for the MPI tests, made by rank 0 once a session and
    broadcast: every rank would make the same, and 9 ranks featurizing at once held a 2-core machine for seconds
    in every test. Each call returns its own copy."""
    if name not in _SHARED:
        made = None
        if grid.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                tokenized, molecules, pockets, contacts = tokenize(name, mol_dir, Path(tmp))
                ref = reference_features(tokenized, molecules, pockets, contacts)
                torch.manual_seed(0)  # the reference conformers' rotations come from torch's generator
                made = ref, featurize(tokenized, molecules, np.random.default_rng(42), pockets, contacts)
        _SHARED[name] = quiet_bcast(grid, made)
    return copy.deepcopy(_SHARED[name])


def dense_from(features, n_classes):
    """Boltz's dense one-hot forms rebuilt from our index maps (for the comparison only)."""
    atom = features.atom
    n_atoms, n_tokens = features.n_atoms, features.n_tokens
    valid = atom["atom_to_token"] >= 0
    atom_to_token = torch.zeros(n_atoms, n_tokens, dtype=torch.long)
    atom_to_token[torch.nonzero(valid)[:, 0], atom["atom_to_token"][valid]] = 1
    one_hot = torch.nn.functional.one_hot
    out = {
        "atom_to_token": atom_to_token,
        "token_to_rep_atom": one_hot(atom["token_to_rep_atom"], n_atoms),
        "token_to_center_atom": one_hot(atom["token_to_center_atom"], n_atoms),
        "r_set_to_rep_atom": one_hot(atom["r_set_to_rep_atom"], n_atoms),
        "ref_element": one_hot(atom["ref_element"], n_classes["element"]) * atom["atom_pad_mask"].long()[:, None],
        "ref_atom_name_chars": one_hot(atom["ref_atom_name_chars"], 64) * atom["atom_pad_mask"].long()[:, None, None],
        "atom_backbone_feat": one_hot(atom["atom_backbone_feat"], n_classes["backbone"])
        * atom["atom_pad_mask"].long()[:, None],
    }
    return out


SAME_AS_BOLTZ = ["profile", "token_index", "residue_index", "asym_id", "entity_id", "sym_id", "mol_type", "res_type",
                 "disto_center", "token_pad_mask", "token_resolved_mask", "token_disto_mask", "method_feature",
                 "modified", "cyclic_period", "affinity_token_mask"]
ATOM_SAME_AS_BOLTZ = ["ref_pos", "atom_resolved_mask", "ref_charge", "ref_chirality", "ref_space_uid", "coords",
                      "atom_pad_mask", "disto_coords_ensemble", "bfactor", "plddt", "frames_idx",
                      "frame_resolved_mask"]


def mismatches(pairs) -> list[str]:
    """``(key, ours, boltz's)`` triples whose tensors differ in shape, dtype or value, described."""
    return [f"{key}: {tuple(mine.shape)} {mine.dtype} vs {tuple(theirs.shape)} {theirs.dtype}"
            for key, mine, theirs in pairs
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype or not torch.equal(mine, theirs)]


def feature_pairs(ours, ref, token_keys=SAME_AS_BOLTZ) -> list:
    """(key, ours, boltz's) for the token, atom and template features and the dense maps rebuilt from ours."""
    from boltz.data import const

    classes = {"element": const.num_elements, "backbone": ref["atom_backbone_feat"].shape[-1]}
    return ([(key, ours.token[key], ref[key]) for key in token_keys]
            + [(key, ours.atom[key], ref[key]) for key in ATOM_SAME_AS_BOLTZ]
            + [(key, dense, ref[key]) for key, dense in dense_from(ours, classes).items()]
            + [(key, value, ref[key]) for key, value in ours.template.items()])


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_features_equal_boltz_at_p1(name, mol_dir, tmp_path):
    tokenized, molecules, pockets, contacts = tokenize(name, mol_dir, tmp_path)
    ref = reference_features(tokenized, molecules, pockets, contacts)
    torch.manual_seed(0)
    ours = featurize(tokenized, molecules, np.random.default_rng(42), pockets, contacts)

    msa, deletion, paired = ours.msa_block(1, 0, 0)
    problems = mismatches(feature_pairs(ours, ref)
                          + [(key, tile, ref[key]) for key, tile in ours.boltz_pair_tile(1, 0, 0).items()]
                          + [("msa", msa, ref["msa"]), ("msa_paired", paired, ref["msa_paired"]),
                             ("has_deletion", deletion > 0, ref["has_deletion"])])
    assert not problems, problems


def test_the_mixed_input_exercises_bonds_and_constraints(mol_dir, tmp_path):
    tokenized, molecules, pockets, contacts = tokenize("protein_dna_rna_ligand", mol_dir, tmp_path)
    ours = featurize(tokenized, molecules, np.random.default_rng(42), pockets, contacts)
    assert len(ours.bonds) > 10 and ours.any_contact and len(ours.contacts) >= 4
    assert set(ours.token["mol_type"].tolist()) == {0, 1, 2, 3}
    tokenized, molecules, pockets, contacts = tokenize("cyclic_peptide_ions_smiles", mol_dir, tmp_path)
    ours = featurize(tokenized, molecules, np.random.default_rng(42), pockets, contacts)
    assert ours.token["cyclic_period"].max() == 8 and not ours.any_contact


@pytest.mark.mpi
def test_pair_tiles_equal_the_serial_features(grid, mol_dir):
    ref, ours = shared_features(grid, "protein_dna_rna_ligand", mol_dir)
    tiles = ours.boltz_pair_tile(grid.p, grid.row, grid.col)
    ok = all(torch.equal(tiles[k], take_tile(ref[k].unsqueeze(0), grid.p, grid.row, grid.col)[0])
             for k in ("token_bonds", "type_bonds", "contact_conditioning", "contact_threshold"))
    assert everywhere(grid, ok)


def synthetic_templates(n_tokens: int, n_templates: int = 2, seed: int = 0) -> dict:
    """Template features of boltz's shapes with random geometry, masks and visibility (no structure file needed)."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(n_templates, n_tokens, 3, 3, generator=g))[0]
    restype = torch.randint(0, 33, (n_templates, n_tokens), generator=g)
    mask = (torch.rand(n_templates, n_tokens, generator=g) > 0.3).float()
    return {
        "template_restype": torch.nn.functional.one_hot(restype, 33),
        "template_frame_rot": rot,
        "template_frame_t": 10 * torch.randn(n_templates, n_tokens, 3, generator=g),
        "template_cb": 15 * torch.randn(n_templates, n_tokens, 3, generator=g),
        "template_ca": 15 * torch.randn(n_templates, n_tokens, 3, generator=g),
        "template_mask_cb": mask,
        "template_mask_frame": (torch.rand(n_templates, n_tokens, generator=g) > 0.3).float(),
        "template_mask": mask,
        "visibility_ids": torch.randint(-3, 2, (n_templates, n_tokens), generator=g).float(),
    }


def boltz_template_pair_features(template: dict) -> torch.Tensor:
    """The input of ``a_proj`` in boltz's TemplateV2Module, captured with a forward hook: [T, N, N, 109]."""
    from boltz.model.modules.trunkv2 import TemplateV2Module

    module = TemplateV2Module(token_z=8, template_dim=4, template_blocks=1)
    captured = {}
    module.a_proj.register_forward_hook(lambda m, args, out: captured.update(a=args[0]))  # returns None
    n_tokens = template["template_mask"].shape[1]
    feats = {k: v[None] for k, v in template.items()}
    with torch.no_grad():
        module(torch.zeros(1, n_tokens, n_tokens, 8), feats, torch.ones(1, n_tokens, n_tokens))
    return captured["a"][0]


@pytest.mark.parametrize("p", [1, 2, 3])
def test_template_pair_tiles_equal_boltz(p):
    from foldcp_hpc.data.features import template_pair_tile

    n_tokens = 29
    template = synthetic_templates(n_tokens)
    full = boltz_template_pair_features(template)
    for row in range(p):
        for col in range(p):
            assert torch.equal(template_pair_tile(template, p, row, col), take_tile(full, p, row, col)), (p, row, col)
