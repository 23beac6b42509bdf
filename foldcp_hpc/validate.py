"""``foldcp-hpc validate job.toml --ranks P``: check a job before it queues, on one process.

What a run would refuse, found on a login node in seconds instead of after the queue wait: the job file (as
``run`` reads it, overrides included), the grid for P ranks, the checkpoint file, the output folder, and the
input (parsed, tokenized and featurized with the code ``run`` uses on rank 0). No GPU is touched, MPI is not
initialised (so it runs where ``mpirun`` is not allowed) and the model does not run.

Each check prints one line as it passes; the first failure ends the report with one line naming the file and
field, and the command exits with status 1. The last line is ``OK`` when every check passed.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from .config import ConfigError, JobConfig, load_job
from .errors import UniformError

__all__ = ["ValidationError", "validate_job", "run_validate"]

EXIT_INVALID = 1
Z_CHANNELS = 128  # Boltz-2's token_z


class ValidationError(UniformError):
    """A job that a run would refuse; the message is one line naming the file and the field."""


def validate_job(job_path: str, overrides: list[str], ranks: int, *, features: bool = True,
                 say: Callable[[str], None] = print) -> JobConfig:
    """Run every check in order, ``say`` one line per passed check; return the job.

    Args:
        job_path: the job file; overrides: ``section.key=value`` items, as ``run`` takes them.
        ranks: P, the number of ranks the job will be launched on.
        features: featurize the input (as ``run`` does on rank 0). False: parse and tokenize only, which
            gives the same counts in a fraction of the time for very large inputs.

    Raises:
        ConfigError, GridError, InputError, ValidationError: the first problem found, as one line.
    """
    job = load_job(job_path, overrides)
    say(f"job {job.source}: read" + (f" with overrides {' '.join(overrides)}" if overrides else ""))
    dp, p = _check_grid(job, ranks)
    say(f"grid: {ranks} ranks = {dp} replica(s) x {p}x{p} (dp x p x p), transport {job.runtime.backend}")
    if dp > 1:
        say(_replica_work(dp, job.sampling.diffusion_samples))
    say(_check_checkpoint(job))
    say(_check_output(job))
    summary = _check_input(job, features)
    n_tokens = summary["tokens"]
    n_local = math.ceil(n_tokens / p)
    say(f"input {summary['name']}: {n_tokens:,} tokens, {summary['atoms']:,} atoms, {summary['chains']} chains, MSA "
        f"of {summary['msa_rows']:,} rows ({summary['how']})")
    # The released widths (boltz2-small keeps them), whatever the checkpoint: z has 128 channels.
    z_bytes = n_local * n_local * Z_CHANNELS * (8 if job.model.dtype == "float64" else 4)
    say(f"per rank: pair tiles of {n_local:,}x{n_local:,} tokens ({n_tokens:,} padded to {n_local * p:,} in {p} "
        f"blocks); the pair representation z alone takes {_size(z_bytes)} per rank in "
        f"{'float32 (bf16-mixed)' if job.model.dtype == 'bf16-mixed' else job.model.dtype} "
        "(foldcp-hpc plan predicts each stage's peak)")
    return job


def run_validate(job_path: str, overrides: list[str], ranks: int, features: bool = True,
                 traceback_wanted: bool | None = None) -> int:
    """The command: the report on stdout, ``OK`` last; or the failure as one line on stderr and status 1.

    Failures are reported here rather than by :func:`foldcp_hpc.runtime.abort_on_error`, whose abort path
    initialises MPI to learn the rank; validate runs where MPI may not be usable at all.
    """
    if traceback_wanted is None:
        traceback_wanted = os.environ.get("FOLDCP_TRACEBACK", "") not in ("", "0")
    try:
        validate_job(job_path, overrides, ranks, features=features, say=lambda line: print(line, flush=True))
    except UniformError as exc:
        if traceback_wanted:
            traceback.print_exception(exc, file=sys.stderr)
        message = str(exc).replace("\n", " | ")
        print(f"foldcp-hpc validate: {type(exc).__name__}: {message}", file=sys.stderr, flush=True)
        return EXIT_INVALID
    print("OK", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------------
def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _check_grid(job: JobConfig, ranks: int) -> tuple[int, int]:
    from .distributed.grid import GridError, infer_grid_shape

    if ranks < 1:
        raise ValidationError(f"command line: --ranks must be positive, got {ranks}")
    try:
        return infer_grid_shape(ranks, job.grid.cp, job.grid.dp)
    except GridError as exc:
        cp = "unset" if job.grid.cp is None else job.grid.cp
        raise GridError(f"{job.source}: [grid] cp = {cp}, dp = {job.grid.dp} with --ranks {ranks}: {exc}") from None


def _replica_work(dp: int, samples: int) -> str:
    """What the replicas share: the diffusion samples (each also runs the trunk); a note when some get none."""
    from .distributed.layout import replica_share

    shares = [len(replica_share(samples, dp, k)) for k in range(dp)]
    line = (f"replicas: each runs the trunk; the {samples} diffusion sample(s) split "
            f"{' + '.join(str(n) for n in shares)}")
    idle = shares.count(0)
    if idle:
        line += (f"; note: {idle} of {dp} replicas get no sample and idle through sampling and confidence "
                 f"(set diffusion_samples >= {dp}, or use fewer replicas and a larger grid)")
    return line


def _check_checkpoint(job: JobConfig) -> str:
    """Checkpoint files exist and can be read (their contents are checked by the run, which loads them)."""
    parts = []
    for key, value in (("checkpoint", job.model.checkpoint), ("affinity_checkpoint", job.model.affinity_checkpoint)):
        if value is None:
            continue
        if value == "random":
            parts.append(f"{key} seeded random" + (f" ({job.model.architecture}; outputs will be labelled untrained)"
                                                   if key == "checkpoint" else ""))
            continue
        path = job.resolve(value)
        if not path.is_file():
            raise ValidationError(f"{job.source}: [model] {key}: no such file {path}")
        if not os.access(path, os.R_OK):
            raise ValidationError(f"{job.source}: [model] {key}: {path} is not readable")
        parts.append(f"{key} {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    return "weights: " + "; ".join(parts)


def _check_output(job: JobConfig) -> str:
    """The output folder, or the nearest existing folder above it (``run`` creates the rest), accepts a file."""
    out = job.resolve(job.output.dir)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValidationError(f"{job.source}: [output] dir: {existing} is not a folder, so {out} cannot be created")
    try:  # os.access trusts the mode bits; a real file also catches read-only mounts and quotas at zero
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ValidationError(f"{job.source}: [output] dir: cannot write in {existing}: {exc.strerror}") from None
    if existing == out:
        return f"output: {out} (exists, writable)"
    return f"output: {out} (will be created in {existing}, writable)"


def _check_input(job: JobConfig, features: bool) -> dict:
    from .data.inputs import InputError

    if job.input.path is None:
        raise ConfigError(f"{job.source}: [input] path: required (the Boltz .yaml or .fasta to fold)")
    path, cache = job.resolve(job.input.path), job.resolve(job.input.ccd_cache)
    start = time.perf_counter()
    try:
        summary = _featurized(job, path, cache) if features else _tokenized(job, path, cache)
    except UniformError:
        raise
    except Exception as exc:  # noqa: BLE001 - boltz's own parser errors are not one-liners; make them one
        raise InputError(f"{path}: could not be featurized: {type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - start
    summary["how"] = (f"featurized in {seconds:.1f} s" if features else
                      f"parsed and tokenized in {seconds:.1f} s; features not computed: --no-features")
    return summary


def _featurized(job: JobConfig, path: Path, cache: Path) -> dict:
    from .featurize import features_of

    _, summary = features_of(path, cache, job.input.max_tokens, job.input.max_msa_seqs)
    return summary


def _tokenized(job: JobConfig, path: Path, cache: Path) -> dict:
    """The counts ``features_of`` reports, from the tokenized input alone (no atom or MSA features)."""
    from .data.inputs import InputError
    from .data.msa import plan_msa
    from .featurize import tokenize_input

    parsed, tokenized, _ = tokenize_input(path, cache, job.input.max_msa_seqs)
    n_tokens = len(tokenized.tokens)
    if job.input.max_tokens is not None and n_tokens > job.input.max_tokens:
        raise InputError(f"{path}: {n_tokens} tokens, more than [input] max_tokens = {job.input.max_tokens}")
    return {"name": parsed.target.record.id, "tokens": n_tokens, "atoms": int(tokenized.tokens["atom_num"].sum()),
            "chains": len(parsed.target.structure.chains), "msa_rows": plan_msa(tokenized).n_rows}
