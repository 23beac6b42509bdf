"""``foldcp-hpc plan job.toml --ranks P [--gpu-mem 80GiB]``: the per-rank memory of a job, before running it.

Serial: no MPI, no GPU. Reads the job, counts the input's tokens, atoms and MSA rows (parse and tokenize with
boltz; the full featurizer only when the input has MSA files or templates, whose row and template counts it
decides), and prints the memory model's per-stage table (:mod:`.model`), whether the run fits the given memory
per rank, the largest token count that fits at this grid, and the smallest square grid that fits.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional, TextIO

from ..config import ConfigError, JobConfig, load_job
from ..errors import UniformError
from .model import (BOLTZ2_PARAMETERS, BOLTZ2_SMALL_PARAMETERS, CHUNKS, DTYPE_BYTES, GIB, MIB, Architecture, MemoryPlan,
                    Problem, largest_tokens, plan_memory, samples_per_step, smallest_grid)

__all__ = ["parse_memory", "architecture_of", "count_input", "InputCount", "format_plan", "run_plan", "plan_command"]

_UNITS = {"": GIB, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2, "g": GIB,
          "gb": 1e9, "gib": GIB, "t": 1024**4, "tb": 1e12, "tib": 1024**4}


def parse_memory(text: str) -> float:
    """``"80GiB"`` -> bytes. Units: B, kB/KiB, MB/MiB, GB/GiB (GB = 10^9, GiB = 2^30), TB/TiB; no unit means GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--gpu-mem {text!r}: expected a size such as 80GiB, 80GB or 141G")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(f"--gpu-mem {text!r}: must be positive")
    return value


def architecture_of(job: JobConfig) -> tuple[Architecture, str]:
    """The job's architecture and a one-line description of where it comes from."""
    from ..data.boltz2_hparams import boltz2_hparams, reduced_boltz2_hparams

    if job.model.checkpoint == "random" and job.model.architecture == "boltz2-small":
        return Architecture.from_hparams(reduced_boltz2_hparams(), BOLTZ2_SMALL_PARAMETERS), "boltz2-small (random weights)"
    source = ("the released Boltz-2 (random weights)" if job.model.checkpoint == "random"
              else f"checkpoint {job.model.checkpoint}, assumed to be the released Boltz-2 architecture")
    return Architecture.from_hparams(boltz2_hparams(), BOLTZ2_PARAMETERS), source


@dataclass
class InputCount:
    """The input's sizes and how they were counted."""

    problem: Problem
    name: str
    how: str
    seconds: float


def count_input(job: JobConfig) -> InputCount:
    """Tokens, atoms (padded to 32), MSA rows and templates present of the job's input, counted on this process."""
    if job.input.path is None:
        raise ConfigError(f"{job.source}: [input] path: required to plan (or give --tokens and --atoms)")
    from ..featurize import features_of, tokenize_input

    start = time.perf_counter()
    path, cache = job.resolve(job.input.path), job.resolve(job.input.ccd_cache)
    parsed, tokenized, msas = tokenize_input(path, cache, job.input.max_msa_seqs)
    name = parsed.target.record.id
    templates = list(getattr(parsed.target, "templates", None) or [])
    if not msas and not templates:
        n_tokens = len(tokenized.tokens)
        n_atoms = int(tokenized.tokens["atom_num"].sum())
        problem = Problem(n_tokens, n_atoms, msa_rows=1, templates=0)
        return InputCount(problem, name, "parsed and tokenized (no MSA files, no templates)", time.perf_counter() - start)
    features, summary = features_of(path, cache, job.input.max_tokens, job.input.max_msa_seqs)
    present = int(features.template["template_mask"].any(dim=1).sum()) if features.template else 0
    problem = Problem(summary["tokens"], features.n_atoms, msa_rows=summary["msa_rows"], templates=present)
    return InputCount(problem, name, "featurized", time.perf_counter() - start)


def _size(x: float, unit: float) -> str:
    return f"{x / unit:,.2f}"


