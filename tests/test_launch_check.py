"""A launch split into one-rank MPI jobs is caught: the launcher's rank count against MPI's world size (serial)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from foldcp_hpc.distributed.launch_check import LaunchError, check_world_size, launcher_world_size
from conftest import REPO


def test_srun_without_pmix_is_stopped_with_both_numbers_and_the_cause():
    environ = {"SLURM_NTASKS": "64", "SLURM_STEP_NUM_TASKS": "64", "SLURM_PROCID": "17"}
    with pytest.raises(LaunchError) as info:
        check_world_size(1, environ)
    message = str(info.value)
    assert "MPI sees a world of 1 rank(s) but srun started 64 (SLURM_STEP_NUM_TASKS=64)" in message
    assert "srun --mpi=pmix" in message and "\n" not in message


@pytest.mark.parametrize("environ,mpi_size", [
    ({}, 1),                                                    # no launcher: a serial run
    ({"SLURM_NTASKS": "1"}, 1),                                 # a one-task allocation
    ({"SLURM_NTASKS": "64", "SLURM_STEP_NUM_TASKS": "64"}, 64),  # srun --mpi=pmix that worked
    ({"SLURM_NTASKS": "64", "OMPI_COMM_WORLD_SIZE": "4"}, 4),   # mpirun -n 4 inside a 64-task allocation
    ({"PMI_SIZE": "9"}, 9),                                     # MPICH / Intel MPI mpiexec
    ({"OMPI_COMM_WORLD_SIZE": "1", "SLURM_NTASKS": "8"}, 1),    # mpirun -n 1 inside an allocation
])
def test_consistent_launches_pass(environ, mpi_size):
    check_world_size(mpi_size, environ)


def test_a_launch_split_into_several_multi_rank_jobs():
    with pytest.raises(LaunchError, match=r"world of 4 rank\(s\) but Open MPI's mpirun started 8 "
                                          r"\(OMPI_COMM_WORLD_SIZE=8\): the processes were split"):
        check_world_size(4, {"OMPI_COMM_WORLD_SIZE": "8"})


def test_the_most_specific_variable_wins_and_junk_is_skipped():
    assert launcher_world_size({"SLURM_NTASKS": "64", "PMI_SIZE": "16"}) == ("PMI_SIZE", 16)
    assert launcher_world_size({"OMPI_COMM_WORLD_SIZE": "", "SLURM_NTASKS": " 8 "}) == ("SLURM_NTASKS", 8)
    assert launcher_world_size({"PMI_SIZE": "many"}) is None


def test_process_grid_refuses_to_start_in_a_split_launch():
    """The whole path: ``foldcp-hpc info`` started alone where srun says 4 tasks ends with one line, status 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_", "MV2_"))}
    env.update(SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "foldcp_hpc.cli", "info", "runtime.backend=gloo"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("foldcp-hpc: rank 0/1: LaunchError: MPI sees a world of 1 rank(s) but srun started 4")
