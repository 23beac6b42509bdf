"""Prediction files against boltz 2.2.1's own ``BoltzWriter``: same names, same bytes, same arrays.

A structure parsed with boltz's parser (two proteins, two zinc ions and a SMILES ligand, so that ligand atoms
are tokens of their own) gets random coordinates and confidences for two samples; ``write_predictions`` and
Boltz's writer (fed the prediction dict ``boltz predict`` hands it) write into two folders that must agree.
The files are then read back with biotite (and gemmi where importable).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from foldcp_hpc.io.predictions import UNTRAINED_NOTE, count_tokens, write_predictions
from test_features import mol_dir, tokenize  # noqa: F401 - mol_dir is a fixture

INPUT = "cyclic_peptide_ions_smiles"
SAMPLES = 2
PAD_ATOMS, PAD_TOKENS = 7, 3  # padding past the structure, which the writer must ignore
SCALAR_KEYS = ["confidence_score", "ptm", "iptm", "ligand_iptm", "protein_iptm", "complex_plddt",
               "complex_iplddt", "complex_pde", "complex_ipde"]
BOLTZ2_JSON_KEYS = [*SCALAR_KEYS, "chains_ptm", "pair_chains_iptm"]
SCORES = [0.25, 0.75]  # sample 1 ranks first: model_0 is sample 1, model_1 sample 0


@pytest.fixture(scope="module")
def case(mol_dir, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """The tokenized input and a random prediction for it: coords [S, M + pad, 3], plddt [S, N + pad],
    pae / pde [S, N + pad, N + pad] and S confidence dicts."""
    tokenized = tokenize(INPUT, mol_dir, tmp_path_factory.mktemp("input"))[0]
    structure = tokenized.structure
    n_atoms, n_tokens = len(structure.atoms), len(tokenized.tokens)
    n_chains = len(structure.chains)
    rng = np.random.default_rng(7)
    confidence = []
    for score in SCORES:
        pairs = {i: {j: float(rng.random()) for j in range(n_chains)} for i in range(n_chains)}
        values = {key: float(rng.random()) for key in SCALAR_KEYS}
        values["confidence_score"] = score
        values["chains_ptm"] = {i: pairs[i][i] for i in range(n_chains)}
        values["pair_chains_iptm"] = pairs
        confidence.append(values)
    return {
        "tokenized": tokenized, "n_atoms": n_atoms, "n_tokens": n_tokens,
        "coords": (rng.standard_normal((SAMPLES, n_atoms + PAD_ATOMS, 3)) * 10).astype(np.float32),
        "plddt": rng.random((SAMPLES, n_tokens + PAD_TOKENS)).astype(np.float32),
        "pae": (rng.random((SAMPLES, n_tokens + PAD_TOKENS, n_tokens + PAD_TOKENS)) * 30).astype(np.float32),
        "pde": (rng.random((SAMPLES, n_tokens + PAD_TOKENS, n_tokens + PAD_TOKENS)) * 30).astype(np.float32),
        "confidence": confidence,
    }


def ours(case, out_dir, **options):
    return write_predictions(out_dir, INPUT, case["tokenized"].structure, case["coords"], case["plddt"],
                             case["confidence"], pae=case["pae"], pde=case["pde"], **options)


def boltz_writes(case, out_dir, data_dir, output_format):
    """boltz's BoltzWriter on the prediction dict Boltz-2's predict_step returns for this input."""
    from boltz.data.write.writer import BoltzWriter

    record = case["tokenized"].record
    case["tokenized"].structure.dump(data_dir / f"{record.id}.npz")
    m, n = case["n_atoms"], case["n_tokens"]
    per_sample = {key: torch.tensor([c[key] for c in case["confidence"]], dtype=torch.float32)
                  for key in SCALAR_KEYS}
    pairs = case["confidence"][0]["pair_chains_iptm"]
    prediction = {
        "exception": False,
        "coords": torch.from_numpy(case["coords"]),
        "masks": (torch.arange(m + PAD_ATOMS) < m).unsqueeze(0),
        "plddt": torch.from_numpy(case["plddt"][:, :n]),
        "pae": torch.from_numpy(case["pae"][:, :n, :n]),
        "pde": torch.from_numpy(case["pde"][:, :n, :n]),
        "pair_chains_iptm": {i: {j: torch.tensor([c["pair_chains_iptm"][i][j] for c in case["confidence"]],
                                                 dtype=torch.float32) for j in pairs[i]} for i in pairs},
        **per_sample,
    }
    writer = BoltzWriter(str(data_dir), str(out_dir), output_format=output_format, boltz2=True)
    writer.write_on_batch_end(None, None, prediction, [0], {"record": [record]}, 0, 0)


@pytest.mark.parametrize("output_format", ["mmcif", "pdb"])
def test_same_files_as_boltz_writer(case, tmp_path, output_format):
    paths = ours(case, tmp_path / "ours", output_format=output_format)
    boltz_writes(case, tmp_path / "boltz" / "predictions", tmp_path, output_format)
    ours_dir, boltz_dir = tmp_path / "ours" / "predictions" / INPUT, tmp_path / "boltz" / "predictions" / INPUT
    suffix = "cif" if output_format == "mmcif" else "pdb"
    expected = {f"{prefix}{INPUT}_model_{k}.{ext}" for k in range(SAMPLES)
                for prefix, ext in [("", suffix), ("confidence_", "json"), ("plddt_", "npz"), ("pae_", "npz"),
                                    ("pde_", "npz")]}
    assert {p.name for p in boltz_dir.iterdir()} == expected
    assert sorted(p.name for p in paths) == sorted(expected)
    assert all(p.parent == ours_dir and p.is_file() for p in paths)
    for name in sorted(expected):
        if name.endswith(".npz"):
            key = name.split("_")[0]
            with np.load(ours_dir / name) as mine, np.load(boltz_dir / name) as theirs:
                assert list(mine.keys()) == list(theirs.keys()) == [key], name
                assert mine[key].dtype == theirs[key].dtype and np.array_equal(mine[key], theirs[key]), name
        else:
            assert (ours_dir / name).read_bytes() == (boltz_dir / name).read_bytes(), name


def test_ranking_and_json(case, tmp_path):
    ours(case, tmp_path)
    folder = tmp_path / "predictions" / INPUT
    n = case["n_tokens"]
    assert count_tokens(case["tokenized"].structure) == n
    for rank, sample in enumerate(np.argsort(SCORES)[::-1]):
        summary = json.loads((folder / f"confidence_{INPUT}_model_{rank}.json").read_text())
        assert list(summary) == BOLTZ2_JSON_KEYS
        assert summary["confidence_score"] == float(np.float32(SCORES[sample]))
        chains = [str(i) for i in range(len(case["tokenized"].structure.chains))]
        assert list(summary["chains_ptm"]) == chains and list(summary["pair_chains_iptm"]) == chains
        assert all(summary["chains_ptm"][i] == summary["pair_chains_iptm"][i][i] for i in chains)
        with np.load(folder / f"plddt_{INPUT}_model_{rank}.npz") as saved:
            plddt = saved["plddt"]
        assert plddt.shape == (n,) and 0.0 <= plddt.min() and plddt.max() <= 1.0
        assert np.array_equal(plddt, case["plddt"][sample, :n])
        with np.load(folder / f"pae_{INPUT}_model_{rank}.npz") as saved:
            assert np.array_equal(saved["pae"], case["pae"][sample, :n, :n])


def expected_bfactors(case, sample, decimals):
    """Per atom: 100 x the pLDDT of its token, rounded as boltz's to_mmcif (3) / to_pdb (2) do."""
    tokens = case["tokenized"].tokens
    atom_to_token = np.repeat(np.arange(len(tokens)), tokens["atom_num"])
    plddt = torch.from_numpy(case["plddt"][sample])
    return [round(plddt[t].item() * 100, decimals) for t in atom_to_token]


