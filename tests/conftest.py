"""Shared fixtures. MPI tests are marked ``@pytest.mark.mpi`` and run under ``mpirun -n P pytest --with-mpi``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

# Triton kernels run in Triton's CPU interpreter in the tests (only where a test asks for them with
# FOLDCP_TRITON=1); the interpreter must be chosen before Triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``heap_readings`` run first, the others in their usual order.

    They read glibc's heap statistics (``mallinfo2``) after every operator, and mallinfo2 walks every free chunk:
    on a heap fragmented by the tests before them a reading takes milliseconds, and the 4-rank planner check took
    210 s late in the session against 33 s on a fresh heap (the readings count bytes in use, whatever the order)."""
    items.sort(key=lambda item: item.get_closest_marker("heap_readings") is None)


@pytest.fixture(scope="session")
def grid():
    """The p x p grid of the whole MPI world on gloo (p = sqrt of the rank count: 1, 2 or 3 in CI)."""
    from foldcp_hpc.distributed.grid import ProcessGrid

    with ProcessGrid.create(backend="gloo", timeout_s=120) as process_grid:
        yield process_grid


def everywhere(grid, ok: bool) -> bool:
    """True only if ``ok`` holds on every rank, so that all ranks pass or fail a test together.

    A test that failed on one rank alone would leave the others waiting in the next test's collectives.
    """
    from mpi4py import MPI

    return bool(grid.comm.allreduce(int(bool(ok)), op=MPI.MIN))


def quiet_bcast(grid, value):
    """``grid.comm.bcast(value, root=0)`` after a barrier the ranks wait at asleep (a polled Ibarrier).

    For a value rank 0 alone computes (boltz's reference): ranks spinning inside MPI while they wait would take
    the CPU from rank 0's work on an oversubscribed test machine (9 ranks on 2 cores)."""
    request = grid.comm.Ibarrier()
    while not request.Test():
        time.sleep(0.002)
    return grid.comm.bcast(value, root=0)


def _clean_env(env: dict | None) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    clean.update(env or {})
    clean["PATH"] = f"{Path(sys.executable).parent}:{clean.get('PATH', '')}"
    return clean


def mpirun(n: int, *command: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` on ``n`` local ranks through jobs/mpirun-local.sh, outside any enclosing MPI job."""
    return subprocess.run([str(REPO / "jobs" / "mpirun-local.sh"), "-n", str(n), *command], cwd=REPO,
                          env=_clean_env(env), capture_output=True, text=True, timeout=timeout)


def mpirun_popen(n: int, *command: str, env: dict | None = None) -> subprocess.Popen:
    """:func:`mpirun` started in the background, stdout and stderr merged into ``stdout`` (text lines)."""
    return subprocess.Popen([str(REPO / "jobs" / "mpirun-local.sh"), "-n", str(n), *command], cwd=REPO,
                            env=_clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


JOBS = sorted((REPO / "jobs").glob("*.toml"))


def ranks_for(job_path) -> int:
    """The rank count a job in jobs/ is meant for (dp x cp², cp 2 when the job leaves it to the launcher)."""
    from foldcp_hpc.config import load_job

    job = load_job(job_path)
    return job.grid.dp * (job.grid.cp or 2) ** 2


@pytest.fixture
def no_mpi(monkeypatch):
    """Any import of mpi4py.MPI (which initialises MPI) fails during the test (serial commands must not start MPI)."""
    import mpi4py

    monkeypatch.delattr(mpi4py, "MPI", raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
