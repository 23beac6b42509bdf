"""``foldcp-hpc validate``: every job in jobs/ passes for its rank count, broken jobs fail with one line; serial,
with MPI made unimportable (validate must run where MPI cannot start)."""

from __future__ import annotations


import pytest

from foldcp_hpc.cli import main
from foldcp_hpc.config import load_job
from foldcp_hpc.validate import validate_job
from conftest import JOBS, REPO, ranks_for

# Inputs whose featurization alone takes longer than this test file may (the 42,840-token capsid: ~40 s on 2 cores)
# are parsed and tokenized only; test_tokenized_counts_equal_featurized keeps that path honest.
TOKENIZE_ONLY = {"large_assembly.toml"}
# Token counts of inputs/README.md's table.
TOKENS = {"demo.yaml": 72, "protein_ligand.yaml": 197, "large_assembly.yaml": 42840}


pytestmark = pytest.mark.usefixtures("no_mpi")


def test_jobs_exist():
    assert {p.name for p in JOBS} >= {"demo.toml", "protein_ligand.toml", "large_assembly.toml"}


@pytest.mark.parametrize("job_path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_validates(job_path, capsys):
    ranks = ranks_for(job_path)
    argv = ["validate", str(job_path), "--ranks", str(ranks)]
    if job_path.name in TOKENIZE_ONLY:
        argv.append("--no-features")
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "OK"
    input_line = next(line for line in out if line.startswith("input "))
    name = load_job(job_path).input.path.rsplit("/", 1)[-1]
    if name in TOKENS:
        assert f" {TOKENS[name]:,} tokens," in input_line
    assert any(line.startswith(f"grid: {ranks} ranks") for line in out)


def test_large_assembly_is_an_8x8_grid_of_the_released_architecture(capsys):
    job = load_job(REPO / "jobs" / "large_assembly.toml")
    assert (job.grid.cp, job.grid.dp, job.model.architecture, job.model.dtype) == (8, 1, "boltz2", "bf16-mixed")
    assert main(["validate", str(REPO / "jobs" / "large_assembly.toml"), "--ranks", "63", "--no-features"]) == 1
    assert "grid 8x8 needs 64 ranks, got 63" in capsys.readouterr().err


def test_tokenized_counts_equal_featurized():
    lines = {}
    for features in (True, False):
        said = []
        validate_job(str(REPO / "jobs" / "protein_ligand.toml"), [], 4, features=features, say=said.append)
        lines[features] = next(line for line in said if line.startswith("input ")).split(" (")[0]
    assert lines[True] == lines[False] == "input protein_ligand: 197 tokens, 1,262 atoms, 2 chains, MSA of 1 rows"


def test_overrides_after_the_rank_option(capsys):
    assert main(["validate", str(REPO / "jobs" / "protein_ligand.toml"), "--ranks", "8", "grid.dp=2",
                 "--no-features"]) == 0
    out = capsys.readouterr().out
    assert "grid: 8 ranks = 2 replica(s) x 2x2" in out
    assert "replicas: each runs the trunk; the 1 diffusion sample(s) split 1 + 0; note: 1 of 2 replicas get no " \
           "sample" in out


def test_replicas_split_the_samples(capsys):
    assert main(["validate", str(REPO / "jobs" / "protein_ligand.toml"), "--ranks", "12", "grid.dp=3",
                 "sampling.diffusion_samples=5", "--no-features"]) == 0
    out = capsys.readouterr().out
    assert "the 5 diffusion sample(s) split 2 + 2 + 1" in out and "note:" not in out


def broken(capsys, *argv) -> str:
    """Run validate, expect status 1 and exactly one error line on stderr; return it."""
    assert main(["validate", *argv]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("foldcp-hpc validate: "), captured.err
    assert "OK" not in captured.out.splitlines()
    return err[0]


def test_rank_count_that_is_not_a_square(capsys):
    line = broken(capsys, str(REPO / "jobs" / "demo.toml"), "--ranks", "6")
    assert "GridError" in line and "demo.toml: [grid] cp = unset, dp = 1 with --ranks 6" in line
    assert "use 4 or 9 ranks" in line


def test_grid_side_that_does_not_match_the_ranks(capsys):
    line = broken(capsys, str(REPO / "jobs" / "demo.toml"), "--ranks", "4", "grid.cp=3")
    assert line.endswith("[grid] cp = 3, dp = 1 with --ranks 4: grid 3x3 needs 9 ranks, got 4")
    line = broken(capsys, str(REPO / "jobs" / "demo.toml"), "--ranks", "18", "grid.cp=3", "grid.dp=3")
    assert line.endswith("[grid] cp = 3, dp = 3 with --ranks 18: grid 3x3x3 (dp x p x p) needs 27 ranks, got 18")


def test_missing_input(capsys, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[input]\npath = "missing.yaml"\n[output]\ndir = "out"\n')
    line = broken(capsys, str(job), "--ranks", "1")
    assert f"InputError: {tmp_path / 'missing.yaml'}: no such input file" in line


def test_job_without_input(capsys, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[output]\ndir = "out"\n')
    assert "[input] path: required" in broken(capsys, str(job), "--ranks", "1")


def test_unknown_key(capsys, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("[sampling]\nsampling_step = 20\n")
    line = broken(capsys, str(job), "--ranks", "4")
    assert "ConfigError" in line and "[sampling] has no key 'sampling_step'; did you mean 'sampling_steps'?" in line


def test_missing_checkpoint(capsys):
    line = broken(capsys, str(REPO / "jobs" / "demo.toml"), "--ranks", "4", "model.architecture=boltz2",
                  "model.checkpoint=/nonexistent/boltz2_conf.ckpt")
    assert "demo.toml: [model] checkpoint: no such file /nonexistent/boltz2_conf.ckpt" in line


def test_output_under_a_file(capsys, tmp_path):
    (tmp_path / "a_file").write_text("")
    line = broken(capsys, str(REPO / "jobs" / "demo.toml"), "--ranks", "4", f"output.dir={tmp_path}/a_file/out")
    assert f"[output] dir: {tmp_path}/a_file is not a folder" in line


def test_checkpoint_and_new_output_folder_pass(tmp_path, capsys):
    checkpoint = tmp_path / "boltz2_conf.ckpt"
    checkpoint.write_bytes(b"\0" * 1024)
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{REPO}/inputs/protein_ligand.yaml"\n[model]\ncheckpoint = "boltz2_conf.ckpt"\n'
                   '[output]\ndir = "runs/one"\n')
    assert main(["validate", str(job), "--ranks", "4", "--no-features"]) == 0
    out = capsys.readouterr().out
    assert f"weights: checkpoint {checkpoint} (0.00 GiB)" in out
    assert f"output: {tmp_path / 'runs' / 'one'} (will be created in {tmp_path}, writable)" in out
    assert not (tmp_path / "runs").exists()  # validate changes nothing
