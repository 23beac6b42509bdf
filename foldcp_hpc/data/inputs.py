"""Reading a Boltz input (YAML or FASTA) with every mistake reported as one line naming the file and field.

The input is checked field by field before boltz's own parser sees it (boltz's errors are a KeyError or a
traceback deep inside its schema code); what passes is parsed with ``boltz.data.parse.schema`` and the CCD
molecules it needs are built offline from biotite's CCD (:mod:`.ccd`) into a cache folder.

Field names in messages follow the file: ``sequences[2].protein.sequence``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Iterable

from ..errors import UniformError

__all__ = ["InputError", "ParsedInput", "read_schema", "check_schema", "parse_input"]

DNA_LETTERS = set("ACGTN")
RNA_LETTERS = set("ACGUN")
KINDS = ("protein", "dna", "rna", "ligand")


class InputError(UniformError):
    """A bad input file; the message is one line that names the file and the field."""


@dataclasses.dataclass
class ParsedInput:
    """A parsed input: boltz's ``Target`` and every CCD molecule its residues need."""

    path: Path
    target: Any
    molecules: dict[str, Any]


def read_schema(path: str | Path) -> dict[str, Any]:
    """The input as a Boltz schema dict: YAML as written, FASTA converted (``>ID|TYPE|MSA``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise InputError(f"{path}: not valid YAML: {getattr(exc, 'problem', exc)}{where}") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping with 'sequences' at the top, got {type(data).__name__}")
        return data
    if suffix in (".fasta", ".fa", ".faa"):
        return _fasta_schema(path)
    raise InputError(f"{path}: unsupported input type {suffix!r}; use a Boltz .yaml or a .fasta file")


def _fasta_schema(path: Path) -> dict[str, Any]:
    records: list[tuple[str, list[str]]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith(">"):
            records.append((line[1:].strip(), []))
        elif line.strip():
            if not records:
                raise InputError(f"{path}: line {number}: sequence before any '>' header")
            records[-1][1].append(line.strip())
    if not records:
        raise InputError(f"{path}: no records (expected '>ID|TYPE|MSA' headers)")
    return {"version": 1, "sequences": [_fasta_entry(path, header, "".join(lines)) for header, lines in records]}


def _fasta_entry(path: Path, header: str, sequence: str) -> dict[str, Any]:
    fields = header.split("|")
    if len(fields) < 2:
        raise InputError(f"{path}: header '>{header}': expected '>ID|TYPE' or '>ID|protein|MSA'")
    chain, kind = fields[0].strip(), fields[1].strip().lower()
    if kind in ("protein", "dna", "rna"):
        entry: dict[str, Any] = {"id": chain, "sequence": sequence}
        if kind == "protein" and len(fields) > 2 and fields[2].strip():
            entry["msa"] = fields[2].strip()
        return {kind: entry}
    if kind in ("ccd", "smiles"):
        return {"ligand": {"id": chain, kind: sequence}}
    raise InputError(f"{path}: header '>{header}': unknown type {kind!r} (protein, dna, rna, ccd, smiles)")


def check_schema(path: Path, data: dict[str, Any], ccd_codes: Iterable[str] | None = None) -> list[str]:
    """Check an input schema; return the CCD codes it needs (ligands and modifications). Raises InputError.

    ``ccd_codes``: known codes (default: every code in biotite's CCD).
    """
    from boltz.data import const

    known = set(ccd_codes) if ccd_codes is not None else None
    protein_letters = set(const.prot_letter_to_token)
    sequences = data.get("sequences")
    if not isinstance(sequences, list) or not sequences:
        raise InputError(f"{path}: sequences: expected a non-empty list of protein / dna / rna / ligand entries")
    unknown_top = sorted(set(data) - {"version", "sequences", "constraints", "templates", "properties"})
    if unknown_top:
        raise InputError(f"{path}: unknown top-level field {unknown_top[0]!r} "
                         "(known: version, sequences, constraints, templates, properties)")
    owner: dict[str, str] = {}
    codes: list[str] = []
    for index, item in enumerate(sequences):
        where = f"sequences[{index}]"
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in KINDS:
            raise InputError(f"{path}: {where}: expected one of {', '.join(KINDS)} with its fields")
        kind, entry = next(iter(item.items()))
        where = f"{where}.{kind}"
        if not isinstance(entry, dict):
            raise InputError(f"{path}: {where}: expected a mapping of fields")
        ids = entry.get("id")
        ids = [ids] if isinstance(ids, str) else ids
        if not ids or not all(isinstance(i, str) and i for i in ids):
            raise InputError(f"{path}: {where}.id: expected a chain id or a list of chain ids")
        for chain in ids:
            if chain in owner:
                raise InputError(f"{path}: {where}.id: chain id {chain!r} is already used by {owner[chain]}")
            owner[chain] = where
        if kind == "ligand":
            codes.extend(_check_ligand(path, where, entry, known))
            continue
        sequence = entry.get("sequence")
        if not isinstance(sequence, str) or not sequence.strip():
            raise InputError(f"{path}: {where}.sequence: empty or missing")
        letters = protein_letters if kind == "protein" else (DNA_LETTERS if kind == "dna" else RNA_LETTERS)
        for position, letter in enumerate(sequence, start=1):
            if letter not in letters:
                raise InputError(f"{path}: {where}.sequence: unknown {kind} residue {letter!r} at position {position}")
        if kind == "protein":
            _check_msa(path, where, entry)
        for m_index, modification in enumerate(entry.get("modifications") or []):
            m_where = f"{where}.modifications[{m_index}]"
            position, code = modification.get("position"), modification.get("ccd")
            if not isinstance(position, int) or not 1 <= position <= len(sequence):
                raise InputError(f"{path}: {m_where}.position: expected 1..{len(sequence)}, got {position!r}")
            codes.append(_check_code(path, f"{m_where}.ccd", code, known))
    _check_constraints(path, data.get("constraints") or [], owner)
    return sorted(set(codes))


def _check_ligand(path: Path, where: str, entry: dict, known) -> list[str]:
    has_ccd, has_smiles = "ccd" in entry, "smiles" in entry
    if has_ccd == has_smiles:
        raise InputError(f"{path}: {where}: give exactly one of 'ccd' or 'smiles'")
    if has_smiles:
        from rdkit import Chem

        smiles = entry["smiles"]
        if not isinstance(smiles, str) or Chem.MolFromSmiles(smiles) is None:
            raise InputError(f"{path}: {where}.smiles: RDKit cannot read {smiles!r}")
        return []
    codes = entry["ccd"] if isinstance(entry["ccd"], list) else [entry["ccd"]]
    if not codes:
        raise InputError(f"{path}: {where}.ccd: empty")
    return [_check_code(path, f"{where}.ccd", code, known) for code in codes]


def _check_code(path: Path, where: str, code: Any, known) -> str:
    if not isinstance(code, str) or not code.strip():
        raise InputError(f"{path}: {where}: expected a CCD code, got {code!r}")
    code = code.strip().upper()
    if known is not None and code not in known:
        raise InputError(f"{path}: {where}: unknown CCD code {code!r}")
    return code


def _check_msa(path: Path, where: str, entry: dict) -> None:
    if "msa" not in entry:
        raise InputError(f"{path}: {where}.msa: missing; give an .a3m or .csv file, or write 'msa: empty' to run "
                         "this chain in single-sequence mode (no server is ever contacted)")
    msa = entry["msa"]
    if msa == "empty":
        return
    if not isinstance(msa, str):
        raise InputError(f"{path}: {where}.msa: expected a file path or 'empty', got {msa!r}")
    msa_path = Path(msa) if Path(msa).is_absolute() else path.parent / msa
    if not msa_path.is_file():
        raise InputError(f"{path}: {where}.msa: no such file {str(msa_path)!r}")
    if msa_path.suffix.lower() not in (".a3m", ".csv"):
        raise InputError(f"{path}: {where}.msa: {msa_path.name!r} is neither .a3m nor .csv")


def _check_constraints(path: Path, constraints: list, owner: dict[str, str]) -> None:
    for index, constraint in enumerate(constraints):
        where = f"constraints[{index}]"
        if not isinstance(constraint, dict) or len(constraint) != 1:
            raise InputError(f"{path}: {where}: expected one of bond, pocket, contact")
        kind, body = next(iter(constraint.items()))
        chains: list[tuple[str, Any]] = []
        if kind == "bond":
            chains = [(f"{where}.bond.atom1", (body or {}).get("atom1")), (f"{where}.bond.atom2", (body or {}).get("atom2"))]
        elif kind == "pocket":
            chains = [(f"{where}.pocket.binder", [(body or {}).get("binder")])]
            chains += [(f"{where}.pocket.contacts[{k}]", c) for k, c in enumerate((body or {}).get("contacts") or [])]
        elif kind == "contact":
            chains = [(f"{where}.contact.token1", (body or {}).get("token1")),
                      (f"{where}.contact.token2", (body or {}).get("token2"))]
        else:
            raise InputError(f"{path}: {where}: unknown constraint {kind!r} (bond, pocket, contact)")
        for field, value in chains:
            if not isinstance(value, (list, tuple)) or not value or value[0] not in owner:
                raise InputError(f"{path}: {field}: refers to unknown chain {value[0] if value else value!r}")


@functools.lru_cache(maxsize=1)
def known_ccd_codes() -> frozenset[str]:
    """Every component code of the CCD that biotite ships."""
    from biotite.structure.info import all_residues

    return frozenset(all_residues())


def expose_descriptors() -> None:
    """boltz's schema parser reads ``AllChem.Descriptors.MolWt`` for an affinity ligand; ``AllChem`` has that name
    only when ``rdkit.Chem.Descriptors`` was imported before it, which depends on import order. Bind it."""
    from rdkit.Chem import AllChem, Descriptors

    if not hasattr(AllChem, "Descriptors"):
        AllChem.Descriptors = Descriptors


def parse_input(path: str | Path, cache_dir: str | Path) -> ParsedInput:
    """Check and parse an input with boltz's parser, building the CCD molecules it needs into ``cache_dir``."""
    from boltz.data.mol import load_canonicals, load_molecules
    from boltz.data.parse.schema import parse_boltz_schema

    from .ccd import CCDError, build_molecules, ensure_canonicals

    path = Path(path)
    cache_dir = Path(cache_dir).expanduser()
    data = read_schema(path)
    cached = {entry.stem for entry in cache_dir.glob("*.pkl")} if cache_dir.is_dir() else set()
    codes = check_schema(path, data, known_ccd_codes() | cached)  # a Boltz mols/ cache may know newer codes
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        ensure_canonicals(cache_dir)
        build_molecules(codes, cache_dir)
    except CCDError as exc:
        raise InputError(f"{path}: {exc}") from None
    canonicals = load_canonicals(str(cache_dir))
    expose_descriptors()
    try:
        target = parse_boltz_schema(path.stem, data, canonicals, cache_dir, True)
    except Exception as exc:  # noqa: BLE001 - boltz raises KeyError/ValueError/... from deep inside its schema code
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        raise InputError(f"{path}: boltz's parser rejected the input ({detail})") from None
    molecules = dict(canonicals)
    molecules.update(target.extra_mols or {})
    needed = {str(r["name"]) for r in target.structure.residues} - set(molecules)
    molecules.update(load_molecules(str(cache_dir), sorted(needed)))
    return ParsedInput(path=path, target=target, molecules=molecules)
