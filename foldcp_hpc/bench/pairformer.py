"""The per-rank worker of ``python -m foldcp_hpc.bench pairformer``: one layer forward on this rank's tiles."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .memory import measure, profile, timed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _inputs(n_tokens: int, n_local: int, c_s: int, c_z: int, dtype, device, seed: int):
    """Random s [1, N, C_s] (replicated), this rank's z tile [1, n, n, C_z], masks; nothing N x N is made.

    bfloat16 is Boltz's mixed precision: z (the trunk's activations under autocast) is bfloat16, the single
    track and the masks float32."""
    generator = torch.Generator(device=device).manual_seed(seed)  # made where they live (z may be tens of GB)
    wide = torch.float32 if dtype == torch.bfloat16 else dtype
    s = torch.randn(1, n_tokens, c_s, generator=generator, device=device, dtype=wide)
    z = torch.randn(1, n_local, n_local, c_z, generator=generator, device=device, dtype=dtype)
    mask = torch.ones(1, n_tokens, device=device, dtype=wide)
    pair_mask = torch.ones(1, n_local, n_local, device=device, dtype=wide)
    return s, z, mask, pair_mask


def _autocast(device, dtype, mixed: bool = False):
    """bfloat16 and bf16-mixed run as Boltz runs its trunk: float32 parameters under ``torch.autocast`` to
    bfloat16 (z stored in bfloat16, or in float32 as the whole model keeps it under ``bf16-mixed``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16 or mixed)


def run_worker(args: argparse.Namespace) -> None:
    from ..distributed import ProcessGrid
    from ..distributed.autograd import take_tile
    from ..model.pairformer import PairformerLayer, tri_attn_chunk_size

    mixed = args.dtype == "bf16-mixed"  # z float32 under autocast, as the whole model runs (foldcp-hpc run)
    dtype = torch.float32 if mixed else DTYPES[args.dtype]
    backend = args.backend
    if args.device == "cpu" and backend == "auto":
        backend = "gloo"
    rows = []
    with ProcessGrid.create(backend=backend) as grid, torch.no_grad():
        device = grid.device
        layout = grid.layout(args.n)
        chunk = tri_attn_chunk_size(args.n, training=False)
        torch.manual_seed(0)
        params = torch.float32 if dtype == torch.bfloat16 else dtype
        layer = PairformerLayer(args.c_s, args.c_z, v2=True, grid=grid).to(device=device, dtype=params).eval()
        s, z, mask, pair_mask = _inputs(args.n, layout.n_local, args.c_s, args.c_z, dtype, device, seed=grid.rank)
        # the real tokens of the tile: padding rows/columns are masked as scatter_pair would leave them
        valid = torch.ones(1, args.n, 1, device=device, dtype=pair_mask.dtype)
        pair_mask = take_tile(valid * valid.transpose(1, 2), grid.p, grid.row, grid.col).squeeze(-1) * pair_mask

        def ours():  # inference in place: z's storage takes the layer's output (the bench's z is not reused)
            with _autocast(device, dtype, mixed):
                return layer(s, z, mask, pair_mask, chunk, inplace=True)

        if args.quick:  # one run: its peak and its time (first-call overheads included), no breakdown
            grid.barrier()
            (_, peak), seconds = timed(lambda: measure(ours, device), device, 1)
        else:
            grid.barrier()
            _, peak, seconds = profile(ours, device, args.repeats)
        seconds = grid.comm.allreduce(seconds, op=_max())
        peaks = grid.comm.gather(peak, root=0)
        totals = grid.comm.gather(_device_peak(device), root=0)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        rows.append({"impl": "foldcp_hpc", "ranks": grid.world_size, "grid": f"{grid.p}x{grid.p}", "n": args.n,
                     "peak_bytes": peaks, "device_peak_bytes": totals, "seconds": seconds, "device_name": name,
                     "dtype": args.dtype,
                     **({} if args.quick else comm_breakdown(grid, ours))})
        if grid.world_size == 1 and not args.no_boltz:
            rows.extend(_boltz_rows(args, layer, s, z, mask, pair_mask, chunk, device, dtype, name))
    if grid.rank == 0:
        Path(args.out).write_text(json.dumps(rows))


def comm_breakdown(grid, fn) -> dict:
    """One more run with every collective synchronised and clocked (:class:`~foldcp_hpc.distributed.clock.
    CommClock`), split into compute, communication and waiting.

    Per rank the clocked run is ``total = compute + in-collective``. A collective holds every member until the
    last one arrives, so a rank's in-collective seconds are transfer plus waiting for slower peers; the rank
    with the fewest in-collective seconds waited least. Returns (seconds): ``compute_seconds`` (the most any
    rank computed), ``transfer_seconds`` (the fewest in-collective seconds of any rank: transfers, and the
    waiting no rank escapes), ``wait_seconds`` (the most in-collective seconds less that: load imbalance),
    ``comm_seconds`` (the most in-collective seconds) and ``clocked_seconds`` (the clocked run's total, slowest
    rank). The timed run overlaps transfers with compute: its time less ``compute_seconds`` is the exposed
    communication.
    """
    from ..distributed.clock import CommClock

    if grid.world_size == 1:
        return {}
    grid.comm_clock = CommClock(grid.device)
    try:
        grid.barrier()
        _, total = timed(fn, grid.device, 1)
    finally:
        clock, grid.comm_clock = grid.comm_clock, None
    per_rank = grid.comm.allgather((total - clock.seconds, clock.seconds, total))
    compute = max(r[0] for r in per_rank)
    inside = [r[1] for r in per_rank]
    return {"comm_seconds": max(inside), "clocked_seconds": max(r[2] for r in per_rank),
            "compute_seconds": compute, "transfer_seconds": min(inside), "wait_seconds": max(inside) - min(inside)}


def _boltz_rows(args, layer, s, z, mask, pair_mask, chunk, device, dtype, name) -> list[dict]:
    """boltz's layer on the same input and weights: pure PyTorch, and with cuEquivariance's kernels
    (``use_kernels=True``) too where ``cuequivariance_torch`` imports on a GPU."""
    from boltz.model.layers.pairformer import PairformerLayer as BoltzLayer

    ref = BoltzLayer(args.c_s, args.c_z, v2=True).to(device=device, dtype=layer.pre_norm_s.weight.dtype).eval()
    ref.load_state_dict(layer.state_dict())
    variants = {"boltz": False}
    if device.type == "cuda":
        try:
            import cuequivariance_torch  # noqa: F401

            variants["boltz+cuEq"] = True
        except ImportError:
            pass
    rows = []
    for impl, kernels in variants.items():
        def boltz():
            with _autocast(device, dtype, args.dtype == "bf16-mixed"):
                return ref(s, z, mask, pair_mask, chunk, use_kernels=kernels)

        try:
            _, peak, seconds = profile(boltz, device, args.repeats)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{impl}: out of memory at N={args.n}", flush=True)
            continue
        rows.append({"impl": impl, "ranks": 1, "grid": "-", "n": args.n, "peak_bytes": [peak],
                     "device_peak_bytes": [_device_peak(device)], "seconds": seconds, "device_name": name,
                     "dtype": args.dtype})
    return rows


def _device_peak(device) -> int | None:
    """The most bytes allocated on a GPU since the measured run began (:func:`~.memory.measure` resets the
    count): the layer's transient plus everything live around it (z, s, the masks, the weights, and in boltz's
    rows our layer's tensors too). None on the CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _max():
    from mpi4py import MPI

    return MPI.MAX
