"""MSA features without the dense [S, N] arrays: a row plan, and any block of rows x tokens on demand.

Boltz-2 (``featurizerv2.construct_paired_msa``) builds the whole MSA [S, N] (up to 16,384 rows): row 0 is
every chain's query; then rows pairing sequences of the same taxonomy (``key`` column of a Boltz .csv)
across chains, filled up with unpaired sequences; then unpaired rows. Which sequence of which chain lands
in which row depends only on the chains' MSA headers, so it is computed here once, as a plan
``pairing`` [S, C] (sequence index per row and chain, -1 for a gap) and ``is_paired`` [S, C]: O(S x chains).
:meth:`MSAPlan.block` then materialises any (rows, tokens) block, exactly as Boltz's arrays would hold it,
and :meth:`MSAPlan.profile_and_deletion_mean` the per-token statistics over all rows, block by block.
On the p x p grid rank (r, c) holds rows block c of token block r (see docs/design.md).

Boltz's quirks are kept for exact parity: a chain MSA whose first row does not match the chain becomes a
query-only MSA; sequences that are paired are also offered as unpaired ones; deletions are looked up with a
slice that shrinks as it goes (in practice every deletion feature is 0).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_msas", "MSAPlan", "plan_msa"]

MAX_PAIRED_ROWS = 8192
MAX_TOTAL_ROWS = 16384


def load_msas(target: Any, input_path: Path, max_msa_seqs: int) -> dict[int, Any]:
    """Each chain's MSA (boltz ``MSA`` objects, parsed with boltz's a3m/csv readers), keyed by chain id.

    Chains with ``msa: empty`` (or no MSA, for non-proteins) get none; a file is parsed once however many
    chains share it. ``max_msa_seqs`` caps the rows read from each file, as ``boltz predict`` does.
    """
    from boltz.data.parse.a3m import parse_a3m
    from boltz.data.parse.csv import parse_csv

    parsed: dict[str, Any] = {}
    msas: dict[int, Any] = {}
    for chain in target.record.chains:
        msa_id = chain.msa_id
        if msa_id in (-1, 0, None) or (isinstance(msa_id, str) and msa_id == "empty"):
            continue
        path = Path(msa_id) if Path(str(msa_id)).is_absolute() else input_path.parent / str(msa_id)
        key = str(path)
        if key not in parsed:
            if path.suffix == ".csv":
                parsed[key] = parse_csv(path, max_seqs=max_msa_seqs)
            else:
                parsed[key] = parse_a3m(path, taxonomy=None, max_seqs=max_msa_seqs)
        msas[int(chain.chain_id)] = parsed[key]
    return msas


@dataclasses.dataclass
class MSAPlan:
    """Which sequence of which chain fills each MSA row.

    Attributes:
        chain_ids: the chains (asym ids) in token order; C of them.
        pairing: [S, C] int64 sequence index of chain c in row s (-1: gap).
        is_paired: [S, C] int64, 1 where the row pairs that chain's sequence by taxonomy.
        msas: chain id -> boltz MSA actually used (a query-only MSA where the chain had none or a mismatch).
        deletions: (chain id, sequence, residue) -> deletion count, as Boltz finds them.
        token_chain: [N] index into chain_ids of each token; token_residue: [N] residue index in its chain.
    """

    chain_ids: np.ndarray
    pairing: np.ndarray
    is_paired: np.ndarray
    msas: dict[int, Any]
    deletions: dict[tuple[int, int, int], int]
    token_chain: np.ndarray
    token_residue: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.pairing.shape[0])

    def block(self, rows: slice, tokens: slice) -> tuple[Tensor, Tensor, Tensor]:
        """MSA rows x tokens: (msa int64 token ids, deletion counts float32, paired float32), each [s, n].

        Rows and tokens beyond the MSA's size are returned as gap rows / gap columns (the caller masks them).
        """
        from boltz.data import const

        gap = const.token_ids["-"]
        row_ids = np.arange(rows.start, rows.stop)
        token_ids = np.arange(tokens.start, tokens.stop)
        real_rows = row_ids < self.n_rows
        real_tokens = token_ids < len(self.token_chain)
        msa = np.full((len(row_ids), len(token_ids)), gap, dtype=np.int64)
        deletion = np.zeros((len(row_ids), len(token_ids)), dtype=np.float32)
        paired = np.zeros((len(row_ids), len(token_ids)), dtype=np.float32)
        r_idx = row_ids[real_rows]
        for c_index, chain_id in enumerate(self.chain_ids):
            columns = np.nonzero(real_tokens)[0]
            columns = columns[self.token_chain[token_ids[columns]] == c_index]
            if len(columns) == 0 or len(r_idx) == 0:
                continue
            chain_msa = self.msas[int(chain_id)]
            seq = self.pairing[r_idx, c_index]  # [s]
            paired[np.ix_(np.nonzero(real_rows)[0], columns)] = self.is_paired[r_idx, c_index][:, None]
            present = seq != -1
            if not present.any():
                continue
            starts = chain_msa.sequences["res_start"][seq[present]]  # [s']
            residues = self.token_residue[token_ids[columns]]  # [n']
            values = chain_msa.residues["res_type"][starts[:, None] + residues[None, :]]
            out_rows = np.nonzero(real_rows)[0][present]
            msa[np.ix_(out_rows, columns)] = values
            if self.deletions:
                for i, s in zip(out_rows, seq[present]):
                    for j, res in zip(columns, residues):
                        d = self.deletions.get((int(chain_id), int(s), int(res)))
                        if d is not None:
                            deletion[i, j] = d
        return torch.from_numpy(msa), torch.from_numpy(deletion), torch.from_numpy(paired)

    def profile_and_deletion_mean(self, tokens: slice, rows_per_block: int = 256, n_rows: int | None = None
                                  ) -> tuple[Tensor, Tensor]:
        """Boltz's ``profile`` [n, 33] (mean one-hot over the rows) and ``deletion_mean`` [n] for a token range,
        accumulated over blocks of rows (no [S, n] array is held). n_rows: only the first rows (1 gives the
        affinity module's ``profile_affinity``: Boltz builds it from a one-row MSA); default all."""
        from boltz.data import const

        n_rows = self.n_rows if n_rows is None else min(n_rows, self.n_rows)
        n = tokens.stop - tokens.start
        counts = torch.zeros(n, const.num_tokens, dtype=torch.long)
        deletion_sum = torch.zeros(n, dtype=torch.float64)
        for start in range(0, n_rows, rows_per_block):
            msa, deletion, _ = self.block(slice(start, min(start + rows_per_block, n_rows)), tokens)
            counts.scatter_add_(1, msa.T, torch.ones_like(msa.T))  # counts[j, msa[i, j]] += 1
            deletion_sum += (np.pi / 2 * torch.arctan(deletion.double() / 3)).sum(0)
        # counts are exact integers: float32 count / rows is the float32 mean Boltz computes
        return counts.float() / n_rows, (deletion_sum / n_rows).float()


def plan_msa(data: Any) -> MSAPlan:
    """The row plan of Boltz's ``construct_paired_msa`` at inference (no random subset, 16,384 rows at most)."""
    from boltz.data import const
    from boltz.data.feature.featurizerv2 import dummy_msa

    tokens = data.tokens
    if not np.all(np.diff(tokens["asym_id"]) >= 0):
        raise ValueError("tokens are not ordered by chain")
    chain_ids = np.unique(tokens["asym_id"])

    msas: dict[int, Any] = {}
    for chain_id in chain_ids:
        chain = data.structure.chains[chain_id]
        residues = data.structure.residues[chain["res_idx"]:chain["res_idx"] + chain["res_num"]]
        msas[int(chain_id)] = _checked_msa(data, int(chain_id), residues, const, dummy_msa)

    # taxonomy -> [(chain, sequence)], kept when it occurs more than once, ordered by how many chains it covers
    taxonomy_map: dict[Any, list] = {}
    for chain_id, chain_msa in msas.items():
        sequences = chain_msa.sequences
        for sequence in sequences[sequences["taxonomy"] != -1]:
            taxonomy_map.setdefault(sequence["taxonomy"], []).append((chain_id, int(sequence["seq_idx"])))
    taxonomy_items = sorted(((k, v) for k, v in taxonomy_map.items() if len(v) > 1),
                            key=lambda item: len({c for c, _ in item[1]}), reverse=True)
    # Boltz's membership test compares (chain, sequence) with (taxon, (chain, sequence)) pairs and never
    # matches, so paired sequences stay available as unpaired ones too (jwohlwend/boltz#581)
    visited = {(c, s) for c, items in taxonomy_items for s in items}
    available = {int(c): deque(i for i in range(1, len(msas[int(c)].sequences)) if (int(c), i) not in visited)
                 for c in chain_ids}

    pairing = [{int(c): 0 for c in chain_ids}]
    is_paired = [{int(c): 1 for c in chain_ids}]
    for _, pairs in taxonomy_items:
        occurrences: dict[int, list[int]] = {}
        for chain_id, seq_idx in pairs:
            occurrences.setdefault(chain_id, []).append(seq_idx)
        for i in range(max(len(v) for v in occurrences.values())):
            row = {c: seqs[i % len(seqs)] for c, seqs in occurrences.items()}
            row_paired = {c: 1 for c in occurrences}
            for c in chain_ids:
                c = int(c)
                if c not in row:
                    row_paired[c] = 0
                    row[c] = available[c].popleft() if available[c] else -1
            pairing.append(row)
            is_paired.append(row_paired)
            if len(pairing) >= MAX_PAIRED_ROWS:
                break
        if len(pairing) >= MAX_PAIRED_ROWS:
            break
    max_left = max(len(v) for v in available.values())
    for _ in range(min(MAX_TOTAL_ROWS - len(pairing), max_left)):
        pairing.append({int(c): (available[int(c)].popleft() if available[int(c)] else -1) for c in chain_ids})
        is_paired.append({int(c): 0 for c in chain_ids})
        if len(pairing) >= MAX_TOTAL_ROWS:
            break
    pairing, is_paired = pairing[:const.max_msa_seqs], is_paired[:const.max_msa_seqs]

    deletions: dict[tuple[int, int, int], int] = {}
    for chain_id, chain_msa in msas.items():
        chain_deletions = chain_msa.deletions
        for sequence in chain_msa.sequences:
            chain_deletions = chain_deletions[sequence["del_start"]:sequence["del_end"]]  # Boltz's shrinking slice
            for entry in chain_deletions:
                deletions[(chain_id, int(sequence["seq_idx"]), int(entry["res_idx"]))] = int(entry["deletion"])

    order = {int(c): i for i, c in enumerate(chain_ids)}
    return MSAPlan(
        chain_ids=chain_ids,
        pairing=np.array([[row[int(c)] for c in chain_ids] for row in pairing], dtype=np.int64),
        is_paired=np.array([[row[int(c)] for c in chain_ids] for row in is_paired], dtype=np.int64),
        msas=msas,
        deletions=deletions,
        token_chain=np.array([order[int(a)] for a in tokens["asym_id"]], dtype=np.int64),
        token_residue=tokens["res_idx"].astype(np.int64),
    )


def _checked_msa(data: Any, chain_id: int, residues: np.ndarray, const: Any, dummy_msa) -> Any:
    """The chain's MSA as Boltz uses it: query-only when missing or when its first row does not match."""
    if chain_id not in data.msa:
        return dummy_msa(residues)
    chain_msa = data.msa[chain_id]
    first = chain_msa.sequences[0]
    first_residues = chain_msa.residues[first["res_start"]:first["res_end"]]
    if len(residues) != len(first_residues):
        return dummy_msa(residues)
    mismatches = residues["res_type"] != first_residues["res_type"]
    if not mismatches.sum():
        return chain_msa
    idx = np.where(mismatches)[0]
    is_met = residues["res_type"][idx] == const.token_ids["MET"]
    is_unk = residues["res_type"][idx] == const.token_ids["UNK"]
    is_msa_unk = first_residues["res_type"][idx] == const.token_ids["UNK"]
    if (np.all(is_met) and np.all(is_msa_unk)) or np.all(is_unk):
        # Boltz writes the input's residue types over the MSA's query row (in place)
        chain_msa.residues[first["res_start"]:first["res_end"]]["res_type"] = residues["res_type"]
        return chain_msa
    return dummy_msa(residues)
