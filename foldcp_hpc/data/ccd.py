"""CCD molecules for Boltz-2, built offline from biotite's copy of the PDB Chemical Component Dictionary.

Boltz-2 reads every residue and CCD ligand as an RDKit molecule pickled one per file, ``mols/<CODE>.pkl``
(``boltz.data.mol.load_molecules`` / ``load_canonicals``), which ``boltz predict`` downloads as ``mols.tar``.
Nodes here have no network, so this module makes the same files from the CCD that the ``biotite`` package
ships (``biotite/structure/info/components.bcif``, the whole wwPDB CCD: atoms, bonds, charges, leaving-atom
flags, ideal and model coordinates). Nothing is fetched at runtime.

Cache layout (the layout of Boltz's ``mols/`` directory, so ``load_molecules(cache_dir, codes)`` and
``load_canonicals(cache_dir)`` read it as is)::

    <cache_dir>/<CODE>.pkl    one pickled rdkit.Chem.Mol per CCD code (file name = the code, case kept)

What a molecule holds (the form Boltz-2's parser, featurizer and the molecules of ``mols.tar`` have):

* atoms: the CCD's heavy atoms in CCD order (hydrogens removed with ``Chem.RemoveHs``, which keeps only the
  hydrogens RDKit must keep, e.g. deuterium), leaving atoms included (the parser drops them itself);
  atom props ``name`` (CCD ``atom_id``), ``alt_name`` (``alt_atom_id``), ``leaving_atom`` (bool; reads as
  "1"/"0"); formal charges from the CCD; chiral tags and double-bond E/Z from the CCD's 3-D coordinates;
  ``_CIPRank`` on every atom (Boltz's chirality and stereo-bond constraints are computed only when every atom
  has it);
* bonds: CCD orders, sanitized (aromatic rings as AROMATIC bonds, as for SMILES ligands); bonds from an atom
  whose valence a metal overfills are dative (as pdbeccdutils, which Boltz's CCD script uses, makes them);
* one conformer: ETKDGv3 + UFF on the molecule with its hydrogens (Boltz's ``compute_3d``; seeded here, and
  given EMBED_BUDGET_S seconds), named ``Computed``; where embedding fails, the CCD's ideal (else model)
  coordinates, named ``Ideal`` (``Model``). One conformer only: Boltz-2's featurizer takes ``ref_pos`` from
  a *random* conformer of the molecule;
* mol props ``MOL_NAME`` (the code) and, as hex strings of pickled objects: ``symmetries`` (the heavy-atom
  automorphisms, ``GetSubstructMatches(mol, mol, uniquify=False)``), and the constraint arrays that
  ``boltz.data.mol.get_symmetries`` reads (``pb_*``, ``chiral_*``, ``stereo_*``, ``aromatic_*_ring_index``,
  ``planar_double_bond_index``), computed with Boltz's own constraint functions on the stored molecule.

A few CCD entries give an atom more bonds than its charge allows; they are kept, sanitized without RDKit's
valence check, with a warning. Unknown codes raise :class:`CCDError` before anything is written.

Pickles are written with ``Chem.PropertyPickleOptions.AllProps`` (without it RDKit drops every property) and
atomically (a temporary file renamed into place), so that concurrent builders never leave half a file.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CCDError", "build_molecules", "ensure_canonicals", "canonical_codes", "make_molecule"]

EMBED_SEED = 42  # ETKDG seed: Boltz does not seed it; a fixed one makes every rebuild of the cache identical
EMBED_BUDGET_S = 30.0  # ETKDG time for one component (both attempts); Boltz has no limit, but the components
# it cannot embed can take minutes to fail (CHL: over 10), and typical ligands need well under a second
UFF_MAX_ITERS = 1000  # as Boltz's compute_3d
MAX_SANITIZE_FIXES = 10  # rounds of metal-bond fixes before a molecule is declared unsanitizable

_BOND_ORDERS = {"SING": "SINGLE", "DOUB": "DOUBLE", "TRIP": "TRIPLE", "QUAD": "QUADRUPLE"}
_METALS = frozenset(
    "Li Na K Rb Cs Fr Be Mg Ca Sr Ba Ra Sc Ti V Cr Mn Fe Co Ni Cu Zn Al Ga Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn "
    "Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Ac Th Pa U Np Pu Am Cm "
    "Bk Cf Es Fm Md No Lr".split())

# Constraint props read by boltz.data.mol.get_symmetries: name -> (constraint list, field, rows of an empty array).
_CONSTRAINT_PROPS = {
    "pb_edge_index": ("bounds", "atom_idxs", 2),
    "pb_lower_bounds": ("bounds", "lower_bound", None),
    "pb_upper_bounds": ("bounds", "upper_bound", None),
    "pb_bond_mask": ("bounds", "is_bond", None),
    "pb_angle_mask": ("bounds", "is_angle", None),
    "chiral_atom_index": ("chiral", "atom_idxs", 4),
    "chiral_check_mask": ("chiral", "is_reference", None),
    "chiral_atom_orientations": ("chiral", "is_r", None),
    "stereo_bond_index": ("stereo", "atom_idxs", 4),
    "stereo_check_mask": ("stereo", "is_check", None),
    "stereo_bond_orientations": ("stereo", "is_e", None),
    "aromatic_5_ring_index": ("ring5", "atom_idxs", 5),
    "aromatic_6_ring_index": ("ring6", "atom_idxs", 6),
    "planar_double_bond_index": ("planar", "atom_idxs", 6),
}
_FIELD_DTYPES = {"atom_idxs": np.int64, "lower_bound": np.float32, "upper_bound": np.float32}


class CCDError(ValueError):
    """A CCD code that cannot be built: unknown to the dictionary, or a definition RDKit cannot use.

    The message names the code.
    """


@dataclass(frozen=True)
class _Component:
    """One CCD component as the dictionary gives it (N atoms in CCD order, B bonds).

    ``ideal`` / ``model`` are (N, 3) coordinates, or None where the CCD lacks them.
    """

    code: str
    names: list[str]
    alt_names: list[str]
    symbols: list[str]
    charges: list[int]
    leaving: list[bool]
    ideal: np.ndarray | None
    model: np.ndarray | None
    bonds: list[tuple[str, str, str]]


# ------------------------------------------------------------------------------------------------ reading


def _column(category: Any, name: str) -> np.ndarray | None:
    """A CCD column as an array, or None where the column is absent."""
    return None if name not in category else category[name].as_array()


def _present(category: Any, name: str) -> np.ndarray:
    """Mask (N,): True where the column has a value (not '?' or '.')."""
    column = category[name]
    return np.ones(len(column.as_array()), bool) if column.mask is None else column.mask.array == 0


def _coordinates(atoms: Any, template: str) -> np.ndarray | None:
    """(N, 3) coordinates of one CCD coordinate set (template: column name with {} for x/y/z), or None.

    A set is unusable when any value is missing, or when several atoms sit exactly at the origin (the CCD's
    way of writing coordinates it does not have).
    """
    names = [template.format(axis) for axis in "xyz"]
    if any(name not in atoms for name in names) or not all(_present(atoms, name).all() for name in names):
        return None
    xyz = np.stack([atoms[name].as_array().astype(np.float64) for name in names], axis=-1)
    if len(xyz) > 1 and int((np.abs(xyz).sum(axis=-1) == 0).sum()) > 1:
        return None
    return xyz


def _unknown_code(code: str) -> CCDError:
    """The error for a code the CCD lacks (or lists without atoms), with a hint when only the case is wrong."""
    from biotite.structure.info import get_from_ccd

    if get_from_ccd("chem_comp", code) is not None:
        return CCDError(f"CCD code {code!r} has no atoms in biotite's Chemical Component Dictionary")
    hint = ""
    if code != code.upper() and get_from_ccd("chem_comp_atom", code.upper()) is not None:
        hint = f" (CCD codes are upper case: {code.upper()!r})"
    return CCDError(f"unknown CCD code {code!r}: not in biotite's Chemical Component Dictionary{hint}")


def _read_component(code: str) -> _Component:
    """The CCD entry ``code`` from biotite's components.bcif. Raises CCDError for an unknown code."""
    from biotite.structure.info import get_from_ccd

    atoms = get_from_ccd("chem_comp_atom", code) if code else None
    if atoms is None:
        raise _unknown_code(code)
    names = [str(n) for n in atoms["atom_id"].as_array()]
    alt = _column(atoms, "alt_atom_id")
    leaving = _column(atoms, "pdbx_leaving_atom_flag")
    charge_values = atoms["charge"].as_array()
    charge_ok = _present(atoms, "charge")
    bonds: list[tuple[str, str, str]] = []
    bond_rows = get_from_ccd("chem_comp_bond", code)
    if bond_rows is not None:
        bonds = [(str(a), str(b), str(o)) for a, b, o in zip(bond_rows["atom_id_1"].as_array(),
                                                          bond_rows["atom_id_2"].as_array(),
                                                          bond_rows["value_order"].as_array())]
    return _Component(
        code=code,
        names=names,
        alt_names=names if alt is None else [str(n) for n in alt],
        symbols=[str(s) for s in atoms["type_symbol"].as_array()],
        charges=[int(c) if ok else 0 for c, ok in zip(charge_values, charge_ok)],
        leaving=[False] * len(names) if leaving is None else [str(f) == "Y" for f in leaving],
        ideal=_coordinates(atoms, "pdbx_model_Cartn_{}_ideal"),
        model=_coordinates(atoms, "model_Cartn_{}"),
        bonds=bonds,
    )


