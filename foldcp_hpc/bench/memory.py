"""Peak memory of a call, per rank: exact on CUDA, at operator granularity on the CPU.

CUDA: the caching allocator's ``max_memory_allocated`` above the level before the call.
CPU: the bytes glibc holds in memory-mapped blocks, read (``mallinfo2``) after every aten operator through a
dispatch mode, above the level before the call. Large tensors are mmapped when ``MALLOC_MMAP_THRESHOLD_`` is
set low (the benchmark driver sets 64 KiB for its workers, which also stops glibc raising the threshold), so
this counts every tensor buffer, whichever thread frees it (gloo frees sent buffers on its own threads,
which is why torch's profiler, which sees one thread, cannot be used), and communication buffers too. A
transient inside one operator is not seen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """Run ``fn`` once; return its result and the peak bytes it held above what was live before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    sampler = _MmapSampler()
    before = sampler.sample()
    with sampler:
        result = fn()
    return result, max(0, sampler.peak - before)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class _MmapSampler(TorchDispatchMode):
    """Reads glibc's mmapped bytes after every aten operator; ``peak`` is the largest reading."""

    def __init__(self) -> None:
        super().__init__()
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self._mallinfo2 = libc.mallinfo2
        self._mallinfo2.restype = _Mallinfo2
        self.peak = 0

    def sample(self) -> int:
        info = self._mallinfo2()
        value = info.hblkhd + info.uordblks
        self.peak = max(self.peak, value)
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.sample()
        out = func(*args, **(kwargs or {}))
        self.sample()
        return out


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> tuple[Any, float]:
    """Run ``fn`` ``repeats`` times; return the last result and the mean seconds per run."""
    result = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, (time.perf_counter() - start) / repeats


def profile(fn: Callable[[], Any], device: torch.device, repeats: int = 1, warm_up: bool = True) -> tuple[Any, int, float]:
    """``fn``'s result, peak bytes and mean seconds: an optional warm-up run (first calls fill one-time caches
    that are not the call's memory), a measured run, then ``repeats`` timed runs."""
    if warm_up:
        measure(fn, device)
    result, peak = measure(fn, device)
    _, seconds = timed(fn, device, max(1, repeats))
    return result, peak, seconds
