"""CCD molecules built offline from biotite's CCD: Boltz's loaders read them and Boltz's parser accepts them.

Every expectation about the CCD is read from biotite's dictionary directly (not from the module under test).
No MPI, no network.
"""

from __future__ import annotations

import pickle
import textwrap

import numpy as np
import pytest

from foldcp_hpc.data.ccd import CCDError, build_molecules, canonical_codes, ensure_canonicals, make_molecule

pytest.importorskip("boltz")
pytest.importorskip("biotite")
Chem = pytest.importorskip("rdkit.Chem")

EXTRA = ["ALA", "GLY", "DA", "U", "MSE", "SEP", "ATP", "HEM", "SAH", "ZN"]


def ccd_atoms(code):
    """(names, elements, charges, leaving flags) of the CCD's heavy atoms of ``code``, in CCD order."""
    from biotite.structure.info import get_from_ccd

    atoms = get_from_ccd("chem_comp_atom", code)
    rows = [(str(n), str(e), int(c), str(f) == "Y") for n, e, c, f in zip(
        atoms["atom_id"].as_array(), atoms["type_symbol"].as_array(), atoms["charge"].as_array(),
        atoms["pdbx_leaving_atom_flag"].as_array()) if str(e) not in ("H", "D")]
    return [list(column) for column in zip(*rows)]


def ccd_heavy_bonds(code):
    """{frozenset(name1, name2): CCD order} for the bonds between heavy atoms of ``code``."""
    from biotite.structure.info import get_from_ccd

    heavy = set(ccd_atoms(code)[0])
    bonds = get_from_ccd("chem_comp_bond", code)
    return {frozenset((str(a), str(b))): str(o) for a, b, o in zip(
        bonds["atom_id_1"].as_array(), bonds["atom_id_2"].as_array(), bonds["value_order"].as_array())
        if str(a) in heavy and str(b) in heavy}


def element_number(symbol):
    return Chem.GetPeriodicTable().GetAtomicNumber(symbol[0] + symbol[1:].lower())


@pytest.fixture(scope="module")
def mol_dir(tmp_path_factory):
    """A cache with the canonical residues and EXTRA, built once for the module."""
    directory = tmp_path_factory.mktemp("mols")
    ensure_canonicals(directory)
    build_molecules(EXTRA, directory)
    return directory


@pytest.fixture(scope="module")
def mols(mol_dir):
    from boltz.data.mol import load_molecules

    return load_molecules(str(mol_dir), EXTRA)


def test_cache_layout_and_boltz_loaders(mol_dir):
    from boltz.data import const
    from boltz.data.mol import load_canonicals

    assert sorted(p.name for p in mol_dir.glob("*.pkl")) == sorted(f"{c}.pkl" for c in set(canonical_codes() + EXTRA))
    assert not list(mol_dir.glob(".*")), "temporary files left behind"
    canonicals = load_canonicals(str(mol_dir))
    assert list(canonicals) == list(const.canonical_tokens)
    assert all(code in canonical_codes() for code in ("DA", "DC", "DG", "DT", "A", "C", "G", "U", "N", "DN"))


@pytest.mark.parametrize("code", EXTRA)
def test_atoms_are_the_ccd_heavy_atoms(mols, code):
    names, elements, charges, leaving = ccd_atoms(code)
    mol = mols[code]
    assert [a.GetProp("name") for a in mol.GetAtoms()] == names
    assert [a.GetAtomicNum() for a in mol.GetAtoms()] == [element_number(e) for e in elements]
    assert [a.GetFormalCharge() for a in mol.GetAtoms()] == charges
    assert [bool(int(a.GetProp("leaving_atom"))) for a in mol.GetAtoms()] == leaving  # Boltz reads int(GetProp)
    assert all(a.HasProp("alt_name") for a in mol.GetAtoms())
    assert mol.GetProp("MOL_NAME") == code


@pytest.mark.parametrize("code", ["ALA", "SEP", "ATP", "SAH", "DA", "U"])
def test_bonds_are_the_ccd_bonds(mols, code):
    mol = mols[code]
    got = {frozenset((b.GetBeginAtom().GetProp("name"), b.GetEndAtom().GetProp("name"))): b for b in mol.GetBonds()}
    want = ccd_heavy_bonds(code)
    assert set(got) == set(want)
    orders = {"SING": Chem.BondType.SINGLE, "DOUB": Chem.BondType.DOUBLE, "TRIP": Chem.BondType.TRIPLE}
    for pair, order in want.items():
        if not got[pair].GetIsAromatic():  # aromatic rings are perceived by sanitization, as for SMILES ligands
            assert got[pair].GetBondType() == orders[order], sorted(pair)