def format_plan(plan: MemoryPlan, arch: Architecture, memory: float, source: str, count: Optional[InputCount],
                out: TextIO) -> None:
    """Print the table, the verdict, the largest N at this grid and the smallest grid that fits."""
    problem = plan.problem
    n_local = -(-problem.n_tokens // plan.p)
    tile = n_local * n_local * 128 * DTYPE_BYTES[plan.dtype]
    unit, name = (GIB, "GiB") if plan.total >= GIB else (MIB, "MiB")
    what = count.name if count else "what-if input"
    print(f"input {what}: {problem.n_tokens:,} tokens, {problem.n_atoms:,} atoms, MSA of {problem.msa_rows:,} "
          f"row(s), {problem.templates} template(s)" + (f" ({count.how} in {count.seconds:.1f} s)" if count else ""),
          file=out)
    print(f"model: {source}, {arch.n_parameters:,} parameters, {plan.dtype}; grid {plan.dp} x {plan.p}x{plan.p} "
          f"(dp x p x p) = {plan.ranks} ranks; pair tile {n_local:,} x {n_local:,} tokens (one tile of z: "
          f"{_size(tile, unit)} {name}); {plan.samples} sample(s) per denoising call", file=out)
    header = (f"{'stage':<32} {'held ' + name:>10} {'transient ' + name:>14} {'peak/rank ' + name:>14}  "
              f"dominated by (transient)")
    print(header, file=out)
    print("-" * len(header), file=out)
    worst = plan.peak_stage
    for stage in plan.stages:
        mark = " <- largest" if stage is worst else ""
        print(f"{stage.stage:<32} {_size(stage.held, unit):>10} {_size(stage.transient, unit):>14} "
              f"{_size(stage.peak, unit):>14}  {stage.dominant}{mark}", file=out)
    print(f"{'weights':<32} {'':>10} {'':>14} {_size(plan.weights, unit):>14}  every rank holds all "
          f"{arch.n_parameters:,} parameters", file=out)
    print(f"{'total (weights + largest stage)':<32} {'':>10} {'':>14} {_size(plan.total, unit):>14}  {worst.stage}",
          file=out)
    limit = f"{memory / GIB:g} GiB per rank"
    if plan.fits(memory):
        print(f"fits in {limit} ({plan.total / memory:.1%} of it; {plan.ranks} GPUs of {memory / GIB:g} GiB)",
              file=out)
    else:
        print(f"does not fit in {limit}: needs {plan.total / GIB:,.2f} GiB per rank", file=out)
    largest = largest_tokens(problem, arch, plan.p, memory, plan.dtype, plan.samples)
    print(f"largest input that fits at {plan.p}x{plan.p} in {limit}: "
          + (f"{largest:,} tokens (atoms in this input's proportion, same MSA depth)" if largest
             else "none (the weights and replicated tensors alone do not fit)"), file=out)
    best = smallest_grid(problem, arch, memory, plan.dtype, plan.samples)
    if best is None:
        print(f"no square grid up to 64x64 fits {limit}", file=out)
    else:
        peak = plan_memory(problem, arch, best, plan.dtype, plan.dp, plan.samples)
        print(f"smallest square grid that fits {limit}: {best}x{best} -> {plan.dp * best * best} GPUs "
              f"(dp = {plan.dp}); peak {peak.total / GIB:,.2f} GiB per rank in {peak.peak_stage.stage}", file=out)
    print("chunk sizes (the model's, assumed at every grid):", file=out)
    for where, what in CHUNKS.items():
        print(f"  {where}: {what}", file=out)
    print("not counted: rank 0's host memory while featurizing (O(N + M)); activation memory of the affinity "
          "module (inputs asking for affinity)", file=out)


def run_plan(job_path: Optional[str], overrides: list[str], ranks: int, gpu_mem: str = "80GiB",
             dtype: Optional[str] = None, tokens: Optional[int] = None, atoms: Optional[int] = None,
             msa_rows: Optional[int] = None, out: Optional[TextIO] = None) -> MemoryPlan:
    """``foldcp-hpc plan``: the plan of a job on ``ranks`` ranks (its grid from [grid] and the rank count), printed
    to ``out`` (stdout). ``tokens`` / ``atoms`` / ``msa_rows`` replace the input's counts (what-ifs; with both
    tokens and atoms the input is not read)."""
    from ..distributed.grid import GridError, infer_grid_shape

    out = sys.stdout if out is None else out
    job = load_job(job_path, overrides)
    try:
        dp, p = infer_grid_shape(ranks, job.grid.cp, job.grid.dp)
    except GridError as exc:
        cp = "unset" if job.grid.cp is None else job.grid.cp
        raise GridError(f"{job.source}: [grid] cp = {cp}, dp = {job.grid.dp} with --ranks {ranks}: {exc} (another "
                        f"grid: override grid.cp=...)") from None
    dtype = dtype or job.model.dtype
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    memory = parse_memory(gpu_mem)
    arch, source = architecture_of(job)
    count = None
    if tokens is not None and atoms is not None:
        problem = Problem(tokens, atoms, msa_rows or 1)
    else:
        count = count_input(job)
        problem = count.problem
        if tokens is not None:
            problem = problem.scaled(tokens)
        if atoms is not None:
            problem = Problem(problem.n_tokens, atoms, problem.msa_rows, problem.templates)
        if msa_rows is not None:
            problem = Problem(problem.n_tokens, problem.n_atoms, msa_rows, problem.templates)
    samples = samples_per_step(job.sampling.diffusion_samples, job.sampling.max_parallel_samples, dp)
    plan = plan_memory(problem, arch, p, dtype, dp, samples)
    print(f"foldcp-hpc plan: job {job.source}", file=out)
    format_plan(plan, arch, memory, source, count, out)
    return plan


def plan_command(job_path: Optional[str], overrides: list[str], ranks: int, gpu_mem: str = "80GiB",
                 dtype: Optional[str] = None, tokens: Optional[int] = None, atoms: Optional[int] = None,
                 msa_rows: Optional[int] = None, traceback_wanted: Optional[bool] = None) -> int:
    """The command: the plan on stdout and status 0 (whether or not it fits), or one error line on stderr and 1.

    Errors are reported here rather than by :func:`foldcp_hpc.runtime.abort_on_error`, whose abort path
    initialises MPI to learn the rank: plan runs where MPI may not be usable at all (a login node).
    """
    if traceback_wanted is None:
        traceback_wanted = os.environ.get("FOLDCP_TRACEBACK", "") not in ("", "0")
    try:
        run_plan(job_path, overrides, ranks, gpu_mem, dtype, tokens, atoms, msa_rows)
    except (UniformError, ValueError) as exc:
        if traceback_wanted:
            traceback.print_exception(exc, file=sys.stderr)
        message = str(exc).replace("\n", " | ")
        print(f"foldcp-hpc plan: {type(exc).__name__}: {message}", file=sys.stderr, flush=True)
        return 1
    return 0
