"""Checkpoints of a run, resume, and walltime signals.

A checkpoint is one tiles file (:class:`~foldcp_hpc.io.tiles.PairFile`, docs/hdf5-layout.md) holding what
:meth:`~foldcp_hpc.model.boltz2.FoldModel.predict` needs to go on from a :class:`ResumePoint`:

    /trunk/s                [N, C_s]       s at that point (replicated when written)
    /trunk/z                [N, N, C_z]    z tiles at that point (the trunk's final z in the sampling stage)
    /sampling/coords        [S, M, 3]      sampler coordinates (sampling stage)
    /sampling/generator     [bytes]        the sampler generator's state (sampling stage)
    root attributes         stage, recycle, blocks, sampling_step, fingerprint, grid, dtype, complete

Everything else (features, s_inputs, z_init, the diffusion conditioning) is recomputed: it is deterministic.
Files are ``ckpt-<counter>.h5`` in the checkpoint folder, counter = the position in the run, written, flushed,
then marked complete; only the newest ``keep`` complete ones stay. Resuming picks the newest checkpoint that
verifies, so a file cut short (a kill while writing) is passed over for the one before.

Signals: SIGTERM and SIGUSR1 (what Slurm sends before the walltime) only set a flag. After every Pairformer
block and sampler step all ranks agree on the flag (one all-reduce); when set, every rank writes a checkpoint at
that point and :class:`Preempted` ends the run with :data:`EXIT_PREEMPTED`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import UniformError
from .h5complete import checkpoint_name, parse_checkpoint_name, rotation, verify
from .tiles import PairFile, read_tile, read_full

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid
    from ..model.boltz2 import ResumePoint
    from ..model.trunk import TrunkOutput, TrunkPosition

__all__ = ["EXIT_PREEMPTED", "PREFIX", "CheckpointError", "Preempted", "StopSignal", "Checkpointer",
           "find_checkpoint", "load_checkpoint", "fingerprint"]

#: exit status of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint (EX_TEMPFAIL: "try again")
EXIT_PREEMPTED = 75
PREFIX = "ckpt"
#: position counters: trunk positions count blocks from the start; sampling steps come after every trunk position
SAMPLING_BASE = 10**7


class CheckpointError(UniformError):
    """No usable checkpoint, or one that belongs to another job."""


class Preempted(Exception):
    """The run stopped on a signal after writing ``path``."""

    def __init__(self, path: Path, where: str):
        super().__init__(f"stopped on a signal {where}; checkpoint {path}")
        self.path = path
        self.where = where


def fingerprint(parts: dict[str, Any]) -> str:
    """A short hash of what determines the result (input, model, sampling, seed, dtype): a checkpoint resumes
    only the run it was written by."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StopSignal:
    """SIGTERM / SIGUSR1 set a flag; :meth:`agreed` tells every rank whether any rank got one (collective)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignal":
        for name in self.SIGNALS:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        self.received = number

    def agreed(self, grid: "ProcessGrid") -> bool:
        """True on every rank when any rank has received a signal (an all-reduce over the whole world)."""
        from mpi4py import MPI

        return bool(grid.comm.allreduce(int(self.received is not None), op=MPI.MAX))


@dataclass
class Checkpointer:
    """Writes checkpoints during :meth:`FoldModel.predict` (it is the ``hooks`` argument).

    Args:
        grid: the process grid (replica 0 writes; other replicas hold the same state).
        directory: the checkpoint folder.
        identity: :func:`fingerprint` of the run; stored, and checked on resume.
        n_tokens: N of the input.
        blocks, recycling_steps: the trunk's Pairformer blocks per recycle and its recycling steps.
        every_blocks, every_steps: intervals (a checkpoint also ends every recycle).
        keep: complete checkpoints kept.
        stop: the signal flag, or None (no signal handling).
        say: rank 0's progress lines.
        enabled: write interval checkpoints (a signal still writes one).
    """

    grid: "ProcessGrid"
    directory: Path
    identity: str
    n_tokens: int
    blocks: int
    recycling_steps: int
    every_blocks: int = 64
    every_steps: int = 50
    keep: int = 2
    stop: Optional[StopSignal] = None
    say: Callable[[str], None] = lambda text: None
    enabled: bool = True
    attrs: Optional[dict[str, Any]] = None

    def after_block(self, position: "TrunkPosition") -> None:
        counter = position.recycle * (self.blocks + 1) + position.blocks
        where = f"after block {position.blocks} of recycle {position.recycle}"
        due = self.enabled and (position.blocks % self.every_blocks == 0 or position.blocks == self.blocks)
        stopping = self.stop is not None and self.stop.agreed(self.grid)
        if due or stopping:
            path = self._write(counter, {"stage": "trunk", "recycle": position.recycle, "blocks": position.blocks},
                               position.s, position.z)
            if stopping:
                raise Preempted(path, where)

    def after_step(self, step: int, steps: int, coords: Tensor, trunk: "TrunkOutput",
                   generator: torch.Generator) -> None:
        due = self.enabled and step < steps and step % self.every_steps == 0
        stopping = self.stop is not None and self.stop.agreed(self.grid)
        if due or stopping:
            state = generator.get_state()
            path = self._write(SAMPLING_BASE + step, {"stage": "sampling", "recycle": self.recycling_steps,
                                                      "blocks": self.blocks, "sampling_step": step},
                               trunk.s, trunk.z, coords, state)
            if stopping:
                raise Preempted(path, f"after sampler step {step}")

    def _write(self, counter: int, attrs: dict[str, Any], s: Tensor, z: Tensor, coords: Optional[Tensor] = None,
               generator_state: Optional[Tensor] = None) -> Path:
        grid = self.grid
        path = self.directory / checkpoint_name(PREFIX, counter)
        root = {"kind": "checkpoint", "fingerprint": self.identity, "n_tokens": self.n_tokens,
                "dtype": str(z.dtype).removeprefix("torch."), **(self.attrs or {}), **attrs}
        # float64 runs keep float64; float32 (and lower) precision is stored as float32, exactly
        stored = torch.float64 if z.dtype == torch.float64 else torch.float32
        dtype = np.float64 if stored == torch.float64 else np.float32
        pair_file = PairFile.for_grid(path, grid, attrs=root)
        if pair_file is not None:
            with pair_file as out:
                out.create_tokens("/trunk/s", self.n_tokens, trail=(s.shape[-1],), dtype=dtype)
                out.write_tokens("/trunk/s", s[0].detach().to(stored).cpu())  # [N, C_s]
                out.create_pair("/trunk/z", self.n_tokens, trail=(z.shape[-1],), dtype=dtype)
                out.write_tile("/trunk/z", z[0].detach().to(stored).cpu())  # [n, n, C_z] tile
                if coords is not None:
                    out.write_replicated("/sampling/coords", coords.detach().to(torch.float64).cpu())
                    out.write_replicated("/sampling/generator", generator_state.cpu())
        grid.comm.Barrier()  # complete on every rank's view before anyone deletes the older ones
        if grid.rank == 0:
            self._rotate()
            self.say(f"checkpoint {attrs['stage']} {_where(attrs)}: {path}")
        return path

    def _rotate(self) -> None:
        names = [entry.name for entry in self.directory.iterdir()] if self.directory.is_dir() else []
        masters = [n for n in names if (parsed := parse_checkpoint_name(n, PREFIX)) and parsed[1] is None]
        good = [n for n in masters if verify(self.directory / n)]
        for name in rotation(names, PREFIX, self.keep, complete=good):
            (self.directory / name).unlink(missing_ok=True)


def _where(attrs: dict[str, Any]) -> str:
    if attrs["stage"] == "sampling":
        return f"after sampler step {attrs['sampling_step']}"
    return f"after block {attrs['blocks']} of recycle {attrs['recycle']}"


def find_checkpoint(target: str | Path) -> Path:
    """The checkpoint to resume from: ``target`` itself when it is a complete checkpoint file, else the newest
    complete one in its folder (``target`` may be the folder). Raises CheckpointError when there is none."""
    target = Path(target)
    folder = target if target.is_dir() else target.parent
    if target.is_file() and verify(target):
        return target
    masters = sorted((n for n in (os.listdir(folder) if folder.is_dir() else [])
                      if (parsed := parse_checkpoint_name(n, PREFIX)) and parsed[1] is None), reverse=True)
    if target.is_file():  # given but damaged: the newest complete one written before it
        masters = [n for n in masters if n < target.name]
    for name in masters:
        if verify(folder / name):
            return folder / name
    raise CheckpointError(f"{target}: no complete checkpoint to resume from"
                          + (" (this file is incomplete or damaged)" if target.is_file() else ""))


def load_checkpoint(path: Path, grid: "ProcessGrid", identity: str, dtype: torch.dtype) -> "ResumePoint":
    """This rank's :class:`ResumePoint` from checkpoint ``path`` (written on any grid: tiles are re-cut for this
    one). Raises CheckpointError when the checkpoint belongs to another run (fingerprint) ."""
    import h5py

    from ..model.boltz2 import ResumePoint
    from ..model.trunk import TrunkPosition

    with h5py.File(path, "r") as h5:
        attrs = dict(h5.attrs)
        if attrs.get("fingerprint") != identity:
            raise CheckpointError(f"{path}: written by another job (its input, model, sampling settings, seed or "
                                  f"dtype differ: fingerprint {attrs.get('fingerprint')} vs {identity})")
        device = grid.device
        s = torch.from_numpy(read_full(h5, "/trunk/s")).to(device=device, dtype=dtype)[None]
        z = torch.from_numpy(read_tile(h5, "/trunk/z", grid.p, grid.row, grid.col)).to(device=device, dtype=dtype)[None]
        position = TrunkPosition(int(attrs["recycle"]), int(attrs["blocks"]), s, z)
        if attrs["stage"] == "trunk":
            return ResumePoint("trunk", position)
        coords = torch.from_numpy(read_full(h5, "/sampling/coords")).to(device=device, dtype=dtype)
        state = torch.from_numpy(read_full(h5, "/sampling/generator"))
        return ResumePoint("sampling", position, int(attrs["sampling_step"]), coords, state)
