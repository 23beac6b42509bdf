"""``python -m foldcp_hpc.bench h5write``: write throughput of pair tiles to HDF5, at the running rank count.

Run it under the launcher (``jobs/mpirun-local.sh -n 4 .venv/bin/python -m foldcp_hpc.bench h5write --n 2048
--c 128``): the ranks form a p x p grid, each holds a random ``[n_local, n_local, C]`` tile of ``/trunk/z``
[N, N, C], and the whole file is written with each writer (one parallel file through MPI-IO, and the
per-rank fallback with its virtual master). Times are the slowest rank's, between barriers:

* write: the collective tile writes alone (into the page cache);
* file: create the file and dataset, write, mark complete and close;
* +fsync: file, then every rank fsyncs what it wrote (the data reached the disk).

Throughput is the dataset's logical size (N * N * C * itemsize) over the time, the median of ``--repeats``
runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=2048, help="tokens N (default 2048)")
    parser.add_argument("--c", type=int, default=128, help="channels C of z (default 128)")
    parser.add_argument("--dtype", choices=("float32", "float16", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per writer after one warm-up run")
    parser.add_argument("--writers", default="mpio,fallback", help="comma-separated: mpio, fallback")
    parser.add_argument("--dir", help="folder for the files (default: a new folder in the system temp folder)")


def run(args: argparse.Namespace) -> int:
    import h5py
    from mpi4py import MPI

    from ..distributed.grid import infer_grid_shape
    from ..distributed.layout import TileLayout
    from ..io.h5layout import rank_file_name
    from ..io.tiles import PairFile, read_tile

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    _, p = infer_grid_shape(comm.Get_size(), dp=1)
    row, col = divmod(rank, p)
    layout = TileLayout(args.n, p)
    dtype = np.dtype(args.dtype)
    tile = np.random.default_rng(rank).standard_normal((layout.n_local, layout.n_local, args.c)).astype(dtype)
    writers = [w.strip() for w in args.writers.split(",") if w.strip()]
    unknown = set(writers) - {"mpio", "fallback"}
    if unknown:
        raise SystemExit(f"bench h5write: unknown writer(s) {', '.join(sorted(unknown))}; expected mpio, fallback")
    if "mpio" in writers and not h5py.get_config().mpi:
        writers.remove("mpio")
        if rank == 0:
            print(f"h5py {h5py.__version__} is not built with MPI: the mpio writer is skipped", flush=True)
    folder = comm.bcast(tempfile.mkdtemp(prefix="foldcp-h5write-", dir=args.dir) if rank == 0 else None, root=0)
    nbytes = args.n * args.n * args.c * dtype.itemsize
    rows = []
    try:
        for writer in writers:
            fallback = writer == "fallback"
            times: dict[str, list[float]] = {"write": [], "file": [], "fsync": []}
            for repeat in range(args.repeats + 1):
                path = Path(folder) / f"z-{writer}-{repeat}.h5"
                comm.Barrier()
                start = time.perf_counter()
                with PairFile(path, comm, p, attrs={"stage": "bench"}, fallback=fallback) as out:
                    out.create_pair("/trunk/z", args.n, trail=(args.c,), dtype=dtype)
                    comm.Barrier()
                    write_start = time.perf_counter()
                    out.write_tile("/trunk/z", tile)
                    comm.Barrier()
                    write_end = time.perf_counter()
                closed = time.perf_counter()
                mine = [rank_file_name(path, rank)] if fallback else []
                if rank == 0:
                    mine.append(path)
                for name in mine:
                    fd = os.open(name, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
                comm.Barrier()
                synced = time.perf_counter()
                if not np.array_equal(read_tile(path, "/trunk/z", p, row, col), tile):
                    raise SystemExit(f"bench h5write: rank {rank}: tile ({row}, {col}) read back differs ({writer})")
                comm.Barrier()
                if repeat:  # the first run warms up
                    times["write"].append(comm.allreduce(write_end - write_start, op=MPI.MAX))
                    times["file"].append(comm.allreduce(closed - start, op=MPI.MAX))
                    times["fsync"].append(comm.allreduce(synced - start, op=MPI.MAX))
                if rank == 0:
                    for name in [path, *(rank_file_name(path, k) for k in range(p * p) if fallback)]:
                        name.unlink()
            rows.append({"writer": writer, **{k: statistics.median(v) for k, v in times.items()}})
    finally:
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    if rank == 0:
        _print_table(rows, args, p, nbytes, folder)
    return 0


def _print_table(rows: list[dict], args: argparse.Namespace, p: int, nbytes: int, folder: str) -> None:
    print(f"HDF5 write of /trunk/z [N, N, C]: N={args.n}, C={args.c}, {args.dtype}, {nbytes / MIB:.1f} MiB, "
          f"{p * p} rank(s) on a {p}x{p} grid, {args.repeats} timed run(s) (median), files in {Path(folder).parent}")
    header = (f"{'writer':<9} {'ranks':>5} {'grid':>5} {'write s':>9} {'MiB/s':>9} {'file s':>9} {'MiB/s':>9} "
              f"{'+fsync s':>9} {'MiB/s':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = " ".join(f"{r[k]:>9.3f} {nbytes / MIB / r[k]:>9.0f}" for k in ("write", "file", "fsync"))
        print(f"{r['writer']:<9} {p * p:>5} {f'{p}x{p}':>5} {cells}")
    print("write: the collective tile writes; file: create + write + mark complete + close; "
          "+fsync: file, then every rank's fsync (slowest rank, between barriers)")
    sys.stdout.flush()
