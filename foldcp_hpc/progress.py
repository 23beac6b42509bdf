"""Progress lines for batch logs, and the per-stage time and memory report at the end of a run.

Rank 0 prints stage, step, elapsed time and an ETA in plain lines (no terminal control codes), flushed at once, so
that a Slurm or PBS log reads well while the job runs; other ranks are silent. Sampler steps are reported at most
every ``every_s`` seconds (and always at the last step).

Every rank also keeps, per stage, its wall time and its peak memory: on a GPU the peak of
``torch.cuda.max_memory_allocated`` within the stage (reset when the stage starts), on a CPU the process's peak
resident size so far (the high-water mark, which cannot be reset). :func:`stage_report` gathers them into a table
(min / median / max over ranks).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "stage_report", "format_report"]

MIB = 1024 * 1024


class Progress:
    """``progress(stage, done, total)``: a callable for :meth:`foldcp_hpc.model.boltz2.FoldModel.predict`.

    A call with a new stage name closes the previous stage (its time and peak memory are recorded).
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None, every_s: float = 10.0, device: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.every_s = every_s
        self.device = device
        self.start = time.perf_counter()
        self._stage_start: dict[str, float] = {}
        self._last_print = 0.0
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self._current: str | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"[{self.elapsed():9.1f} s] {text}", file=self.stream, flush=True)

    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None:
        now = time.perf_counter()
        if stage != self._current:
            self._enter(stage)
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
        self.say(f"{stage}: {done}/{total}{f' ({detail})' if detail else ''}{eta}")

    # ------------------------------------------------------------------------------------------------------------
    def _on_gpu(self) -> bool:
        return self.device is not None and getattr(self.device, "type", "cpu") == "cuda"

    def _enter(self, stage: str) -> None:
        self.finish_stage()
        self._current = stage
        self._stage_start[stage] = time.perf_counter()
        if self._on_gpu():
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def finish_stage(self) -> None:
        """Close the current stage: record its time and peak memory."""
        if self._current is None:
            return
        stage = self._current
        self.seconds[stage] = time.perf_counter() - self._stage_start[stage]
        self.peak_bytes[stage] = self._peak()
        self._current = None

    def _peak(self) -> int:
        if self._on_gpu():
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux

    def memory_kind(self) -> str:
        return "GPU memory allocated (peak within the stage)" if self._on_gpu() else \
            "host resident memory (peak since the start)"


def stage_report(progress: Progress, comm: Any) -> dict[str, Any] | None:
    """Every rank's stage times and peaks gathered on rank 0 of ``comm`` (collective): {"memory": kind, "ranks": P,
    "stages": [{"stage", "seconds" (max over ranks), "peak_mib_min", "peak_mib_median", "peak_mib_max"}]};
    None on the other ranks."""
    progress.finish_stage()
    everyone = comm.gather((dict(progress.seconds), dict(progress.peak_bytes)), root=0)
    if everyone is None:
        return None
    stages = []
    for stage in progress.peak_bytes:
        peaks = [peaks.get(stage, 0) / MIB for _, peaks in everyone]
        stages.append({"stage": stage, "seconds": round(max(seconds.get(stage, 0.0) for seconds, _ in everyone), 3),
                       "peak_mib_min": round(min(peaks), 1), "peak_mib_median": round(statistics.median(peaks), 1),
                       "peak_mib_max": round(max(peaks), 1)})
    return {"memory": progress.memory_kind(), "ranks": len(everyone), "stages": stages}


def format_report(report: dict[str, Any]) -> list[str]:
    """The report as plain table lines for the log."""
    width = max([len("stage"), *(len(row["stage"]) for row in report["stages"])])
    lines = [f"{'stage':<{width}} {'seconds':>9} {'peak MiB min':>13} {'median':>10} {'max':>10}"]
    for row in report["stages"]:
        lines.append(f"{row['stage']:<{width}} {row['seconds']:>9.1f} {row['peak_mib_min']:>13.1f} "
                     f"{row['peak_mib_median']:>10.1f} {row['peak_mib_max']:>10.1f}")
    lines.append(f"memory: {report['memory']}, over {report['ranks']} ranks")
    return lines