def test_metal_coordination_is_dative(mols):
    """HEM's NB and ND (double-bonded in the CCD's Kekule form) would be 4-valent: their Fe bonds turn dative."""
    heme = mols["HEM"]
    fe = next(a for a in heme.GetAtoms() if a.GetSymbol() == "Fe")
    bonds = {b.GetOtherAtom(fe).GetProp("name"): b.GetBondType() for b in fe.GetBonds()}
    single, dative = Chem.BondType.SINGLE, Chem.BondType.DATIVE
    assert bonds == {"NA": single, "NB": dative, "NC": single, "ND": dative}


@pytest.mark.parametrize("code", ["ALA", "GLY", "SEP", "ATP", "HEM"])
def test_one_computed_conformer(mols, code):
    (conformer,) = mols[code].GetConformers()  # the featurizer samples among all conformers
    assert conformer.GetProp("name") == "Computed"
    assert conformer.Is3D()
    xyz = conformer.GetPositions()
    assert np.isfinite(xyz).all()
    distances = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)[np.triu_indices(len(xyz), 1)]
    assert distances.min() > 0.9, f"{code}: atoms {distances.min():.2f} A apart"


def test_single_atom_keeps_its_ccd_position(mols):
    from biotite.structure.info import get_from_ccd

    (conformer,) = mols["ZN"].GetConformers()
    atoms = get_from_ccd("chem_comp_atom", "ZN")
    ideal = [float(atoms[f"pdbx_model_Cartn_{axis}_ideal"].as_array()[0]) for axis in "xyz"]
    assert conformer.GetProp("name") == "Ideal"
    np.testing.assert_allclose(conformer.GetPositions()[0], ideal)


@pytest.mark.parametrize("code", ["ALA", "SEP", "SAH", "DA", "U"])
def test_stereo_matches_the_ccd(mols, code):
    """Every CCD R/S centre has that CIP label, in the tags and in the computed conformer's geometry."""
    from biotite.structure.info import get_from_ccd

    atoms = get_from_ccd("chem_comp_atom", code)
    want = {str(n): str(s) for n, s in zip(atoms["atom_id"].as_array(), atoms["pdbx_stereo_config"].as_array())
            if str(s) in "RS"}
    mol = Chem.Mol(mols[code])
    tags = {a.GetProp("name"): a.GetProp("_CIPCode") for a in mol.GetAtoms() if a.HasProp("_CIPCode")}
    Chem.AssignStereochemistryFrom3D(mol)
    geometry = {a.GetProp("name"): a.GetProp("_CIPCode") for a in mol.GetAtoms() if a.HasProp("_CIPCode")}
    assert want and {n: tags.get(n) for n in want} == want
    assert {n: geometry.get(n) for n in want} == want


@pytest.mark.parametrize("code", EXTRA)
def test_properties_survive_pickling(mols, code):
    from boltz.data.mol import get_symmetries

    mol = mols[code]
    n = mol.GetNumAtoms()
    if n > 1:
        assert all(a.HasProp("_CIPRank") for a in mol.GetAtoms())  # else Boltz computes no chiral constraints
    symmetries = pickle.loads(bytes.fromhex(mol.GetProp("symmetries")))
    assert list(range(n)) in symmetries
    assert all(sorted(p) == list(range(n)) for p in symmetries)
    entry = get_symmetries({code: mol})[code]  # decodes every constraint prop the featurizer reads
    edge_index, chiral_index = entry[2], entry[7]
    assert edge_index.shape[0] == 2 and chiral_index.shape[0] == 4
    assert edge_index.size == 0 or edge_index.max() < n


def test_symmetries_swap_equivalent_atoms(mols):
    sep = mols["SEP"]  # phosphate P(=O1P)(-O2P-H)(-O3P-H): only O2P and O3P are interchangeable
    names = [a.GetProp("name") for a in sep.GetAtoms()]
    permutations = pickle.loads(bytes.fromhex(sep.GetProp("symmetries")))
    moved = sorted(sorted(names[i] for i, j in enumerate(p) if i != j) for p in permutations)
    assert moved == [[], ["O2P", "O3P"]]


YAML = """
    version: 1
    sequences:
      - protein:
          id: A
          sequence: MAGSAKW
          msa: empty
          modifications:
            - position: 4
              ccd: SEP
      - dna:
          id: B
          sequence: GATTACA
      - rna:
          id: C
          sequence: ACGU
      - ligand:
          id: D
          ccd: ATP
      - ligand:
          id: E
          ccd: ZN
"""


