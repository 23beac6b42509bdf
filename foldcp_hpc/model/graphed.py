"""One CUDA graph per call shape: a function called many times with the same shapes (the score model at every
sampler step) is recorded once and replayed.

At N = 2,048 a score-model call launches ~2,000 kernels; replaying them as one graph takes the CPU's dispatch
and launch time off the step. The recording holds the call's intermediates in a private memory pool, the same
bytes an eager call allocates at its peak, until :meth:`GraphedCall.release`.

Rules for ``fn`` (the score model keeps them on a one-rank grid): no host synchronisation, no collectives, and
every tensor it reads besides its arguments stays alive and unchanged between replays (the conditioning, the
trunk's s). Arguments are copied into the recording's input buffers; the output is copied out.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["GraphedCall"]


class _Recording:
    """One shape's state: eager calls so far, then the graph with its input and output buffers."""

    def __init__(self) -> None:
        self.eager_calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Tensor] = []
        self.output: Tensor | None = None


class GraphedCall:
    """``fn(*args)`` with tensor ``args``, replayed from a CUDA graph after two eager calls of the same shapes.

    The first call of a shape runs eagerly (Triton compiles and autotunes, cuBLAS picks its kernels); the second
    runs eagerly on a side stream and is then recorded; later calls of that shape replay. Up to ``max_shapes``
    shapes are recorded (Boltz's sample chunks come in at most two sizes); calls of further shapes, and all calls
    when ``enabled`` is False or an argument is not on CUDA, run eagerly.
    """

    def __init__(self, fn: Callable[..., Tensor], enabled: bool = True, max_shapes: int = 2) -> None:
        self.fn = fn
        self.enabled = enabled
        self.max_shapes = max_shapes
        self.recordings: dict[tuple, _Recording] = {}
        self.replays = 0

    def __call__(self, *args: Tensor) -> Tensor:
        if not self.enabled or not all(a.is_cuda for a in args):
            return self.fn(*args)
        key = (tuple((a.shape, a.dtype, a.device) for a in args), torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda"), torch.is_grad_enabled())
        entry = self.recordings.get(key)
        if entry is None:
            if len(self.recordings) >= self.max_shapes:
                return self.fn(*args)
            entry = self.recordings[key] = _Recording()
        if entry.graph is None:
            entry.eager_calls += 1
            if entry.eager_calls == 1:
                return self.fn(*args)
            return self._record(entry, args)
        for buffer, value in zip(entry.inputs, args):
            buffer.copy_(value)
        entry.graph.replay()
        self.replays += 1
        return entry.output.clone()

    def _record(self, entry: _Recording, args: tuple[Tensor, ...]) -> Tensor:
        """Runs the call eagerly on a side stream (as ``torch.cuda.graph`` asks), then records it; returns the
        eager result."""
        device = args[0].device
        entry.inputs = [a.clone() for a in args]
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side), self._autocast():
            result = self.fn(*args)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._autocast():
            entry.output = self.fn(*entry.inputs)
        entry.graph = graph
        return result

    @staticmethod
    def _autocast():
        """The ambient autocast state with its weight cache off: a cast cached while recording would live in the
        graph's pool and be rewritten by every replay."""
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                              enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)

    def release(self) -> None:
        """Frees the recordings and their memory pools."""
        self.recordings.clear()