def test_mmcif_reads_back(case, tmp_path):
    from biotite.structure.io.pdbx import CIFFile, get_structure

    ours(case, tmp_path)
    sample = int(np.argmax(SCORES))
    path = tmp_path / "predictions" / INPUT / f"{INPUT}_model_0.cif"
    cif = CIFFile.read(str(path))
    atoms = get_structure(cif, model=1, extra_fields=["b_factor"], use_author_fields=False)
    assert len(atoms) == case["n_atoms"]
    assert np.allclose(atoms.coord, case["coords"][sample, :case["n_atoms"]], atol=1e-5)
    expected = expected_bfactors(case, sample, 3)
    written = cif.block["atom_site"]["B_iso_or_equiv"].as_array(str)
    assert list(written) == [f"{b:.3f}" for b in expected]
    assert np.allclose(atoms.b_factor, expected, atol=1e-3)
    assert "pdbx_model_details" not in cif.block["struct"] or cif.block["struct"]["pdbx_model_details"].mask


def test_pdb_reads_back(case, tmp_path):
    from biotite.structure.io.pdb import PDBFile

    ours(case, tmp_path, output_format="pdb")
    sample = int(np.argmax(SCORES))
    atoms = PDBFile.read(str(tmp_path / "predictions" / INPUT / f"{INPUT}_model_0.pdb")).get_structure(
        model=1, extra_fields=["b_factor"])
    assert len(atoms) == case["n_atoms"]
    assert np.allclose(atoms.coord, case["coords"][sample, :case["n_atoms"]], atol=1e-3)
    assert np.allclose(atoms.b_factor, expected_bfactors(case, sample, 2), atol=1e-6)


