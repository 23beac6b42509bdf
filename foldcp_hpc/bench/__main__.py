"""Benchmarks that print tables: ``python -m foldcp_hpc.bench pairformer|trunk --n 192 --ranks 1,4,9``.

``pairformer`` times one Pairformer layer forward (Boltz-2 sizes: C_s 384, C_z 128, 16 heads, triangle
attention 4 x 32, inference mode, Boltz's query chunking) on grids of 1, 4, 9, ... ranks, each run started
through a launcher (default: jobs/mpirun-local.sh), and boltz's own ``PairformerLayer`` on the same input in
the one-rank run. It prints per-rank peak memory (the bytes a rank held above what it held before the call:
the layer's input excluded, its output and every transient included), the wall time of the slowest rank,
and both as ratios against p = 1 and against boltz.

``trunk`` runs the whole trunk (input embedder, pair init, recycling, MSA module, Pairformer, distogram) on a
synthetic single-protein input of N residues with a generated MSA, Boltz-2 widths, and the same for boltz's
modules in the one-rank run; peak memory counts everything the call allocates (the features and weights,
made before it, excluded).

``fold`` runs the whole model end to end under the launcher itself (random weights of the released architecture,
features from a pickle, checkpoints and resume) and prints the time and per-rank peak memory of each stage.

``forward`` runs under the launcher itself (``python -m foldcp_hpc.bench forward --n 512,1024,2048 --device cuda``)
and times the whole forward (3 recycles, 200 sampler steps, confidence; bfloat16 autocast by default), ours and
boltz's ``Boltz2.forward`` (one-rank runs), on the same synthetic protein of N residues (about 8 atoms each, 64 MSA
rows) and the same random weights of the released architecture. It prints per-rank peak memory and ours / boltz,
reports OOM per size (so one run probes the largest N) and compares the two trunks' distogram logits.

``h5write`` runs under the launcher itself (``mpirun -n 4 python -m foldcp_hpc.bench h5write --n 2048 --c 128``)
and prints the write throughput of the pair tiles to HDF5, one parallel file and the per-rank fallback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ..runtime import expandable_device_memory

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m foldcp_hpc.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {"pairformer": "one Pairformer layer forward", "trunk": "the whole trunk forward (one recycle)",
             "sampler": "the diffusion conditioning and one sampler step"}
    for name in ("pairformer", "pairformer-worker", "trunk", "trunk-worker", "sampler", "sampler-worker"):
        sub = commands.add_parser(name, help=helps.get(name, argparse.SUPPRESS))
        sub.add_argument("--n", type=int, default=192, help="tokens N (default 192)")
        sub.add_argument("--c-s", type=int, default=384)
        sub.add_argument("--c-z", type=int, default=128)
        sub.add_argument("--dtype", choices=("float32", "bfloat16", "bf16-mixed", "float64"), default="float32",
                         help="bfloat16: z stored in bfloat16 under autocast; bf16-mixed: z float32 under autocast "
                              "(as foldcp-hpc run's [model] dtype = \"bf16-mixed\"); pairformer only")
        sub.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        sub.add_argument("--backend", default="auto", help="grid backend: auto, gloo, nccl, host")
        sub.add_argument("--repeats", type=int, default=1, help="timed runs after the measured one")
        sub.add_argument("--no-boltz", action="store_true", help="skip boltz's layer")
        sub.add_argument("--quick", action="store_true",
                         help="one run per size (no warm-up, no communication breakdown): for the largest sizes")
        if name.startswith("sampler"):
            sub.add_argument("--msa-rows", type=int, default=1)
            sub.add_argument("--layers", type=int, default=24, help="token-transformer layers (Boltz-2: 24)")
            sub.add_argument("--samples", type=int, default=1, help="samples denoised together")
        if name.startswith("trunk"):
            sub.add_argument("--msa-rows", type=int, default=64, help="MSA rows of the synthetic input (default 64)")
            sub.add_argument("--blocks", type=int, default=2,
                             help="Pairformer blocks (default 2; the peak does not depend on it, the time does)")
            sub.add_argument("--recycles", type=int, default=1)
        if not name.endswith("-worker"):
            sub.add_argument("--ranks", default="1,4,9", help="comma-separated rank counts (squares)")
            sub.add_argument("--launcher", default=str(REPO / "jobs" / "mpirun-local.sh"),
                             help="command that starts N ranks when given '-n N' (default jobs/mpirun-local.sh)")
            sub.add_argument("--json", help="also write the rows to this file")
        else:
            sub.add_argument("--out", required=True)
    from .h5write import add_arguments as add_h5write_arguments

    add_h5write_arguments(commands.add_parser("h5write", help="pair-tile write throughput to HDF5 (run under mpirun)"))
    from .fold import add_arguments as add_fold_arguments

    add_fold_arguments(commands.add_parser("fold", help="the whole model end to end, stage times and memory "
                                                        "(run under mpirun)"))
    from .forward import add_arguments as add_forward_arguments

    add_forward_arguments(commands.add_parser("forward", help="the whole model forward, ours and boltz's "
                                                              "Boltz2.forward (run under mpirun)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    expandable_device_memory()
    args = _parser().parse_args(argv)
    if args.command == "pairformer-worker":
        from .pairformer import run_worker

        run_worker(args)
        return 0
    if args.command == "trunk-worker":
        from .trunk import run_worker as run_trunk_worker

        run_trunk_worker(args)
        return 0
    if args.command == "sampler-worker":
        from .sampler import run_worker as run_sampler_worker

        run_sampler_worker(args)
        return 0
    if args.command == "h5write":
        from .h5write import run as run_h5write

        return run_h5write(args)
    if args.command == "fold":
        from .fold import run as run_fold

        return run_fold(args)
    if args.command == "forward":
        from .forward import run as run_forward

        return run_forward(args)
    return _drive(args)


def _drive(args: argparse.Namespace) -> int:
    rows = []
    worker_args = [f"--n={args.n}", f"--c-s={args.c_s}", f"--c-z={args.c_z}", f"--dtype={args.dtype}",
                   f"--device={args.device}", f"--backend={args.backend}", f"--repeats={args.repeats}"]
    if args.no_boltz:
        worker_args.append("--no-boltz")
    if args.quick:
        worker_args.append("--quick")
    if args.command == "trunk":
        worker_args += [f"--msa-rows={args.msa_rows}", f"--blocks={args.blocks}", f"--recycles={args.recycles}"]
    if args.command == "sampler":
        worker_args += [f"--msa-rows={args.msa_rows}", f"--layers={args.layers}", f"--samples={args.samples}"]
    for ranks in (int(r) for r in args.ranks.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            command = [*shlex.split(args.launcher), "-n", str(ranks), sys.executable, "-m", "foldcp_hpc.bench",
                       f"{args.command}-worker", *worker_args, f"--out={out}"]
            env = dict(os.environ, PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_="65536")
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0 or not out.exists():
                sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
                raise SystemExit(f"bench: the {ranks}-rank run failed (exit {done.returncode})")
            rows.extend(json.loads(out.read_text()))
    _print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    stages = list(dict.fromkeys(r.get("stage", "") for r in rows))
    for stage in stages:
        _print_stage([r for r in rows if r.get("stage", "") == stage], args, stage)


def _print_stage(rows: list[dict], args: argparse.Namespace, stage: str) -> None:
    base = next((r for r in rows if r["impl"] == "foldcp_hpc" and r["ranks"] == 1), None)
    boltz = next((r for r in rows if r["impl"] == "boltz"), None)
    what = "One Pairformer layer forward"
    if args.command == "sampler":
        what = (f"Diffusion: {stage} ({args.layers} token-transformer layers, {args.samples} sample(s), "
                f"{rows[0].get('atoms', '?')} atoms)")
    if args.command == "trunk":
        what = (f"The trunk forward ({args.recycles} recycle(s), {args.blocks} Pairformer blocks, "
                f"{args.msa_rows} MSA rows, {rows[0].get('atoms', '?')} atoms)")
    print(f"{what}: N={args.n}, C_s={args.c_s}, C_z={args.c_z}, {args.dtype}, "
          f"{args.device}, device of rank 0: {rows[0]['device_name']}")
    layer = args.command.startswith("pairformer")
    totals = any(any(p is not None for p in r.get("device_peak_bytes") or ()) for r in rows)
    header = (f"{'impl':<11} {'ranks':>5} {'grid':>5} {'peak/rank MiB min':>17} {'median':>8} {'max':>8} "
              f"{'peak vs p=1':>11} {'time s':>8}{' TFLOP/s' if layer else ''} {'time vs boltz':>13} "
              f"{'comm share':>10}{' device GiB' if totals else ''}")
    print(header)
    print("-" * len(header))
    for r in rows:
        peaks = [p / MIB for p in r["peak_bytes"]]
        ratio = f"{max(r['peak_bytes']) / max(base['peak_bytes']):.3f}" if base else "-"
        vs_boltz = f"{r['seconds'] / boltz['seconds']:.2f}" if boltz else "-"
        share = f"{r['comm_seconds'] / r['clocked_seconds']:.2f}" if r.get("clocked_seconds") else "-"
        # one layer: 12 C_z N^3 FLOP (two triangle products, 4 C_z N^3 together; two triangle attentions with
        # H x D = C_z, 8 C_z N^3): 1,536 N^3 at C_z = 128, the GPU issue's count; summed over all ranks
        flops = f" {12 * args.c_z * args.n ** 3 / r['seconds'] / 1e12:>7.1f}" if layer else ""
        held = [p for p in r.get("device_peak_bytes") or () if p is not None]
        device = (f" {max(held) / 2**30:>10.2f}" if held else f" {'-':>10}") if totals else ""
        print(f"{r['impl']:<11} {r['ranks']:>5} {r['grid']:>5} {min(peaks):>17.1f} {statistics.median(peaks):>8.1f} "
              f"{max(peaks):>8.1f} {ratio:>11} {r['seconds']:>8.3f}{flops} {vs_boltz:>13} {share:>10}{device}")
    if totals:
        print("peak/rank: the bytes the call held above what was live before it; device GiB: the most allocated on "
              "the GPU during the measured runs (z, s, masks and weights included; the largest rank)")
    if any(r.get("clocked_seconds") for r in rows):
        print("comm share: seconds in collectives / total, in one extra run with every collective synchronised "
              "(so without overlap), slowest rank")
    split = [r for r in rows if r.get("compute_seconds") is not None]
    if split:
        header = (f"{'ranks':>5} {'grid':>5} {'time s':>8} {'compute s':>9} {'transfer s':>10} {'waiting s':>9} "
                  f"{'exposed comm s':>14}")
        print("Per-layer breakdown of the multi-rank runs (seconds; compute, transfer and waiting from the clocked "
              "run; exposed = time - compute):")
        print(header)
        print("-" * len(header))
        for r in split:
            print(f"{r['ranks']:>5} {r['grid']:>5} {r['seconds']:>8.3f} {r['compute_seconds']:>9.3f} "
                  f"{r['transfer_seconds']:>10.3f} {r['wait_seconds']:>9.3f} "
                  f"{max(0.0, r['seconds'] - r['compute_seconds']):>14.3f}")


if __name__ == "__main__":
    sys.exit(main())
