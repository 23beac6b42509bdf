"""Bad inputs end the whole 4-rank job within seconds, with one line that names the file and the field.

Every case's message is checked in this process, where rank 0 of ``foldcp-hpc featurize`` meets it (the job file
loaded, then :func:`~foldcp_hpc.featurize.features_of`: one ``InputError`` of one line); cases that fail at
different stages (the YAML, a CCD lookup in boltz's parser, the token count after tokenizing, a missing file) also
run ``foldcp-hpc featurize`` under ``mpirun -n 4`` (through jobs/mpirun-local.sh), where every case takes the same
way out (rank 0's error, the error policy's one line, the whole job ended).
"""

from __future__ import annotations

import sys
import textwrap
import time

import pytest

from conftest import REPO, mpirun

PROTEIN = "      - protein:\n          id: A\n          sequence: MKTAYIAKQR\n          msa: empty\n"

CASES = {
    "malformed_yaml": ("in.yaml", "sequences:\n  - protein:\n    id: A\n   sequence: MKT\n", {},
                       "in.yaml: not valid YAML"),
    "unknown_residue": ("in.yaml", "version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: MKT1AY\n"
                        "      msa: empty\n", {}, "in.yaml: sequences[0].protein.sequence: unknown protein residue '1' at position 4"),
    "unknown_ccd_code": ("in.yaml", "version: 1\nsequences:\n" + PROTEIN + "      - ligand:\n          id: B\n"
                         "          ccd: ZZZZZ\n", {}, "in.yaml: sequences[1].ligand.ccd: unknown CCD code 'ZZZZZ'"),
    "missing_msa_file": ("in.yaml", "version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: MKTAY\n"
                         "      msa: nowhere.a3m\n", {}, "in.yaml: sequences[0].protein.msa: no such file"),
    "protein_without_msa": ("in.yaml", "version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: MKTAY\n",
                            {}, "in.yaml: sequences[0].protein.msa: missing; give an .a3m or .csv file, or write 'msa: empty'"),
    "empty_sequence": ("in.yaml", "version: 1\nsequences:\n  - dna:\n      id: A\n      sequence: ''\n", {},
                       "in.yaml: sequences[0].dna.sequence: empty or missing"),
    "duplicate_chain_id": ("in.yaml", "version: 1\nsequences:\n" + PROTEIN + "      - rna:\n          id: A\n"
                           "          sequence: ACGU\n", {},
                           "in.yaml: sequences[1].rna.id: chain id 'A' is already used by sequences[0].protein"),
    "too_many_tokens": ("in.yaml", "version: 1\nsequences:\n" + PROTEIN, {"input.max_tokens": "5"},
                        "in.yaml: 10 tokens, more than [input] max_tokens = 5"),
    "bad_smiles": ("in.yaml", "version: 1\nsequences:\n" + PROTEIN + "      - ligand:\n          id: B\n"
                   "          smiles: 'C1CC(('\n", {}, "in.yaml: sequences[1].ligand.smiles: RDKit cannot read"),
    "ccd_and_smiles": ("in.yaml", "version: 1\nsequences:\n  - ligand:\n      id: B\n      ccd: SAH\n"
                       "      smiles: CCO\n", {}, "in.yaml: sequences[0].ligand: give exactly one of 'ccd' or 'smiles'"),
    "constraint_unknown_chain": ("in.yaml", "version: 1\nsequences:\n" + PROTEIN + "constraints:\n  - contact:\n"
                                 "      token1: [A, 1]\n      token2: [Z, 2]\n      max_distance: 8\n", {},
                                 "in.yaml: constraints[0].contact.token2: refers to unknown chain 'Z'"),
    "modification_out_of_range": ("in.yaml", "version: 1\nsequences:\n  - protein:\n      id: A\n"
                                  "      sequence: MKTAY\n      msa: empty\n      modifications:\n"
                                  "        - position: 9\n          ccd: SEP\n", {},
                                  "in.yaml: sequences[0].protein.modifications[0].position: expected 1..5, got 9"),
    "fasta_bad_type": ("in.fasta", ">A|peptide\nMKTAY\n", {}, "in.fasta: header '>A|peptide': unknown type 'peptide'"),
    "unsupported_suffix": ("in.pdb", "ATOM\n", {}, "in.pdb: unsupported input type '.pdb'"),
    "missing_input_file": (None, None, {}, "missing.yaml: no such input file"),
}


MPI_CASES = ["malformed_yaml", "unknown_ccd_code", "too_many_tokens", "missing_input_file"]


def job_of(case, tmp_path):
    """The case's input and job file in ``tmp_path``; returns (job file, overrides, expected message)."""
    filename, text, overrides, message = CASES[case]
    if filename is None:
        filename = "missing.yaml"
    else:
        (tmp_path / filename).write_text(text)
    job = tmp_path / "job.toml"
    job.write_text(textwrap.dedent(f"""
        [input]
        path = "{filename}"
        ccd_cache = "{REPO / '.cache' / 'test-mols'}"
    """))
    return job, [f"{k}={v}" for k, v in overrides.items()], message


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_input_error_line(case, tmp_path, no_mpi):
    from foldcp_hpc.config import load_job
    from foldcp_hpc.data.inputs import InputError
    from foldcp_hpc.featurize import features_of

    path, overrides, message = job_of(case, tmp_path)
    job = load_job(str(path), overrides)
    with pytest.raises(InputError) as info:  # what rank 0 of foldcp-hpc featurize runs first
        features_of(job.resolve(job.input.path), job.resolve(job.input.ccd_cache), job.input.max_tokens,
                    job.input.max_msa_seqs)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("case", MPI_CASES)
def test_bad_input_ends_the_job_with_one_line(case, tmp_path):
    job, overrides, message = job_of(case, tmp_path)
    start = time.monotonic()
    result = mpirun(4, sys.executable, "-m", "foldcp_hpc.cli", "featurize", str(job), *overrides, timeout=60)
    elapsed = time.monotonic() - start
    lines = [line for line in result.stderr.splitlines() if line.startswith("foldcp-hpc:")]
    assert result.returncode != 0, result.stdout
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert len(lines) == 1 and lines[0].startswith("foldcp-hpc: rank 0/4: InputError: "), lines
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_a_job_without_input_path_is_refused(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("[grid]\ndp = 1\n")
    result = mpirun(4, sys.executable, "-m", "foldcp_hpc.cli", "featurize", str(job), timeout=60)
    assert result.returncode != 0
    assert f"{job}: [input] path: required" in result.stderr