# ------------------------------------------------------------------------------------------------ building


@contextmanager
def _rdkit_settings() -> Iterator[None]:
    """Quiet RDKit logs and use the legacy stereo perception (which sets the ``_CIPRank`` Boltz reads)."""
    from rdkit import Chem, rdBase

    legacy = Chem.GetUseLegacyStereoPerception()
    blocker = rdBase.BlockLogs()
    Chem.SetUseLegacyStereoPerception(True)
    try:
        yield
    finally:
        Chem.SetUseLegacyStereoPerception(legacy)
        del blocker


def _new_atom(comp: _Component, i: int) -> Any:
    """RDKit atom i of the component with its CCD name, alternative name, leaving flag and charge."""
    from rdkit import Chem

    symbol = comp.symbols[i].strip()
    isotope = 0
    if symbol.upper() == "D":  # deuterium: hydrogen-2, as the CCD spells it
        symbol, isotope = "H", 2
    elif symbol.upper() == "X":  # unknown element: RDKit's dummy atom
        symbol = "*"
    else:
        symbol = symbol[0].upper() + symbol[1:].lower()
    try:
        atom = Chem.Atom(symbol)
    except RuntimeError as exc:
        raise CCDError(f"CCD {comp.code}: atom {comp.names[i]} has element {comp.symbols[i]!r} "
                       f"unknown to RDKit") from exc
    atom.SetIsotope(isotope)
    atom.SetFormalCharge(comp.charges[i])
    atom.SetProp("name", comp.names[i])
    atom.SetProp("alt_name", comp.alt_names[i])
    atom.SetBoolProp("leaving_atom", comp.leaving[i])
    return atom


