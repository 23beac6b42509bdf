"""Per-rank peak memory of each stage of a whole-model run, measured on the grid: what ``foldcp-hpc plan``
(:mod:`foldcp_hpc.plan`) predicts, and what its calibration test (``tests/test_plan_mpi.py``) compares it with.

Every stage is one call, measured as the benchmarks measure (:func:`~foldcp_hpc.bench.memory.measure`): the
bytes a rank held above what it held before the call, the call's inputs and the weights excluded, its
output and every transient included. The stages, in the order a run meets them:

    input_embedder  trunk.input_embedder(token, atom)                           -> s_inputs
    pair_init       trunk.pair_init(s_inputs, token, pair)                      -> (z_init, rel) tiles
    msa_module      trunk.msa_module(z, s_inputs, msa, pair_mask)               -> z tile
    pairformer      trunk.pairformer_module(s, z, mask, pair_mask, inplace=True) -> (s, z), z updated in place
    distogram       trunk.distogram_module(z)                                   -> logits tile
    trunk           the whole trunk forward (every stage above, no recycle)     -> TrunkOutput
    conditioning    diffusion_conditioning(s, z, rel, token, atom)              -> Conditioning (kept while sampling)
    sampler_step    structure_module.denoise(noisy, sigma, score) for the samples -> denoised coordinates
    confidence      confidence_module(...) of one sample, pair_base included     -> SampleConfidence

On the CPU the glibc allocator must put every tensor buffer in its own mapping for the reading to count
buffers freed on other threads (gloo's): :func:`small_mmap_threshold` does at run time what the benchmark
driver's ``MALLOC_MMAP_THRESHOLD_=65536`` does at start.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import time
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from .memory import measure

if TYPE_CHECKING:
    from ..data.features import Features
    from ..distributed.grid import ProcessGrid

__all__ = ["STAGES", "small_mmap_threshold", "mmap_every_buffer", "measure_stages"]

STAGES = ("input_embedder", "pair_init", "msa_module", "pairformer", "distogram", "trunk", "conditioning",
          "sampler_step", "confidence")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024


def small_mmap_threshold(threshold: int = 65536) -> None:
    """``mallopt(M_MMAP_THRESHOLD, threshold)``: buffers of ``threshold`` bytes and more get their own mapping
    (and glibc stops raising the threshold on its own). No-op where the C library has no ``mallopt``."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {threshold}) failed")


@contextlib.contextmanager
def mmap_every_buffer(threshold: int = 65536) -> Iterator[None]:
    """:func:`small_mmap_threshold` for a block, then glibc's starting threshold (128 KiB) again (its dynamic
    raising stays off), so that a process that goes on (a test session) is not left mapping every buffer."""
    small_mmap_threshold(threshold)
    try:
        yield
    finally:
        small_mmap_threshold(GLIBC_DEFAULT_MMAP_THRESHOLD)


def measure_stages(grid: "ProcessGrid", features: "Features", hparams: dict[str, Any], dtype: torch.dtype,
                   stages: Sequence[str] = STAGES, samples: int = 1, seed: int = 0,
                   warm_up: bool = True, seconds: dict[str, float] | None = None) -> dict[str, int]:
    """Peak bytes of each of ``stages`` on this rank (see the module docstring), for a model built from
    ``hparams`` (random weights: memory does not depend on their values) on ``grid``, in ``dtype``.

    features: the input's features (every rank the same); samples: samples denoised together in the step;
    warm_up: run each stage twice and keep the second reading, as the benchmarks do: first calls fill caches
    that outlive them (lazy imports under the measuring dispatch mode, the BLAS library's buffers for new
    sizes, communication buffers), which are not the stage's memory; seconds: if given, receives each stage's
    wall time (of the measured run). The sub-stages of the trunk (input_embedder ...
    distogram) run on their own only when asked for; the trunk runs whenever a later stage needs its output.
    """
    from ..model.boltz2 import FoldModel

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {', '.join(STAGES)}")
    with torch.no_grad():
        torch.manual_seed(seed)
        model = FoldModel(hparams, grid=grid).to(device=grid.device, dtype=dtype).eval()
        return _run_stages(grid, model, features, dtype, stages, samples, seed, warm_up, seconds)


def _run_stages(grid, model, features, dtype, stages, samples, seed, warm_up, seconds) -> dict[str, int]:
    device = grid.device
    trunk = model.trunk
    peaks: dict[str, int] = {}
    token, atom = features.model_inputs(dtype, device)
    pair = {k: v[None].to(device) for k, v in features.pair_tile(grid.p, grid.row, grid.col).items()}
    template = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in features.template.items()}
    msa = {k: v.to(device) for k, v in features.msa_model_block(grid.p, grid.row, grid.col).items()}
    n_tokens, n_rows = features.n_tokens, features.msa.n_rows

    def run(stage: str, fn):
        if warm_up:
            grid.barrier()
            measure(fn, device)
        grid.barrier()
        start = time.perf_counter()
        result, peak = measure(fn, device)
        peaks[stage] = peak
        if seconds is not None:
            seconds[stage] = time.perf_counter() - start
        return result

    if any(s in stages for s in STAGES[:5]):
        layout = grid.layout(n_tokens)
        mask = token["token_pad_mask"].to(dtype)
        padded = torch.nn.functional.pad(mask, (0, layout.n_pad))
        pair_mask = padded[:, layout.block(grid.row), None] * padded[:, None, layout.block(grid.col)]
        s_inputs = run("input_embedder", lambda: trunk.input_embedder(token, atom))
        z_init, rel = run("pair_init", lambda: trunk.pair_init(s_inputs, token, pair))
        s = trunk.s_init(s_inputs)
        z = run("msa_module", lambda: trunk.msa_module(z_init, s_inputs, msa, pair_mask, n_rows=n_rows))
        s, z = run("pairformer", lambda: trunk.pairformer_module(s, z, mask=mask, pair_mask=pair_mask, inplace=True))
        run("distogram", lambda: trunk.distogram_module(z))
        del s_inputs, z_init, rel, s, z
    if not any(s in stages for s in STAGES[5:]):
        return {k: v for k, v in peaks.items() if k in stages}
    out = run("trunk", lambda: trunk(token, atom, pair, template, msa, n_rows, recycling_steps=0))
    if any(s in stages for s in STAGES[6:]):
        rel = trunk.pair_init.relative_positions(token, n_tokens)
        cond = run("conditioning", lambda: model.diffusion_conditioning(out.s, out.z, rel, token, atom))
        generator = torch.Generator().manual_seed(seed + 1)
        noisy = 100 * torch.randn(samples, features.n_atoms, 3, generator=generator).to(device=device, dtype=dtype)
        # one eager call (a CUDA graph's recording holds the same working memory)
        score = model.structure_module.scorer(out.s_inputs, out.s, token, atom, cond, cuda_graphs=False)
        coords = run("sampler_step", lambda: model.structure_module.denoise(noisy, 80.0, score))
        del score
        del cond
        if "confidence" in stages:
            run("confidence", lambda: model.confidence_module(out.s_inputs, out.s, out.z, coords[:1], token, atom,
                                                               pair, out.distogram[..., 0, :]))
    return {k: v for k, v in peaks.items() if k in stages}
