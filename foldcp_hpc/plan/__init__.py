"""``foldcp-hpc plan``: the per-rank peak memory of a job's stages, predicted before running it.

:mod:`.model` is the memory model (pure arithmetic on the input's sizes, the grid and the dtype, calibrated
against measured per-rank peaks); :mod:`.report` reads a job, counts its input and prints the table.
"""

from .model import (Architecture, MemoryPlan, Problem, StagePeak, largest_tokens, plan_memory, samples_per_step,
                    smallest_grid, stage_transients)
from .report import architecture_of, count_input, parse_memory, run_plan

__all__ = ["Architecture", "MemoryPlan", "Problem", "StagePeak", "largest_tokens", "plan_memory", "samples_per_step",
           "smallest_grid", "stage_transients", "architecture_of", "count_input", "parse_memory", "run_plan"]