def _conformer(xyz: np.ndarray, name: str) -> Any:
    """An RDKit conformer of (N, 3) coordinates with the ``name`` prop Boltz's get_conformer looks for."""
    from rdkit import Chem

    conformer = Chem.Conformer(len(xyz))
    conformer.SetPositions(np.ascontiguousarray(xyz, dtype=np.float64))
    conformer.Set3D(True)
    conformer.SetProp("name", name)
    return conformer


def _raw_molecule(comp: _Component) -> Any:
    """The unsanitized RWMol of all N CCD atoms (hydrogens included), its bonds and the CCD conformers."""
    from rdkit import Chem

    mol = Chem.RWMol()
    for i in range(len(comp.names)):
        mol.AddAtom(_new_atom(comp, i))
    index = {name: i for i, name in enumerate(comp.names)}
    for a, b, order in comp.bonds:
        if a not in index or b not in index:
            raise CCDError(f"CCD {comp.code}: bond {a}-{b} names an atom the component does not have")
        if order not in _BOND_ORDERS:
            raise CCDError(f"CCD {comp.code}: bond {a}-{b} has order {order!r}, expected one of "
                           f"{sorted(_BOND_ORDERS)}")
        if mol.GetBondBetweenAtoms(index[a], index[b]) is not None:
            raise CCDError(f"CCD {comp.code}: bond {a}-{b} is listed twice")
        mol.AddBond(index[a], index[b], getattr(Chem.BondType, _BOND_ORDERS[order]))
    # The CCD lists every hydrogen, so a heavy atom without any must not gain implicit ones (RDKit's valence
    # model would add them, e.g. to a metal-bound N); atoms with hydrogens keep it (as in pdbeccdutils).
    for atom in mol.GetAtoms():
        if atom.GetAtomicNum() != 1:
            atom.SetNoImplicit(all(n.GetAtomicNum() != 1 for n in atom.GetNeighbors()))
    for xyz, name in ((comp.ideal, "Ideal"), (comp.model, "Model")):
        if xyz is not None:
            mol.AddConformer(_conformer(xyz, name), assignId=True)
    return mol


