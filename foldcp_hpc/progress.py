"""Progress lines for batch logs: rank 0 prints stage, step, elapsed time and an ETA; other ranks are silent.

Plain lines only (no terminal control codes), flushed at once, so that a Slurm or PBS log reads well while the
job runs. Sampler steps are reported at most every ``every_s`` seconds (and always at the last step).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``progress(stage, done, total)``: a callable for :meth:`foldcp_hpc.model.boltz2.FoldModel.predict`."""

    def __init__(self, enabled: bool, stream: TextIO | None = None, every_s: float = 10.0) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.every_s = every_s
        self.start = time.perf_counter()
        self._stage_start: dict[str, float] = {}
        self._last_print = 0.0
        self.seconds: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"[{self.elapsed():9.1f} s] {text}", file=self.stream, flush=True)

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        begun = self._stage_start.setdefault(stage, now)
        if done == 0:
            self.say(f"{stage}: started")
            return
        self.seconds[stage] = now - begun
        if done < total and now - self._last_print < self.every_s:
            return
        self._last_print = now
        rate = (now - begun) / done
        eta = f", ETA {rate * (total - done):.0f} s" if done < total else f", {now - begun:.1f} s"
        self.say(f"{stage}: {done}/{total}{eta}")
