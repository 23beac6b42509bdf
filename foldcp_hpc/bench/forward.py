"""``python -m foldcp_hpc.bench forward``: the whole model forward, ours against boltz's ``Boltz2.forward``.

Both run the same thing on the same input and weights: one protein of N residues (a seeded random sequence,
about 8.3 heavy atoms per residue) with a generated MSA of ``--msa-rows`` rows, featurized by the project's
pipeline (ours) and by boltz's ``Boltz2Featurizer`` (boltz's); ``Boltz2`` built with seeded random weights
(torch and numpy seeded: boltz's initialisers use both) of the released architecture, its state loaded
strictly into :class:`~foldcp_hpc.model.boltz2.FoldModel`. The forward is what ``boltz predict`` runs: the
trunk with ``--recycles`` recycling steps, diffusion conditioning, ``--steps`` sampler steps for ``--samples``
samples, confidence one sample at a time; ``--dtype bfloat16`` runs both under ``torch.autocast`` to
bfloat16 with float32 weights (boltz's ``bf16-mixed``), ``float32`` without autocast.

Run it under the launcher itself; boltz's row is made only in a one-rank run (the same process, the same card,
before ours at each N). Per size and implementation it prints the slowest rank's seconds for one forward
(CUDA synchronised; after ``--warmup`` unmeasured forwards), the per-rank peak bytes the forward held above what
was live before it (weights and boltz's device-side features excluded; ours moves its features inside the
call), the device's absolute peak (everything this process allocated, weights of both models included when
both are on the card), and ours / boltz. A size that runs out of device memory is reported as OOM and larger
sizes of that implementation are skipped, so one run probes the largest N (in a one-rank run; at several ranks
an OOM ends the job, the rows printed so far kept). The trunk check compares the distogram logits of the two
runs (``pdistogram``, [1, N, N, 1, 64]) where both ran: boltz's random init zeroes the output projections of
the MSA and Pairformer blocks, so it mostly covers the input embedder, pair init, recycling and distogram head;
sampling is stochastic and is not compared.

    python -m foldcp_hpc.bench forward --n 512,1024,2048 --device cuda --dtype bfloat16 --boltz-kernels
    mpirun -n 4 python -m foldcp_hpc.bench forward --n 4096 --impl ours --device cuda --backend nccl

On the CPU the peak is sampled after every aten operator (see :mod:`.memory`; set ``MALLOC_MMAP_THRESHOLD_=65536``),
which also slows the forward: CPU seconds are not timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]

GIB = 1024 ** 3
IMPLS = ("boltz", "ours")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", default="512", help="tokens N, comma-separated (default 512); run in ascending order")
    parser.add_argument("--impl", default="ours,boltz", help="ours, boltz or both (default ours,boltz)")
    parser.add_argument("--architecture", choices=("boltz2", "boltz2-small"), default="boltz2",
                        help="the released architecture (default) or boltz2-small (fewer blocks, for CPU tries)")
    parser.add_argument("--blocks", type=int, help="Pairformer blocks of the trunk (default: the architecture's)")
    parser.add_argument("--msa-rows", type=int, default=64)
    parser.add_argument("--recycles", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--boltz-kernels", action="store_true",
                        help="boltz with use_kernels=True (cuEquivariance) when cuequivariance_torch imports")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured forwards before the measured one")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--backend", default="auto", help="grid backend: auto, nccl, host, gloo (cpu: gloo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ccd-cache", default="~/.cache/foldcp_hpc/ccd")
    parser.add_argument("--json", help="write the rows here (rank 0; rewritten after every size)")
    parser.add_argument("--stage-peaks", action="store_true",
                        help="also the device's peak within each of our stages (resets the peak counter at each "
                             "stage: the table's peak columns then hold the last stage's only)")
    parser.add_argument("--features-dir", help="keep the featurized inputs here (gzipped pickles, one per N): read "
                        "when present, else made and written; so a machine without boltz's data dependencies or "
                        "the CCD (a GPU node) runs what another one featurized")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from mpi4py import MPI

    from ..data.boltz2_hparams import boltz2_hparams, reduced_boltz2_hparams
    from ..data.weights import inference_hparams, load_weights
    from ..distributed.grid import ProcessGrid
    from ..model.boltz2 import FoldModel
    from .trunk import _featurize, write_input

    sizes = sorted({int(n) for n in args.n.split(",")})
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or not impls:
        raise SystemExit(f"bench forward: --impl {args.impl!r}: expected ours, boltz or both")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench forward: --device cuda, but torch sees no CUDA device")
    world = MPI.COMM_WORLD
    speak = world.Get_rank() == 0
    with_boltz = "boltz" in impls and world.Get_size() == 1
    if "boltz" in impls and not with_boltz and speak:
        print(f"boltz runs only in a one-rank run; this one has {world.Get_size()} ranks: ours only", flush=True)
    impls = [i for i in IMPLS if i in impls and (i != "boltz" or with_boltz)]  # boltz first: ours' row has its ratio

    hp = inference_hparams(boltz2_hparams() if args.architecture == "boltz2" else reduced_boltz2_hparams())
    if args.blocks is not None:
        hp["pairformer_args"]["num_blocks"] = args.blocks
    backend = "gloo" if args.device == "cpu" and args.backend == "auto" else args.backend
    dtype_name = args.dtype
    autocast_on = args.dtype == "bfloat16"
    rows: list[dict] = []
    with ProcessGrid.create(backend=backend) as grid, torch.no_grad():
        device = grid.device
        if device.type != args.device:
            raise SystemExit(f"bench forward: backend {backend!r} put rank {grid.rank} on {device}, not {args.device}")
        boltz = None
        kernels = False
        if with_boltz:
            from boltz.model.models.boltz2 import Boltz2

            torch.manual_seed(args.seed)
            np.random.seed(args.seed)  # as load_weights' random weights: the same state either way
            boltz = Boltz2(**hp).eval()
            state = boltz.state_dict()
            if args.boltz_kernels:
                kernels = _cuequivariance_importable() and device.type == "cuda"
                boltz.use_kernels = kernels
            print(f"boltz kernels (cuEquivariance): {'on' if kernels else 'off'}"
                  + ("" if kernels or not args.boltz_kernels else " (cuequivariance_torch not importable or no CUDA)"),
                  flush=True)
        else:
            state = load_weights(grid, "random", hp, seed=args.seed).state_dict
        with torch.device(device):
            ours = FoldModel(hp, grid=grid).eval()
        ours.load_boltz_state(state)
        del state
        if boltz is not None:
            boltz.to(device)
        blocks = ours.trunk.pairformer_module.num_blocks
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if speak:
            print(f"The whole forward: {args.architecture} ({blocks} Pairformer blocks, random weights), "
                  f"{args.recycles} recycles, {args.steps} sampler steps, {args.samples} sample(s), confidence; "
                  f"{args.msa_rows} MSA rows; {dtype_name}{' autocast' if autocast_on else ''}; {grid.describe()}; "
                  f"{name}", flush=True)
            print(_HEADER + "\n" + "-" * len(_HEADER), flush=True)

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_on)

        out_of_memory = set()
        checks = []
        for n in sizes:
            package = None
            if grid.rank == 0:
                package = _features(args, n, "boltz" in impls, write_input, _featurize)
            features, boltz_feats = world.bcast(package, root=0) if world.Get_size() > 1 else package
            common = {"n": features.n_tokens, "atoms": int(features.atom["atom_pad_mask"].sum()),
                      "msa_rows": args.msa_rows, "dtype": dtype_name, "device_name": name,
                      "recycles": args.recycles, "steps": args.steps, "samples": args.samples, "blocks": blocks}
            distograms = {}
            for impl in impls:
                row = {"impl": impl, "ranks": grid.world_size, "grid": f"{grid.p}x{grid.p}", **common}
                if impl == "boltz":
                    row["kernels"] = kernels
                if impl in out_of_memory:
                    rows.append({**row, "status": "skipped"})
                    _say(speak, rows)
                    continue
                forward = (_boltz_forward(boltz, boltz_feats, args, device, autocast) if impl == "boltz"
                           else _ours_forward(ours, features, args, device, autocast))
                measured = _measured(forward, device, args.warmup, keep=len(impls) == 2)
                status, seconds, peak, device_peak, distogram = measured
                if status == "OOM":
                    out_of_memory.add(impl)
                    if grid.world_size > 1:
                        print(f"rank {grid.rank}: out of device memory in {impl}'s forward at N={n}; ending the job",
                              flush=True)
                        world.Abort(1)
                elif distogram is not None:
                    distograms[impl] = distogram
                forward = measured = distogram = None
                _release(device)
                if status == "ok":
                    seconds = world.allreduce(seconds, op=MPI.MAX)
                rows.append({**row, "status": status, "seconds": seconds, "peak_bytes": world.gather(peak, root=0),
                             "device_peak_bytes": world.gather(device_peak, root=0)})
                _say(speak, rows)
                if speak and args.json:
                    Path(args.json).write_text(json.dumps({"rows": rows, "trunk_check": checks}, indent=2))
            if len(distograms) == 2:
                checks.append(_compare(features, distograms["ours"], distograms["boltz"]))
            features = boltz_feats = distograms = None
            gc.collect()
        if speak:
            for check in checks:
                print(f"trunk check at N={check['n']}: distogram logits, max |ours - boltz| "
                      f"{check['max_abs_diff']:.3e} (max |boltz| {check['max_abs_boltz']:.3e}, relative "
                      f"{check['relative']:.3e})", flush=True)
            if not checks:
                print("trunk check: skipped (needs both implementations run at one rank)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"rows": rows, "trunk_check": checks}, indent=2))
    return 0


def _features(args, n: int, with_boltz: bool, write_input, featurize):
    """(ours, boltz's or None) features of the synthetic protein of n residues, through ``--features-dir``."""
    import gzip
    import pickle

    cached = None
    if args.features_dir:
        cached = Path(args.features_dir) / f"forward-n{n}-msa{args.msa_rows}-seed{args.seed}.pkl.gz"
        if cached.exists():
            with gzip.open(cached, "rb") as handle:
                features, boltz_feats = pickle.load(handle)
            if boltz_feats is not None or not with_boltz:
                return features, (boltz_feats if with_boltz else None)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_input(Path(tmp), n, args.msa_rows, seed=args.seed)
        package = featurize(path, Path(args.ccd_cache).expanduser(), with_boltz=with_boltz)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(cached, "wb", compresslevel=3) as handle:
            pickle.dump(package, handle)
    return package


_HEADER = (f"{'N':>6} {'atoms':>6} {'impl':<6} {'ranks':>5} {'seconds':>9} {'peak GiB/rank max':>17} "
           f"{'min':>7} {'device GiB':>10} {'ours/boltz':>10}")


def _say(speak: bool, rows: list[dict]) -> None:
    """Print the newest row (rank 0); ours' ratio is against boltz's row of the same N."""
    if not speak:
        return
    r = rows[-1]
    if r["status"] != "ok":
        print(f"{r['n']:>6} {r['atoms']:>6} {r['impl']:<6} {r['ranks']:>5} {r['status']:>9}", flush=True)
        return
    peaks = [p / GIB for p in r["peak_bytes"]]
    boltz = next((b for b in rows if b["impl"] == "boltz" and b["n"] == r["n"] and b["status"] == "ok"), None)
    ratio = f"{r['seconds'] / boltz['seconds']:.3f}" if boltz and r["impl"] == "ours" else "-"
    device_peak = f"{max(r['device_peak_bytes']) / GIB:.2f}" if r["device_peak_bytes"][0] is not None else "-"
    print(f"{r['n']:>6} {r['atoms']:>6} {r['impl']:<6} {r['ranks']:>5} {r['seconds']:>9.2f} {max(peaks):>17.2f} "
          f"{min(peaks):>7.2f} {device_peak:>10} {ratio:>10}", flush=True)


def _boltz_forward(model, feats, args, device, autocast):
    """Boltz-2's forward as ``boltz predict`` calls it; returns its distogram logits [1, N, N, 1, 64]."""
    feats = {k: (v.float() if v.is_floating_point() else v)[None].to(device) for k, v in feats.items()}

    def forward():
        with autocast():
            out = model(feats, recycling_steps=args.recycles, num_sampling_steps=args.steps,
                        diffusion_samples=args.samples, max_parallel_samples=args.samples,
                        run_confidence_sequentially=True)
        return out["pdistogram"]

    return forward


def _ours_forward(model, features, args, device, autocast):
    """:meth:`FoldModel.predict` as ``foldcp-hpc run`` calls it; returns the distogram logits tile."""
    import torch

    stages: dict[str, float] = {}
    clock = {"stage": None, "since": 0.0}

    peaks: dict[str, float] = {}

    def progress(stage, done, total, detail=""):  # seconds (and peaks) per stage, synchronised at changes
        if stage != clock["stage"]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            if clock["stage"] is not None:
                stages[clock["stage"]] = stages.get(clock["stage"], 0.0) + now - clock["since"]
                if device.type == "cuda" and args.stage_peaks:
                    peak = torch.cuda.max_memory_allocated(device) / GIB
                    peaks[clock["stage"]] = max(peaks.get(clock["stage"], 0.0), peak)
            if device.type == "cuda" and args.stage_peaks:
                torch.cuda.reset_peak_memory_stats(device)
            clock.update(stage=stage, since=now)

    def forward():
        stages.clear()
        peaks.clear()
        clock.update(stage=None)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        with autocast():
            prediction = model.predict(features, recycling_steps=args.recycles, sampling_steps=args.steps,
                                       diffusion_samples=args.samples, max_parallel_samples=args.samples,
                                       generator=generator, dtype=torch.float32, progress=progress)
        progress("end", 0, 0)
        if model.grid.rank == 0:
            print("  ours by stage: " + ", ".join(f"{k} {v:.1f} s" + (f" ({peaks[k]:.1f} GiB)" if k in peaks else "")
                                                  for k, v in stages.items()), flush=True)
        return prediction.trunk.distogram

    return forward


def _measured(forward, device, warmup: int, keep: bool):
    """(status, seconds, peak bytes above before, device's absolute peak or None, the distogram logits on the
    CPU when ``keep`` else None) of one forward after ``warmup`` unmeasured ones; status "OOM" when the device
    ran out of memory."""
    import torch

    from .memory import measure

    result, oom = None, False
    try:
        for _ in range(warmup):
            forward()
        start = time.perf_counter()
        result, peak = measure(forward, device)  # synchronised before and after
        seconds = time.perf_counter() - start
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError, or cuBLAS / cuDNN failing to allocate
        if not _out_of_memory(error):
            raise
        oom = True
    if oom:  # outside the handler: its traceback holds the forward's frames and their tensors
        return "OOM", None, None, None, None
    device_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return "ok", seconds, peak, device_peak, result.cpu().float() if keep else None


def _out_of_memory(error: RuntimeError) -> bool:
    import torch

    text = str(error)
    return (isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text
            or "CUBLAS_STATUS_ALLOC_FAILED" in text or "CUDNN_STATUS_ALLOC_FAILED" in text)


def _release(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _compare(features, ours, boltz) -> dict:
    """Max |difference| of the distogram logits over the real tokens (ours: the one-rank tile, padded)."""
    n = features.n_tokens
    ours = ours[:, :n, :n]
    diff = float((ours - boltz).abs().max())
    scale = float(boltz.abs().max())
    return {"n": n, "max_abs_diff": diff, "max_abs_boltz": scale, "relative": diff / max(scale, 1e-30)}


def _cuequivariance_importable() -> bool:
    try:
        import cuequivariance_torch  # noqa: F401
    except ImportError:
        return False
    return True
