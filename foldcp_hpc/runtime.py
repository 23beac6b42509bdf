"""Job start-up and tear-down: MPI -> ProcessGrid -> torch.distributed -> device, and the error policy.

Error policy: an exception on any rank prints one line naming the rank and the error, then aborts the
whole MPI job (``COMM_WORLD.Abort``) so that no other rank is left waiting in a collective. Set
``FOLDCP_TRACEBACK=1`` (or pass ``--traceback``) to print the full traceback before aborting.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Iterator

from .errors import UniformError

__all__ = ["abort_on_error", "world_rank_and_size", "rank0_print", "expandable_device_memory"]

EXIT_ERROR = 1
UNIFORM_GRACE_S = 3.0


def expandable_device_memory() -> None:
    """Ask PyTorch's CUDA allocator for expandable segments unless the user configured it
    (``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF``). Call before the first CUDA allocation.

    A large fold frees and allocates whole pair tiles (tens of GiB at 6,000 tokens) of varying sizes; with
    fixed segments the freed ones are left in pieces and a tile can fail to fit in memory that is free in total
    (seen at 6,144 tokens on one 80 GB H100: 17.7 GiB refused with 45 GiB in use).
    """
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def world_rank_and_size() -> tuple[int, int]:
    """(rank, size) of ``MPI.COMM_WORLD``; (0, 1) when MPI is not initialised by a launcher."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def rank0_print(*args: object, **kwargs: object) -> None:
    """Print on world rank 0 only (rank 0 speaks; the others speak only of errors)."""
    rank, _ = world_rank_and_size()
    if rank == 0:
        print(*args, **kwargs, flush=True)  # type: ignore[call-overload]


@contextmanager
def abort_on_error(traceback_wanted: bool | None = None) -> Iterator[None]:
    """Run a block so that an exception on this rank ends the whole job within seconds.

    The exception is reported as one line, ``foldcp-hpc: rank R/P: ErrorType: message``, on stderr;
    with more than one rank the job is then aborted through ``MPI.COMM_WORLD.Abort(1)``, otherwise the
    process exits with status 1. ``SystemExit(0)`` passes through.
    """
    if traceback_wanted is None:
        traceback_wanted = os.environ.get("FOLDCP_TRACEBACK", "") not in ("", "0")
    try:
        yield
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        _die(f"exit status {exc.code}" if isinstance(exc.code, int) else str(exc.code), None, traceback_wanted)
    except BaseException as exc:  # noqa: BLE001 - every failure must take the job down, not just Exception
        _die(f"{type(exc).__name__}: {exc}", exc, traceback_wanted)


def _die(message: str, exc: BaseException | None, traceback_wanted: bool) -> None:
    rank, size = world_rank_and_size()
    if isinstance(exc, UniformError) and rank != 0 and size > 1:
        time.sleep(UNIFORM_GRACE_S)  # rank 0 raised the same error: let it speak and abort the job
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(EXIT_ERROR)
    if traceback_wanted and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    line = message.replace("\n", " | ")
    sys.stdout.flush()
    print(f"foldcp-hpc: rank {rank}/{size}: {line}", file=sys.stderr, flush=True)
    if size > 1:
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(EXIT_ERROR)
    os._exit(EXIT_ERROR)  # noqa: SLF001 - skip atexit handlers that could wait on other ranks
