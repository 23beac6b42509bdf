"""MSA features from the row plan against boltz's ``process_msa_features``, and per-rank blocks on the grid."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from foldcp_hpc.data.inputs import parse_input
from foldcp_hpc.data.msa import load_msas, plan_msa
from conftest import REPO, everywhere

SEQ_A = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWE"
SEQ_B = "GSHMSLFDFFKNKGSAATATDRLKLAVLGSGAAAAG"
SEQ_D = "MSLFDFFKNKGSAATATDRLKLAVLGSGAAAAGKW"


def mutate(sequence: str, seed: int, rate: float = 0.2) -> str:
    rng = np.random.default_rng(seed)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    return "".join(letters[rng.integers(20)] if rng.random() < rate else c for c in sequence)


def a3m_text(query: str, n: int, seed: int) -> str:
    rows = [f">query\n{query}"]
    for k in range(n):
        row = list(mutate(query, seed + k))
        if k % 3 == 0:
            row[5] = "-"  # a gap
        text = "".join(row)
        if k % 4 == 1:
            text = text[:7] + "ac" + text[7:]  # an insertion (lower case)
        rows.append(f">hit{k}\n{text}")
    return "\n".join(rows) + "\n"


def csv_text(query: str, n: int, seed: int, keys: list[str]) -> str:
    lines = ["key,sequence", f",{query}"]
    for k in range(n):
        lines.append(f"{keys[k % len(keys)]},{mutate(query, seed + k)}")
    return "\n".join(lines) + "\n"


def write_msa_input(folder, seq_a: str, seq_b: str, seq_d: str, rows: tuple[int, int, int]):
    """A YAML input in ``folder``: protein A with a paired .csv MSA, a homodimer [B, C] with a paired .csv (shared
    taxonomy keys), protein D with an .a3m, protein E in single-sequence mode, and the ligand SAH. ``rows``: the
    hit rows of the three MSA files. Returns the YAML's path."""
    (folder / "a.csv").write_text(csv_text(seq_a, rows[0], 1, ["101", "102", "103", "", "105"]))
    (folder / "b.csv").write_text(csv_text(seq_b, rows[1], 50, ["102", "101", "109", "103"]))
    (folder / "d.a3m").write_text(a3m_text(seq_d, rows[2], 100))
    (folder / "in.yaml").write_text(textwrap.dedent(f"""
        version: 1
        sequences:
          - protein: {{id: A, sequence: {seq_a}, msa: a.csv}}
          - protein: {{id: [B, C], sequence: {seq_b}, msa: b.csv}}
          - protein: {{id: D, sequence: {seq_d}, msa: d.a3m}}
          - protein: {{id: E, sequence: MQIFVKTLTG, msa: empty}}
          - ligand: {{id: F, ccd: SAH}}
    """))
    return folder / "in.yaml"


@pytest.fixture(scope="module")
def msa_input(tmp_path_factory):
    """Two proteins with paired .csv MSAs (shared taxonomy keys), one with an .a3m, one in single-sequence mode."""
    from mpi4py import MPI

    return write_msa_input(tmp_path_factory.mktemp(f"msa{MPI.COMM_WORLD.Get_rank()}"), SEQ_A, SEQ_B, SEQ_D,
                           rows=(12, 9, 7))


def tokenized_with_msas(path):
    from boltz.data.tokenize.boltz2 import Boltz2Tokenizer
    from boltz.data.types import Input

    parsed = parse_input(path, REPO / ".cache" / "test-mols")
    target = parsed.target
    msas = load_msas(target, path, max_msa_seqs=8192)
    data = Input(structure=target.structure, msa=msas, record=target.record,
                 residue_constraints=target.residue_constraints, templates=target.templates,
                 extra_mols=target.extra_mols)
    return Boltz2Tokenizer().tokenize(data)


def boltz_msa_features(tokenized):
    from boltz.data import const
    from boltz.data.feature.featurizerv2 import process_msa_features

    return process_msa_features(tokenized, np.random.default_rng(42), max_seqs_batch=const.max_msa_seqs,
                                max_seqs=const.max_msa_seqs, pad_to_max_seqs=False, msa_sampling=False)


def test_plan_reproduces_boltz_msa_features(msa_input):
    tokenized = tokenized_with_msas(msa_input)
    ref = boltz_msa_features(tokenized)
    plan = plan_msa(tokenized)
    n = len(tokenized.tokens)
    msa, deletion, paired = plan.block(slice(0, plan.n_rows), slice(0, n))
    profile, deletion_mean = plan.profile_and_deletion_mean(slice(0, n), rows_per_block=5)
    assert plan.n_rows == ref["msa"].shape[0] > 20
    assert paired.sum() > 0 and (msa == 1).any()  # paired rows and gaps occur
    assert torch.equal(msa, ref["msa"])
    assert torch.equal(paired, ref["msa_paired"])
    assert torch.equal(deletion > 0, ref["has_deletion"])
    assert torch.allclose(np.pi / 2 * torch.arctan(deletion / 3), ref["deletion_value"], rtol=0, atol=0)
    assert torch.equal(profile, ref["profile"])
    assert torch.allclose(deletion_mean, torch.as_tensor(ref["deletion_mean"]), rtol=0, atol=1e-7)


@pytest.mark.mpi
def test_each_rank_block_equals_the_serial_msa(grid, msa_input):
    """Rank (r, c) holds MSA rows block c of token block r; padding rows and tokens are gaps."""
    from boltz.data import const

    from conftest import quiet_bcast

    def make():  # rank 0 parses, the others wait asleep (each would make the same)
        tokenized = tokenized_with_msas(msa_input)
        return len(tokenized.tokens), boltz_msa_features(tokenized), plan_msa(tokenized)

    n_tokens, ref, plan = quiet_bcast(grid, make() if grid.rank == 0 else None)
    tokens = grid.layout(n_tokens).block(grid.row)
    rows = grid.layout(plan.n_rows).block(grid.col)
    msa, _, paired = plan.block(rows, tokens)
    gap = const.token_ids["-"]
    full = torch.full((grid.layout(plan.n_rows).n_padded, grid.layout(n_tokens).n_padded), gap)
    full[: plan.n_rows, : n_tokens] = ref["msa"]
    ok = torch.equal(msa, full[rows, tokens])
    profile, _ = plan.profile_and_deletion_mean(slice(tokens.start, min(tokens.stop, n_tokens)))
    ok &= torch.equal(profile, ref["profile"][tokens])
    assert everywhere(grid, ok)
