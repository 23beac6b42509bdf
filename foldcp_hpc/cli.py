"""``foldcp-hpc``: the command line. Thin: parses arguments, then calls the runtime.

    mpirun -n 4 foldcp-hpc info jobs/demo.toml [section.key=value ...]

Commands
    info       build the grid of a job, print it (rank map, groups, transport, devices) and run the
               collective self-check.
    featurize  check and parse the job's input, compute its features (rank 0) and every rank's pair-feature
               tile, and print a summary: what a run would fold, and the per-rank memory of the features.
    validate   check a job for P ranks on one process, without GPUs or MPI: job file, grid, checkpoint, output
               folder, input (featurized as run does); prints a report ending with OK, or one error line and
               exits with status 1.
    plan       predict the per-rank peak memory of each stage of a job on P ranks (serial, no GPU), say whether
               it fits a given memory per rank, the largest input that fits, and the smallest grid that fits.
    inspect    print what an HDF5 file of foldcp_hpc holds (stage, grid, datasets, complete or not); --plot
               draws a pair quantity as a PNG, read tile by tile and downsampled.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from . import __version__
from .runtime import abort_on_error, expandable_device_memory, rank0_print

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldcp-hpc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"foldcp-hpc {__version__}")
    parser.add_argument("--traceback", action="store_true", help="print full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="print the grid, rank map and transport; run the collective self-check")
    info.add_argument("job", nargs="?", help="job file (TOML); defaults apply without one")
    info.add_argument("overrides", nargs="*", metavar="section.key=value", help="override job-file values")

    featurize = commands.add_parser("featurize", help="check and featurize the job's input; print a summary")
    featurize.add_argument("job", help="job file (TOML) with an [input] section")
    featurize.add_argument("overrides", nargs="*", metavar="section.key=value", help="override job-file values")
    validate = commands.add_parser("validate", help="check a job for P ranks without GPUs, MPI or the model")
    validate.add_argument("job", help="job file (TOML)")
    validate.add_argument("overrides", nargs="*", metavar="section.key=value", help="override job-file values")
    validate.add_argument("--ranks", type=int, required=True, metavar="P",
                          help="ranks the job will run on (P = dp * p^2)")
    validate.add_argument("--no-features", action="store_true",
                          help="parse and tokenize the input but skip its features (same counts, much faster on "
                               "inputs of tens of thousands of tokens)")
    plan = commands.add_parser("plan", help="predict per-rank peak memory of each stage for P ranks (serial, no GPU)")
    plan.add_argument("job", help="job file (TOML)")
    plan.add_argument("overrides", nargs="*", metavar="section.key=value", help="override job-file values")
    plan.add_argument("--ranks", type=int, required=True, metavar="P", help="ranks of the run (P = dp * p^2)")
    plan.add_argument("--gpu-mem", default="80GiB", help="memory per rank (default 80GiB; GB = 1e9, GiB = 2^30)")
    plan.add_argument("--dtype", choices=("float32", "float64", "bfloat16"),
                      help="what-if precision (default: the job's [model] dtype)")
    plan.add_argument("--tokens", type=int, help="what-if token count (atoms in the input's proportion)")
    plan.add_argument("--atoms", type=int, help="what-if atom count (with --tokens the input is not read)")
    plan.add_argument("--msa-rows", type=int, help="what-if MSA depth")
    inspect = commands.add_parser("inspect", help="print what an HDF5 file of foldcp_hpc holds; plot a pair quantity")
    inspect.add_argument("file", help="HDF5 file (intermediates or checkpoint)")
    inspect.add_argument("--plot", metavar="NAME", help="dataset to draw as a PNG, e.g. /trunk/z or /confidence/pae")
    inspect.add_argument("--out", metavar="PNG", help="where to write the PNG (default <file stem><NAME>.png)")
    inspect.add_argument("--quantity", choices=("argmax", "expected", "norm", "value"),
                         help="what to draw (default: argmax for distograms, value for [S, N, N], norm otherwise)")
    inspect.add_argument("--downsample", type=int, metavar="K",
                         help="average K x K token blocks (default: the smallest K giving at most 2048 pixels)")
    inspect.add_argument("--sample", type=int, default=0, metavar="S", help="sample of an [S, N, N] dataset")
    run = commands.add_parser("run", help="fold the job's input and write Boltz-layout predictions")
    run.add_argument("job", help="job file (TOML)")
    run.add_argument("overrides", nargs="*", metavar="section.key=value", help="override job-file values")
    run.add_argument("--resume", metavar="CHECKPOINT", nargs="?", const="",
                     help="continue from a checkpoint file, or from the newest complete one in a folder (a damaged "
                          "file is passed over for the one before); alone: the job's checkpoint folder. The grid "
                          "may differ from the one that wrote it")
    return parser


def main(argv: list[str] | None = None) -> int:
    expandable_device_memory()
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so in `validate job.toml --ranks 8 grid.dp=2`
    # the override after the option arrives here: append it; anything else is still an error.
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    if getattr(args, "job", None) and "=" in args.job and not Path(args.job).exists():
        args.overrides, args.job = [args.job, *args.overrides], None  # only overrides were given
    with abort_on_error(args.traceback or None):
        if args.command == "info":
            return _info(args.job, args.overrides)
        if args.command == "featurize":
            from .featurize import run_featurize

            return run_featurize(args.job, args.overrides)
        if args.command == "validate":
            from .validate import run_validate

            return run_validate(args.job, args.overrides, args.ranks, features=not args.no_features,
                                traceback_wanted=args.traceback or None)
        if args.command == "plan":
            from .plan.report import plan_command

            return plan_command(args.job, args.overrides, args.ranks, args.gpu_mem, args.dtype, args.tokens,
                                args.atoms, args.msa_rows, traceback_wanted=args.traceback or None)
        if args.command == "inspect":
            from .inspect import run_inspect

            return run_inspect(args.file, args.plot, args.out, args.quantity, args.downsample, args.sample)
        if args.command == "run":
            from .run import run_job

            return run_job(args.job, args.overrides, resume=args.resume)
    return 0


def _info(job_path: str | None, overrides: list[str]) -> int:
    import torch

    from .config import load_job
    from .distributed.grid import ProcessGrid
    from .distributed.selfcheck import self_check

    job = load_job(job_path, overrides)
    grid_cfg, runtime_cfg = job.grid, job.runtime
    with ProcessGrid.create(grid_cfg.cp, grid_cfg.dp, backend=runtime_cfg.backend,
                            timeout_s=runtime_cfg.timeout_s) as grid:
        entry = (grid.rank, grid.replica, grid.row, grid.col, socket.gethostname(), grid.local_rank, str(grid.device))
        rank_map = grid.comm.gather(entry, root=0)
        rank0_print(f"foldcp-hpc {__version__} | job {job.source} | {grid.world_size} rank(s) | "
                    f"grid {grid.dp}x{grid.p}x{grid.p} (dp x p x p) | transport {grid.transport.name} "
                    f"(torch.distributed backend {grid.transport.backend}) | torch {torch.__version__}")
        if grid.rank == 0:
            _print_rank_map(rank_map)
            print(_groups_line(grid), flush=True)
        if not runtime_cfg.self_check:
            return 0
        results = self_check(grid)
        n_check = 3 * grid.p + 1
        rank0_print(f"collective self-check (N={n_check} tokens on a {grid.p}x{grid.p} grid, float64, "
                    f"slowest rank's time):")
        for result in results:
            rank0_print(f"  {result.name:<24} {'exact' if result.ok else 'WRONG':<6} {result.seconds * 1e3:8.2f} ms")
        n_ok = sum(r.ok for r in results)
        rank0_print(f"self-check: {n_ok}/{len(results)} collectives exact")
        if n_ok != len(results):
            bad = ", ".join(r.name for r in results if not r.ok)
            raise RuntimeError(f"collective self-check failed: {bad}")
    return 0


def _print_rank_map(rank_map: list[tuple]) -> None:
    print(f"{'rank':>5} {'replica':>7} {'row':>4} {'col':>4}  {'host':<20} {'local':>5}  device", flush=True)
    for rank, replica, row, col, host, local, device in rank_map:
        print(f"{rank:>5} {replica:>7} {row:>4} {col:>4}  {host[:20]:<20} {local:>5}  {device}", flush=True)


def _groups_line(grid) -> str:
    from .distributed.grid import axis_groups

    axes = ("row", "col", "replica") if grid.dp > 1 else ("row", "col")
    return "\n".join(f"{axis} groups: {' '.join(str(list(g)) for g in axis_groups(axis, grid.dp, grid.p))}"
                     for axis in axes)


if __name__ == "__main__":
    sys.exit(main())
