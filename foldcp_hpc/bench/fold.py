"""``python -m foldcp_hpc.bench fold``: the whole model end to end on the ranks it runs on (run it under mpirun).

The released Boltz-2 architecture (or boltz2-small) with seeded random weights made on each rank's device (no
checkpoint, no boltz needed on the compute nodes), the input's features from a pickle made beforehand
(``--save-features`` on a machine with boltz), and :meth:`FoldModel.predict` as ``foldcp-hpc run`` calls it: with
checkpoints in ``--checkpoint-dir``, SIGTERM / SIGUSR1 handling (exit 75) and resume from the newest checkpoint
there. Prints and writes (``--json``) the per-stage time and per-rank peak memory.

    python -m foldcp_hpc.bench fold --save-features capsid.pkl --input inputs/capsid_12mer.yaml     # with boltz
    mpirun -n 4 python -m foldcp_hpc.bench fold --features capsid.pkl --backend nccl --json report.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

from ..model.precision import PRECISIONS, Precision

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="a Boltz .yaml to featurize (with --save-features: only featurize)")
    parser.add_argument("--save-features", metavar="PKL", help="write the input's features here and stop")
    parser.add_argument("--features", metavar="PKL", help="features written by --save-features")
    parser.add_argument("--ccd-cache", default="~/.cache/foldcp_hpc/ccd")
    parser.add_argument("--architecture", choices=("boltz2", "boltz2-small"), default="boltz2")
    parser.add_argument("--recycles", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--dtype", choices=PRECISIONS, default="float32",
                        help="the job's [model] dtype: float32, float64 or bf16-mixed (boltz predict's)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dp", type=int, default=1,
                        help="replicas of the grid (they split the samples): ranks = dp x p x p")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=".cache/bench-fold/ckpt")
    parser.add_argument("--every-blocks", type=int, default=16)
    parser.add_argument("--every-steps", type=int, default=50)
    parser.add_argument("--json", help="write the stage report here (rank 0)")


def run(args: argparse.Namespace) -> int:
    if args.save_features:
        from ..featurize import features_of

        features, summary = features_of(args.input, Path(args.ccd_cache).expanduser(), seed=args.seed)
        Path(args.save_features).write_bytes(pickle.dumps((features, summary)))
        print(f"{summary['name']}: {summary['tokens']} tokens, {summary['atoms']} atoms -> {args.save_features}")
        return 0

    import torch

    from ..data.boltz2_hparams import _plain_hparams, reduced_boltz2_hparams
    from ..distributed.grid import ProcessGrid
    from ..io.checkpoint import EXIT_PREEMPTED, Checkpointer, Preempted, StopSignal, find_checkpoint, load_checkpoint
    from ..model.boltz2 import FoldModel
    from ..progress import Progress, format_report, stage_report

    started = time.perf_counter()
    stop = StopSignal().install()
    features, summary = pickle.loads(Path(args.features).read_bytes())
    precision = Precision(args.dtype)
    dtype = precision.dtype
    code = 0
    with ProcessGrid.create(dp=args.dp, backend=args.backend) as grid:
        progress = Progress(grid.rank == 0, device=grid.device)
        progress.say(f"{summary['name']}: {summary['tokens']} tokens, {summary['atoms']} atoms; {grid.describe()}")
        progress("weights", 0, 1)
        hp = _plain_hparams() if args.architecture == "boltz2" else reduced_boltz2_hparams()
        torch.manual_seed(args.seed)  # the same random weights on every rank (same device type)
        with torch.device(grid.device):
            model = FoldModel(hp, grid=grid)
        model = model.to(dtype).eval()
        identity = f"{summary['name']}-{args.architecture}-{args.recycles}-{args.steps}-{args.samples}-{args.seed}"
        directory = Path(args.checkpoint_dir).resolve()
        checkpointer = Checkpointer(grid=grid, directory=directory, identity=identity, n_tokens=summary["tokens"],
                                    blocks=model.trunk.pairformer_module.num_blocks, recycling_steps=args.recycles,
                                    every_blocks=args.every_blocks, every_steps=args.every_steps, stop=stop,
                                    say=progress.say)
        resume = None
        if directory.is_dir() and any(directory.glob("ckpt-*.h5")):
            path = find_checkpoint(directory)
            resume = load_checkpoint(path, grid, identity, dtype)
            progress.say(f"resuming from {path} ({resume.stage} stage)")
        try:
            with precision.autocast(grid.device):
                prediction = model.predict(
                    features, recycling_steps=args.recycles, sampling_steps=args.steps, diffusion_samples=args.samples,
                    max_parallel_samples=args.samples,
                    generator=torch.Generator(device=grid.device).manual_seed(args.seed),
                    dtype=dtype, progress=progress, hooks=checkpointer, resume=resume)
            progress.say(f"done: coordinates finite {bool(torch.isfinite(prediction.coords).all())}, mean pLDDT "
                         f"{float(torch.cat([c.plddt for c in prediction.confidence]).mean()):.4f} (random weights)")
        except Preempted as stopped:
            progress.say(str(stopped))
            code = EXIT_PREEMPTED
        report = stage_report(progress, grid.comm)
        if report is not None:
            report.update({"input": summary["name"], "tokens": summary["tokens"], "atoms": summary["atoms"],
                           "architecture": args.architecture, "recycling_steps": args.recycles,
                           "sampling_steps": args.steps, "samples": args.samples, "dtype": args.dtype,
                           "resumed": resume is not None, "exit": code, "transport": grid.transport.name,
                           "grid": {"dp": grid.dp, "p": grid.p},
                           "wall_s": round(time.perf_counter() - started, 1),
                           "device": torch.cuda.get_device_name() if grid.device.type == "cuda" else "cpu"})
            for line in format_report(report):
                progress.say(line)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2))
    stop.uninstall()
    return code