def _make_metal_bonds_dative(mol: Any, atom_idx: int) -> bool:
    """Turn the bonds between an over-valent atom and its metal neighbours into dative bonds towards the metal.

    Returns whether any bond changed. Only single bonds are turned (the CCD writes coordination that way).
    """
    from rdkit import Chem

    atom = mol.GetAtomWithIdx(atom_idx)
    changed = False
    for neighbor in list(atom.GetNeighbors()):
        bond = mol.GetBondBetweenAtoms(atom_idx, neighbor.GetIdx())
        if neighbor.GetSymbol() in _METALS and bond.GetBondType() == Chem.BondType.SINGLE:
            mol.RemoveBond(atom_idx, neighbor.GetIdx())
            mol.AddBond(atom_idx, neighbor.GetIdx(), Chem.BondType.DATIVE)
            changed = True
    return changed


def _sanitize(mol: Any, code: str) -> bool:
    """Sanitize ``mol`` in place, making metal coordination bonds dative where they overfill a valence.

    Returns True when RDKit accepts the molecule. A definition RDKit still rejects (a few CCD entries give an
    atom more bonds than its charge allows, e.g. a 4-bonded boron without its -1) is sanitized without the
    valence check, with a warning, and False is returned. Raises CCDError if even that fails.
    """
    from rdkit import Chem

    for _ in range(MAX_SANITIZE_FIXES):
        problems = Chem.DetectChemistryProblems(mol)
        if not problems:
            break
        fixed = False
        for problem in problems:
            if problem.GetType() == "AtomValenceException":
                fixed |= _make_metal_bonds_dative(mol, problem.GetAtomIdx())
        if not fixed:
            break
        mol.UpdatePropertyCache(strict=False)
    try:
        Chem.SanitizeMol(mol)
        return True
    except (ValueError, RuntimeError) as exc:  # RDKit's sanitization exceptions derive from ValueError
        reason = str(exc)
    warnings.warn(f"CCD {code}: RDKit rejects the component ({reason}); it is kept without RDKit's valence "
                  f"check, charges as the CCD gives them", stacklevel=2)
    try:
        mol.UpdatePropertyCache(strict=False)
        Chem.SanitizeMol(mol, Chem.SanitizeFlags.SANITIZE_ALL ^ Chem.SanitizeFlags.SANITIZE_PROPERTIES)
    except (ValueError, RuntimeError) as exc:
        raise CCDError(f"CCD {code}: RDKit cannot sanitize the component: {reason}; {exc}") from exc
    return False


def _assign_stereo(mol: Any) -> None:
    """Chiral tags and double-bond E/Z from the CCD's coordinates: ideal ones, else model ones, else none."""
    from rdkit import Chem

    by_name = {conformer.GetProp("name"): conformer.GetId() for conformer in mol.GetConformers()}
    for name in ("Ideal", "Model"):
        if name in by_name:
            Chem.AssignStereochemistryFrom3D(mol, confId=by_name[name])
            return
    Chem.AssignStereochemistry(mol, cleanIt=True, force=True)


def _embed(mol: Any) -> int:
    """Add an ETKDGv3 conformer to the (hydrogen-complete) molecule as Boltz's compute_3d does; its id or -1.

    Retries from random coordinates where the first embedding fails (as Boltz does for SMILES ligands), both
    attempts within EMBED_BUDGET_S. A UFF failure (no parameters for some atom) keeps the unrelaxed
    embedding, as in Boltz.
    """
    from rdkit.Chem import AllChem

    deadline = time.monotonic() + EMBED_BUDGET_S
    conf_id = -1
    for random_coords in (False, True):
        left = deadline - time.monotonic()
        if left < 1:
            break
        params = AllChem.ETKDGv3()
        params.clearConfs = False
        params.randomSeed = EMBED_SEED
        params.useRandomCoords = random_coords
        params.timeout = max(1, int(left))  # whole seconds
        try:
            conf_id = AllChem.EmbedMolecule(mol, params)
        except (RuntimeError, ValueError):
            conf_id = -1
        if conf_id != -1:
            break
    if conf_id != -1:
        try:
            AllChem.UFFOptimizeMolecule(mol, confId=conf_id, maxIters=UFF_MAX_ITERS)
        except (RuntimeError, ValueError):
            pass  # no UFF parameters for some atom: the embedding itself is still a valid conformer
    return conf_id


