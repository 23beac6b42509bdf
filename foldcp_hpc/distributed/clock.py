"""Communication time of one rank, for timing breakdowns (compute / communication per layer).

Set ``grid.comm_clock = CommClock(grid.device)``; every raw collective (:mod:`.collectives`) then waits for
the device before it starts and after it ends, and adds its wall time here. The synchronisation removes any
overlap of communication with computation, so a clocked run tells how the work splits (communication alone vs
everything else), not how long the overlapped run takes: time that separately.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["CommClock"]


class CommClock:
    """Seconds and calls spent in collectives on this rank since the last :meth:`reset`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0  # a collective built from others (transpose = exchange) counts once

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def span(self) -> Iterator[None]:
        if self._depth:
            yield
            return
        self._sync()
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._depth -= 1
            self.seconds += time.perf_counter() - start
            self.calls += 1
