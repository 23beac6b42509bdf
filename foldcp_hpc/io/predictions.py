"""Predictions in Boltz-2's output layout, file for file as ``boltz predict`` writes them (boltz 2.2.1's
``BoltzWriter.write_on_batch_end``, structure predictions, one input).

For an input ``name`` and S samples, ``<out_dir>/predictions/<name>/`` receives for every sample its rank k
(samples sorted by ``confidence_score``, highest first: ``_model_0`` is the best):

    <name>_model_<k>.cif  (.pdb)       structure from boltz's ``to_mmcif`` / ``to_pdb``, pLDDT x 100 as B-factor
    confidence_<name>_model_<k>.json   confidence summary, ``json.dumps(summary, indent=4)``
    plddt_<name>_model_<k>.npz         ``plddt``: [N] token pLDDT in [0, 1]
    pae_<name>_model_<k>.npz           ``pae``: [N, N]  (when given)
    pde_<name>_model_<k>.npz           ``pde``: [N, N]  (when given)

The structure written is the one Boltz's writer builds: masked chains removed, the sample's coordinates in
both the atom table and the coords table, every atom and residue present, no interfaces. Numbers pass
through float32 as they do in Boltz's tensors, so that the ranking, the JSON floats and the B-factors are
those Boltz writes for the same values.

With affinity (``write_affinity``, Boltz's ``BoltzAffinityWriter``):

    affinity_<name>.json               ``affinity_pred_value``, ``affinity_probability_binary`` and, for the
                                       two-model ensemble, the same suffixed 1 and 2

Not written: ``pre_affinity_<name>.npz`` (the affinity pass takes the top-ranked structure in memory) and
``embeddings_<name>.npz`` (``--write_embeddings``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["SUMMARY_KEYS", "AFFINITY_KEYS", "UNTRAINED_NOTE", "count_tokens", "rank_samples", "confidence_summary",
           "with_coords", "write_predictions", "write_affinity"]

# The scalar keys of Boltz-2's confidence JSON, in its order; "chains_ptm" and "pair_chains_iptm" follow.
SUMMARY_KEYS = ("confidence_score", "ptm", "iptm", "ligand_iptm", "protein_iptm", "complex_plddt",
                "complex_iplddt", "complex_pde", "complex_ipde")
UNTRAINED_NOTE = "foldcp_hpc: random (untrained) model weights; coordinates and confidences mean nothing"
OUTPUT_FORMATS = ("mmcif", "pdb")
CHAINS_PTM_TOLERANCE = 1e-5


def count_tokens(structure) -> int:
    """Tokens that ``Boltz2Tokenizer`` makes of ``structure`` (a StructureV2): over its valid chains, one per
    standard residue and per residue of a polymer chain, one per atom of any other residue of a non-polymer."""
    from boltz.data import const

    nonpolymer = const.chain_type_ids["NONPOLYMER"]
    n_tokens = 0
    for chain in structure.chains[structure.mask]:
        residues = structure.residues[chain["res_idx"]:chain["res_idx"] + chain["res_num"]]
        per_atom = ~residues["is_standard"] & (chain["mol_type"] == nonpolymer)
        n_tokens += int(np.where(per_atom, residues["atom_num"], 1).sum())
    return n_tokens


def rank_samples(scores) -> list[int]:
    """Rank of each sample by ``scores`` [S], highest first (Boltz's descending argsort; ties keep sample order)."""
    scores = np.asarray(scores, dtype=np.float32)
    ranks = np.empty(len(scores), dtype=int)
    ranks[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return ranks.tolist()


def confidence_summary(confidence: Mapping[str, Any], untrained: bool = False) -> dict[str, Any]:
    """One sample's confidence JSON as Boltz-2 writes it: the ``SUMMARY_KEYS`` scalars, ``chains_ptm`` (the
    diagonal of ``pair_chains_iptm``, as Boltz takes it) and ``pair_chains_iptm`` {chain: {chain: float}};
    with ``untrained``, ``"untrained_weights": true`` last.

    A given ``chains_ptm`` must name the same chains as ``pair_chains_iptm`` and agree with its diagonal.
    """
    missing = [key for key in (*SUMMARY_KEYS, "pair_chains_iptm") if key not in confidence]
    if missing:
        raise ValueError(f"confidence: missing {', '.join(missing)} ({len(missing)} of {len(SUMMARY_KEYS) + 1} "
                         "keys Boltz-2 writes)")
    summary: dict[str, Any] = {key: _as_float32(confidence[key]) for key in SUMMARY_KEYS}
    pairs = {_chain_key(first): {_chain_key(second): _as_float32(value) for second, value in row.items()}
             for first, row in confidence["pair_chains_iptm"].items()}
    chains_ptm = {}
    for chain, row in pairs.items():
        if chain not in row:
            raise ValueError(f"confidence: pair_chains_iptm[{chain}] has no entry for chain {chain} itself "
                             f"(Boltz-2 writes chains_ptm from the diagonal); it has {len(row)} chains")
        chains_ptm[chain] = row[chain]
    given = confidence.get("chains_ptm")
    if given is not None:
        given = {_chain_key(chain): _as_float32(value) for chain, value in given.items()}
        if set(given) != set(chains_ptm):
            raise ValueError(f"confidence: chains_ptm names {len(given)} chains {sorted(given, key=str)}, "
                             f"pair_chains_iptm {len(chains_ptm)} {sorted(chains_ptm, key=str)}")
        for chain, value in given.items():
            if not abs(value - chains_ptm[chain]) <= CHAINS_PTM_TOLERANCE:
                raise ValueError(f"confidence: chains_ptm[{chain}] = {value} but pair_chains_iptm[{chain}][{chain}] "
                                 f"= {chains_ptm[chain]}; Boltz-2 writes chains_ptm as that diagonal")
    summary["chains_ptm"] = chains_ptm
    summary["pair_chains_iptm"] = pairs
    if untrained:
        summary["untrained_weights"] = True
    return summary


def write_predictions(out_dir: Path, name: str, structure, coords: np.ndarray, plddt: np.ndarray,
                      confidence: list[dict], pae: np.ndarray | None = None, pde: np.ndarray | None = None,
                      output_format: str = "mmcif", untrained: bool = False) -> list[Path]:
    """Write one input's S samples to ``<out_dir>/predictions/<name>/`` as Boltz-2 does; returns the paths written.

    Args:
        out_dir: the job's output folder.
        name: the input's name (Boltz's record id), used in every file name.
        structure: the input's boltz StructureV2 (``ParsedInput.target.structure``), chains masked or not.
        coords: [S, M, 3] atom coordinates in featurized atom order (the valid chains' atoms in token order);
            atoms beyond the structure's M_valid (padding) are ignored.
        plddt: [S, N] token pLDDT in [0, 1]; tokens beyond the structure's N_valid (padding) are ignored.
        confidence: S dicts with Boltz-2's summary keys (``SUMMARY_KEYS``, ``pair_chains_iptm``, optionally
            ``chains_ptm``), see :func:`confidence_summary`.
        pae, pde: [S, N, N] predicted aligned / distance errors, or None to write no such files.
        output_format: "mmcif" (``.cif``) or "pdb" (``.pdb``).
        untrained: the weights were random: the JSON gets ``"untrained_weights": true``, the mmCIF a comment
            and ``_struct.pdbx_model_details``, the PDB ``REMARK 999`` lines, all carrying ``UNTRAINED_NOTE``.
    """
    import torch
    from boltz.data.write.mmcif import to_mmcif
    from boltz.data.write.pdb import to_pdb

    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format {output_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
    if not name or name == ".." or Path(name).name != name:
        raise ValueError(f"name {name!r}: expected a plain file-name stem (the input's record id)")
    valid = structure.remove_invalid_chains()
    n_atoms, n_tokens = len(valid.atoms), count_tokens(structure)
    coords = np.asarray(coords)
    if coords.ndim != 3 or coords.shape[2] != 3 or coords.shape[1] < n_atoms:
        raise ValueError(f"coords: expected [samples, M >= {n_atoms}, 3] for {n_atoms} atoms, got "
                         f"{list(coords.shape)}")
    n_samples = coords.shape[0]
    if n_samples == 0:
        raise ValueError(f"coords: 0 samples in {list(coords.shape)}; expected at least one")
    plddt = _token_array("plddt", plddt, n_samples, n_tokens, 1)
    low, high = float(plddt.min()), float(plddt.max())
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(f"plddt: expected values in [0, 1] (Boltz writes 100 x pLDDT as B-factor), got "
                         f"[{low}, {high}]")
    pae = None if pae is None else _token_array("pae", pae, n_samples, n_tokens, 2)
    pde = None if pde is None else _token_array("pde", pde, n_samples, n_tokens, 2)
    if len(confidence) != n_samples:
        raise ValueError(f"confidence: {len(confidence)} dicts for {n_samples} samples")
    summaries = [confidence_summary(values, untrained) for values in confidence]
    ranks = rank_samples([summary["confidence_score"] for summary in summaries])

    struct_dir = Path(out_dir) / "predictions" / name
    struct_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(path: Path, text: str | None = None, **arrays: np.ndarray) -> None:
        if text is None:
            np.savez_compressed(path, **arrays)
        else:
            path.write_text(text)
        written.append(path)

    for sample, rank in enumerate(ranks):
        model = with_coords(valid, coords[sample, :n_atoms])
        # boltz's writers index and average a float32 tensor (.item(), .mean()); the same here
        token_plddt = torch.from_numpy(plddt[sample])
        stem = f"{name}_model_{rank}"
        if output_format == "mmcif":
            text = to_mmcif(model, plddts=token_plddt, boltz2=True)
            save(struct_dir / f"{stem}.cif", _mark_mmcif(text) if untrained else text)
        else:
            text = to_pdb(model, plddts=token_plddt, boltz2=True)
            save(struct_dir / f"{stem}.pdb", _mark_pdb(text) if untrained else text)
        save(struct_dir / f"confidence_{stem}.json", json.dumps(summaries[sample], indent=4))
        save(struct_dir / f"plddt_{stem}.npz", plddt=plddt[sample])
        if pae is not None:
            save(struct_dir / f"pae_{stem}.npz", pae=pae[sample])
        if pde is not None:
            save(struct_dir / f"pde_{stem}.npz", pde=pde[sample])
    return written


AFFINITY_KEYS = ("affinity_pred_value", "affinity_probability_binary", "affinity_pred_value1",
                 "affinity_probability_binary1", "affinity_pred_value2", "affinity_probability_binary2")


def write_affinity(out_dir: Path, name: str, values: Mapping[str, Any], untrained: bool = False) -> Path:
    """``<out_dir>/predictions/<name>/affinity_<name>.json`` as Boltz's affinity writer makes it: the values of
    ``AFFINITY_KEYS`` present in ``values`` (one-element tensors or numbers, through float32), in that order;
    with ``untrained``, ``"untrained_weights": true`` last."""
    for key in AFFINITY_KEYS[:2]:
        if key not in values:
            raise ValueError(f"affinity: missing {key} (Boltz-2 writes {', '.join(AFFINITY_KEYS[:2])})")
    summary: dict[str, Any] = {key: _as_float32(values[key]) for key in AFFINITY_KEYS if key in values}
    if untrained:
        summary["untrained_weights"] = True
    struct_dir = Path(out_dir) / "predictions" / name
    struct_dir.mkdir(parents=True, exist_ok=True)
    path = struct_dir / f"affinity_{name}.json"
    path.write_text(json.dumps(summary, indent=4))
    return path


def with_coords(valid, coords: np.ndarray):
    """``valid`` (masked chains removed) with coords [M_valid, 3] in its atom and coords tables, every atom
    and residue present and no interfaces: the per-model structure of Boltz's writer."""
    from boltz.data.types import Coords, Interface

    atoms = valid.atoms.copy()
    atoms["coords"] = coords
    atoms["is_present"] = True
    residues = valid.residues.copy()
    residues["is_present"] = True
    table = np.zeros(len(atoms), dtype=Coords)
    table["coords"] = atoms["coords"]
    return dataclasses.replace(valid, atoms=atoms, residues=residues, coords=table,
                               interfaces=np.array([], dtype=Interface))


def _token_array(label: str, values, n_samples: int, n_tokens: int, n_token_dims: int) -> np.ndarray:
    """``values`` [S, N, ...] (``n_token_dims`` token dims) trimmed to [S, n_tokens, ...], float32 like Boltz's."""
    values = np.asarray(values)
    expected = ", ".join(["samples", *[f"N >= {n_tokens}"] * n_token_dims])
    if (values.ndim != 1 + n_token_dims or values.shape[0] != n_samples
            or any(size < n_tokens for size in values.shape[1:])):
        raise ValueError(f"{label}: expected [{expected}] for {n_samples} samples and {n_tokens} tokens, got "
                         f"{list(values.shape)}")
    return np.ascontiguousarray(values[(slice(None), *[slice(0, n_tokens)] * n_token_dims)], dtype=np.float32)


def _as_float32(value) -> float:
    """A Python float of ``value`` rounded to float32: what ``tensor.item()`` gives Boltz's writer."""
    return float(np.float32(float(value)))


def _chain_key(key):
    """Chain indices as Python ints (json writes them as "0", "1", ... like Boltz's); other keys unchanged."""
    return int(key) if isinstance(key, (int, np.integer)) else key


def _mark_mmcif(text: str) -> str:
    """``UNTRAINED_NOTE`` as a comment under ``data_`` and as ``_struct.pdbx_model_details`` (ModelCIF's
    description of how the model was made), which mmCIF readers keep."""
    item = f"_struct.pdbx_model_details '{UNTRAINED_NOTE}'"
    text, found = re.subn(r"^_struct\.pdbx_model_details .*$", lambda _: item, text, count=1, flags=re.M)
    head, _, rest = text.partition("\n")
    return "\n".join([head, f"# {UNTRAINED_NOTE}", *([] if found else [item]), rest])


def _mark_pdb(text: str) -> str:
    """``UNTRAINED_NOTE`` as ``REMARK 999`` lines (free text, 80 columns like boltz's lines) before the atoms."""
    words, lines = UNTRAINED_NOTE.split(), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + 1 + len(word) > 69:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    return "\n".join(f"REMARK 999 {line}".ljust(80) for line in lines) + "\n" + text