def _keep_one_conformer(mol: Any, code: str) -> None:
    """Leave exactly one conformer: ETKDG ``Computed``, else the CCD ``Ideal``, else ``Model`` coordinates.

    Boltz-2's featurizer draws the reference conformer at random among all of them, so any extra one would
    change the input features. A single atom keeps its CCD position (Boltz does not embed those).
    """
    ccd = {conformer.GetProp("name"): conformer.GetId() for conformer in mol.GetConformers()}
    keep = _embed(mol) if mol.GetNumAtoms() > 1 else -1
    if keep != -1:
        conformer = mol.GetConformer(keep)
        conformer.SetProp("name", "Computed")
        conformer.SetProp("coord_generation", "ETKDGv3")
    elif ccd:
        keep = ccd.get("Ideal", ccd.get("Model"))
    elif mol.GetNumAtoms() == 1:  # a lone atom without CCD coordinates: any position is the same reference
        keep = mol.AddConformer(_conformer(np.zeros((1, 3)), "Ideal"), assignId=True)
    else:
        raise CCDError(f"CCD {code}: RDKit cannot embed the component and the CCD gives no coordinates")
    for conformer_id in [c.GetId() for c in mol.GetConformers()]:
        if conformer_id != keep:
            mol.RemoveConformer(conformer_id)


def _hex(value: Any) -> str:
    """A pickled object as the hex string Boltz stores in mol props (read with bytes.fromhex + pickle.loads)."""
    return pickle.dumps(value).hex()


def _symmetries(mol: Any) -> list[list[int]]:
    """The molecule's automorphisms: each a list (N,) mapping atom i to atom p[i] (identity included).

    As Boltz's CCD script computes them (substructure matches of the molecule on itself, at most RDKit's
    default 1000), over all stored atoms: Boltz-2's featurizer indexes them by the molecule's atom order.
    """
    return [list(match) for match in mol.GetSubstructMatches(mol, uniquify=False)]


def _constraint_arrays(mol: Any) -> dict[str, np.ndarray]:
    """The arrays boltz.data.mol.get_symmetries reads, from Boltz's own constraint functions.

    Index arrays are (k, C) int64 over the molecule's atom indices (k = 2, 4, 5 or 6 atoms per constraint),
    the others (C,): bounds float32, masks and orientations bool. These are what Boltz's parser derives from
    the same molecule for a CCD ligand at prediction time.
    """
    from boltz.data.parse.schema import (
        compute_chiral_atom_constraints,
        compute_flatness_constraints,
        compute_geometry_constraints,
        compute_stereo_bond_constraints,
    )

    identity = {i: i for i in range(mol.GetNumAtoms())}
    planar, ring5, ring6 = compute_flatness_constraints(mol, identity)
    lists = {
        "bounds": compute_geometry_constraints(mol, identity),
        "chiral": compute_chiral_atom_constraints(mol, identity),
        "stereo": compute_stereo_bond_constraints(mol, identity),
        "planar": planar,
        "ring5": ring5,
        "ring6": ring6,
    }
    arrays = {}
    for prop, (kind, field, rows) in _CONSTRAINT_PROPS.items():
        dtype = _FIELD_DTYPES.get(field, bool)
        values = [getattr(constraint, field) for constraint in lists[kind]]
        if rows is None:
            arrays[prop] = np.asarray(values, dtype=dtype).reshape(len(values))
        else:  # (C, k) -> (k, C), the layout Boltz concatenates along axis 1
            arrays[prop] = np.asarray(values, dtype=dtype).reshape(len(values), rows).T.copy()
    return arrays