def test_parse_yaml_and_featurize_with_built_molecules_only(mol_dir, tmp_path):
    """boltz's parse_yaml, tokenizer and featurizer on protein + DNA + RNA + ligands, molecules from mol_dir only."""
    from boltz.data import const
    from boltz.data.feature.featurizerv2 import Boltz2Featurizer
    from boltz.data.mol import load_canonicals, load_molecules
    from boltz.data.parse.yaml import parse_yaml
    from boltz.data.tokenize.boltz2 import Boltz2Tokenizer
    from boltz.data.types import Input

    path = tmp_path / "input.yaml"
    path.write_text(textwrap.dedent(YAML))
    canonicals = load_canonicals(str(mol_dir))
    target = parse_yaml(path, canonicals, str(mol_dir), True)
    tokenized = Boltz2Tokenizer().tokenize(Input(
        structure=target.structure, msa={}, record=target.record, residue_constraints=target.residue_constraints,
        templates=target.templates, extra_mols=target.extra_mols))
    molecules = dict(canonicals)
    molecules.update(load_molecules(str(mol_dir), set(tokenized.tokens["res_name"].tolist()) - set(molecules)))
    features = Boltz2Featurizer().process(
        tokenized, molecules=molecules, random=np.random.default_rng(0), training=False, max_seqs=1,
        compute_frames=True, compute_constraint_features=True)
    elements = features["ref_element"].argmax(-1).numpy()
    structure = target.structure

    def residue_atoms(chain_name, res_name):
        """(names, elements) of the first residue ``res_name`` of chain ``chain_name``, as parsed and featurized."""
        chain = next(c for c in structure.chains if c["name"] == chain_name)
        residues = structure.residues[chain["res_idx"]: chain["res_idx"] + chain["res_num"]]
        residue = next(r for r in residues if r["name"] == res_name)
        start, stop = residue["atom_idx"], residue["atom_idx"] + residue["atom_num"]
        return [str(n) for n in structure.atoms["name"][start:stop]], elements[start:stop].tolist()

    for chain_name, res_name in [("A", "ALA"), ("A", "SEP"), ("B", "DA"), ("C", "U")]:
        names, symbols, _, leaving = ccd_atoms(res_name)
        kept = [(n, element_number(e)) for n, e, out in zip(names, symbols, leaving) if not out]
        # polymer residues: the CCD's heavy atoms in CCD order, leaving atoms (OXT, OP3) dropped
        assert list(zip(*residue_atoms(chain_name, res_name))) == kept, res_name
    names, symbols, _, _ = ccd_atoms("ATP")
    assert list(zip(*residue_atoms("D", "ATP"))) == [(n, element_number(e)) for n, e in zip(names, symbols)]
    assert residue_atoms("E", "ZN") == (["ZN"], [30])
    assert features["chiral_atom_index"].shape[1] > 0  # the ligand's chirality constraints (needs _CIPRank)
    assert features["ref_pos"].shape[0] == features["atom_pad_mask"].shape[0]


def test_unknown_code_raises_naming_it(tmp_path):
    with pytest.raises(CCDError, match="ZZZQ9") as info:
        build_molecules(["ALA", "ZZZQ9"], tmp_path)
    assert isinstance(info.value, ValueError)
    assert not list(tmp_path.iterdir()), "nothing is written when a code is unknown"
    with pytest.raises(CCDError, match="'ALA'"):
        build_molecules(["ala"], tmp_path)  # the message suggests the upper-case code
    with pytest.raises(TypeError, match="single string"):
        build_molecules("ALA", tmp_path)


def test_existing_files_kept_unless_overwrite(tmp_path):
    from boltz.data.mol import load_molecules

    stale = tmp_path / "GLY.pkl"
    stale.write_bytes(b"not a pickle")
    paths = build_molecules(["GLY", "GLY"], tmp_path)
    assert paths == {"GLY": stale} and stale.read_bytes() == b"not a pickle"
    build_molecules(["GLY"], tmp_path, overwrite=True)
    assert load_molecules(str(tmp_path), ["GLY"])["GLY"].GetNumAtoms() == 5


def test_rebuilds_are_identical():
    first, second = make_molecule("SAH"), make_molecule("SAH")
    np.testing.assert_array_equal(first.GetConformer().GetPositions(), second.GetConformer().GetPositions())
    assert first.GetProp("symmetries") == second.GetProp("symmetries")


def test_entry_rdkit_rejects_is_kept_with_a_warning():
    """QT4's boron has four bonds and no charge in the CCD: kept (valence check skipped), parsable, warned."""
    from boltz.data.parse.schema import parse_ccd_residue

    with pytest.warns(UserWarning, match="QT4"):
        mol = make_molecule("QT4")
    names, _, _, _ = ccd_atoms("QT4")
    assert [a.GetProp("name") for a in mol.GetAtoms()] == names
    assert len(parse_ccd_residue("QT4", mol, 0).atoms) == len(names)
