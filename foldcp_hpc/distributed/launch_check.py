"""Catch a launch whose ranks do not form one MPI job: the world size MPI reports must be the launcher's.

A launcher that cannot wire its processes into one MPI job still starts them: ``srun`` without a PMI plugin
the MPI library understands (a missing ``--mpi=pmix``, or an MPI built without Slurm support), an ``mpirun``
of a different MPI than the one mpi4py was built with. Each process then initialises MPI alone, sees
``COMM_WORLD`` of size 1, builds a 1 x 1 grid and folds the whole input by itself: 64 copies of the same job,
each needing 64 times the memory per rank. The launcher does say how many ranks it started, in its
environment; :func:`check_world_size` compares that number with MPI's and stops the job when they differ.

Pure: the environment is an argument, so the check is tested serially with fake mappings.
"""

from __future__ import annotations

import os
from typing import Mapping

from ..errors import UniformError

__all__ = ["LaunchError", "LAUNCHER_SIZE_VARIABLES", "launcher_world_size", "check_world_size"]

# Most specific first: an MPI launcher's own count wins over the scheduler's, because ``mpirun -n 4`` inside a
# Slurm allocation of 64 tasks is a legitimate 4-rank job (Open MPI sets OMPI_COMM_WORLD_SIZE=4 there while
# SLURM_NTASKS still says 64). SLURM_STEP_NUM_TASKS is the size of this srun step; SLURM_NTASKS is also set in
# the batch script itself, where it catches a job started with no launcher at all.
LAUNCHER_SIZE_VARIABLES: tuple[tuple[str, str], ...] = (
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("PMI_SIZE", "a PMI launcher (MPICH or Intel MPI mpiexec, srun --mpi=pmi2)"),
    ("MV2_COMM_WORLD_SIZE", "MVAPICH's mpirun_rsh"),
    ("SLURM_STEP_NUM_TASKS", "srun"),
    ("SLURM_NTASKS", "Slurm"),
)


class LaunchError(UniformError):
    """The launcher started more (or fewer) processes than MPI joined into one job.

    Uniform: every process of a split launch sees the same numbers, so rank 0 of each speaks.
    """


def launcher_world_size(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """``(variable, size)`` of the first launcher variable set to a whole number, or None.

    >>> launcher_world_size({"SLURM_NTASKS": "64"})
    ('SLURM_NTASKS', 64)
    """
    for name, _ in LAUNCHER_SIZE_VARIABLES:
        text = environ.get(name, "").strip()
        if text.isdigit():
            return name, int(text)
    return None


def check_world_size(mpi_world_size: int, environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`LaunchError` when the launcher's rank count (> 1) differs from MPI's world size.

    A launcher count of 1 says nothing (every process of any launch could be one of one), so only a count
    above 1 is compared. ``environ`` defaults to ``os.environ``.

    Raises:
        LaunchError: one line with both numbers, the variable that told the launcher's, and the likely cause.
    """
    found = launcher_world_size(os.environ if environ is None else environ)
    if found is None:
        return
    name, size = found
    if size <= 1 or size == mpi_world_size:
        return
    launcher = dict(LAUNCHER_SIZE_VARIABLES)[name]
    if mpi_world_size == 1:
        cause = (f"each of the {size} processes started as its own one-rank MPI job; under Slurm launch with "
                 "srun --mpi=pmix (srun --mpi=list shows the plugins), otherwise use the mpirun/mpiexec of the MPI "
                 "that mpi4py was built with")
    else:
        cause = ("the processes were split into separate MPI jobs; launch all of them with one srun --mpi=pmix or "
                 "mpirun/mpiexec of the MPI that mpi4py was built with")
    raise LaunchError(f"MPI sees a world of {mpi_world_size} rank(s) but {launcher} started {size} ({name}={size}): "
                      f"{cause}")