def _finish(mol: Any, code: str, sanitized: bool) -> Any:
    """The stored molecule: hydrogens removed, CIP ranks on every atom, name, symmetries and constraints.

    ``sanitized``: whether RDKit accepted the molecule (else hydrogens are removed without re-sanitizing).
    """
    from rdkit import Chem

    heavy = Chem.RemoveHs(mol, sanitize=sanitized)
    if not sanitized:
        heavy.UpdatePropertyCache(strict=False)
        Chem.SanitizeMol(heavy, Chem.SanitizeFlags.SANITIZE_ALL ^ Chem.SanitizeFlags.SANITIZE_PROPERTIES)
    # RemoveHs drops computed props such as _CIPRank; Boltz computes chirality and stereo-bond constraints
    # only when every atom has one. The tags themselves stay as the 3-D perception set them (cleanIt=False).
    Chem.AssignStereochemistry(heavy, cleanIt=False, force=True, flagPossibleStereoCenters=True)
    heavy.SetProp("MOL_NAME", code)
    heavy.SetProp("symmetries", _hex(_symmetries(heavy)))
    for prop, array in _constraint_arrays(Chem.Mol(heavy)).items():
        heavy.SetProp(prop, _hex(array))
    return heavy


def make_molecule(code: str) -> Any:
    """The Boltz-2 molecule (rdkit.Chem.Mol) for one CCD code, as described in the module docstring.

    Raises CCDError for a code the CCD lacks or a definition RDKit cannot sanitize or place in 3-D; warns
    (and keeps it) for a definition RDKit accepts only without its valence check.
    """
    comp = _read_component(code)
    with _rdkit_settings():
        mol = _raw_molecule(comp)
        sanitized = _sanitize(mol, code)
        _assign_stereo(mol)
        _keep_one_conformer(mol, code)
        return _finish(mol.GetMol(), code, sanitized)


# ------------------------------------------------------------------------------------------------ cache


def _write_pickle(mol: Any, path: Path) -> None:
    """Pickle ``mol`` with all its properties to ``path`` atomically (temporary file, then rename)."""
    from rdkit import Chem

    previous = Chem.GetDefaultPickleProperties()
    Chem.SetDefaultPickleProperties(Chem.PropertyPickleOptions.AllProps)
    try:
        data = pickle.dumps(mol)
    finally:
        Chem.SetDefaultPickleProperties(previous)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_codes(codes: Iterable[str]) -> list[str]:
    """The codes as a list without repeats (first occurrence kept); a bare string is refused."""
    if isinstance(codes, (str, bytes)):
        raise TypeError(f"codes must be an iterable of CCD codes, not the single string {codes!r}; "
                        f"pass [{codes!r}]")
    checked = []
    for code in codes:
        if not isinstance(code, str):
            raise TypeError(f"CCD codes must be str, got {type(code).__name__} {code!r}")
        if not code or any(c.isspace() for c in code) or "/" in code or code.startswith("."):
            raise CCDError(f"invalid CCD code {code!r}: codes are non-empty names without spaces or '/'")
        if code not in checked:
            checked.append(code)
    return checked


def build_molecules(codes: Iterable[str], cache_dir: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Make ``<cache_dir>/<CODE>.pkl`` for each code, skipping existing files unless ``overwrite``.

    Returns code -> path for every requested code (built now or already there). All codes are checked
    against the CCD before anything is written, so an unknown code (CCDError, a ValueError naming it) leaves
    the cache untouched.
    """
    from biotite.structure.info import get_from_ccd

    codes = _check_codes(codes)
    for code in codes:
        if get_from_ccd("chem_comp_atom", code) is None:
            raise _unknown_code(code)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for code in codes:
        path = cache / f"{code}.pkl"
        if overwrite or not path.exists():
            _write_pickle(make_molecule(code), path)
        paths[code] = path
    return paths


def canonical_codes() -> list[str]:
    """The residues Boltz-2 reads from its molecule directory for any polymer (order kept, no repeats).

    ``boltz.data.const.canonical_tokens`` (the 20 amino acids and UNK, loaded by load_canonicals) followed
    by the other residue tokens of ``const.tokens``: the standard nucleotides A G C U N DA DG DC DT DN, which
    the parser loads from the same directory for every DNA or RNA chain.
    """
    from boltz.data import const

    codes = list(const.canonical_tokens)
    codes += [t for t in const.tokens if t not in codes and t not in ("<pad>", "-")]
    return codes


def ensure_canonicals(cache_dir: str | Path) -> None:
    """Build (where missing) every molecule boltz.data.mol.load_canonicals needs, and the standard nucleotides.

    See :func:`canonical_codes`.
    """
    build_molecules(canonical_codes(), cache_dir)