def test_untrained_marks(case, tmp_path):
    from biotite.structure.io.pdb import PDBFile
    from biotite.structure.io.pdbx import CIFFile, get_structure

    trained = ours(case, tmp_path / "trained")
    paths = ours(case, tmp_path / "untrained", untrained=True)
    assert [p.name for p in paths] == [p.name for p in trained]
    folder = tmp_path / "untrained" / "predictions" / INPUT
    for rank in range(SAMPLES):
        summary = json.loads((folder / f"confidence_{INPUT}_model_{rank}.json").read_text())
        assert list(summary) == [*BOLTZ2_JSON_KEYS, "untrained_weights"] and summary["untrained_weights"] is True
        cif_path = folder / f"{INPUT}_model_{rank}.cif"
        assert f"# {UNTRAINED_NOTE}" in cif_path.read_text()
        cif = CIFFile.read(str(cif_path))
        assert cif.block["struct"]["pdbx_model_details"].as_item() == UNTRAINED_NOTE
        assert len(get_structure(cif, model=1, use_author_fields=False)) == case["n_atoms"]
    pdb_paths = ours(case, tmp_path / "pdb", output_format="pdb", untrained=True)
    pdb_path = next(p for p in pdb_paths if p.suffix == ".pdb")
    remarks = [line[11:].strip() for line in pdb_path.read_text().splitlines() if line.startswith("REMARK 999")]
    assert " ".join(remarks) == UNTRAINED_NOTE
    assert len(PDBFile.read(str(pdb_path)).get_structure(model=1)) == case["n_atoms"]


def test_gemmi_reads_back(case, tmp_path):
    gemmi = pytest.importorskip("gemmi")

    ours(case, tmp_path / "cif", untrained=True)
    ours(case, tmp_path / "pdb", output_format="pdb")
    cif_path = tmp_path / "cif" / "predictions" / INPUT / f"{INPUT}_model_0.cif"
    assert gemmi.cif.read(str(cif_path)).sole_block().find_value("_struct.pdbx_model_details") == \
        gemmi.cif.quote(UNTRAINED_NOTE)
    expected = expected_bfactors(case, int(np.argmax(SCORES)), 3)
    for path in (cif_path, tmp_path / "pdb" / "predictions" / INPUT / f"{INPUT}_model_0.pdb"):
        model = gemmi.read_structure(str(path))[0]
        b_factors = [atom.b_iso for chain in model for residue in chain for atom in residue]
        assert len(b_factors) == case["n_atoms"]
        assert np.allclose(b_factors, expected, atol=0.006)


def test_bad_arguments_name_the_numbers(case, tmp_path):
    structure, m, n = case["tokenized"].structure, case["n_atoms"], case["n_tokens"]
    with pytest.raises(ValueError, match=f"M >= {m}"):
        write_predictions(tmp_path, INPUT, structure, case["coords"][:, :m - 1], case["plddt"], case["confidence"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_predictions(tmp_path, INPUT, structure, case["coords"], case["plddt"] * 100, case["confidence"])
    with pytest.raises(ValueError, match=f"N >= {n}"):
        write_predictions(tmp_path, INPUT, structure, case["coords"], case["plddt"][:, :n - 1], case["confidence"])
    with pytest.raises(ValueError, match="1 dicts for 2 samples"):
        write_predictions(tmp_path, INPUT, structure, case["coords"], case["plddt"], case["confidence"][:1])
    with pytest.raises(ValueError, match="output_format 'npz'"):
        write_predictions(tmp_path, INPUT, structure, case["coords"], case["plddt"], case["confidence"],
                          output_format="npz")
    assert not (tmp_path / "predictions").exists()


@pytest.mark.parametrize("ensemble", [False, True])
def test_affinity_json_as_boltz_writes_it(tmp_path, ensemble):
    from types import SimpleNamespace

    from boltz.data.write.writer import BoltzAffinityWriter

    from foldcp_hpc.io.predictions import write_affinity

    values = {"affinity_pred_value": torch.tensor([[0.123456789]]),
              "affinity_probability_binary": torch.tensor([[0.87654321]])}
    if ensemble:
        values.update({"affinity_pred_value1": torch.tensor([[-1.5]]), "affinity_probability_binary1": torch.tensor([[0.25]]),
                       "affinity_pred_value2": torch.tensor([[2.0 / 3]]), "affinity_probability_binary2": torch.tensor([[1e-7]])})
    ours = write_affinity(tmp_path / "ours", "lig", values)
    (tmp_path / "boltz").mkdir()
    writer = BoltzAffinityWriter(data_dir=str(tmp_path), output_dir=str(tmp_path / "boltz"))
    writer.write_on_batch_end(None, None, {"exception": False, **values}, None,
                              {"record": [SimpleNamespace(id="lig")]}, 0, 0)
    assert ours.read_bytes() == (tmp_path / "boltz" / "lig" / "affinity_lig.json").read_bytes()
    marked = json.loads(write_affinity(tmp_path / "marked", "lig", values, untrained=True).read_text())
    assert list(marked)[-1] == "untrained_weights" and marked["untrained_weights"] is True
    with pytest.raises(ValueError, match="affinity_probability_binary"):
        write_affinity(tmp_path / "bad", "lig", {"affinity_pred_value": 1.0})
