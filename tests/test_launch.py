"""Whole-job behaviour under mpirun: the README's first command, and errors that must never hang a job.

Serial tests that start their own ``mpirun -n 4`` (through jobs/mpirun-local.sh).
"""

from __future__ import annotations

import sys
import textwrap
import time

from conftest import mpirun

FOLDCP = [sys.executable, "-m", "foldcp_hpc.cli"]


def test_info_prints_the_grid_and_passes_the_self_check():
    result = mpirun(4, *FOLDCP, "info", "jobs/demo.toml")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "4 rank(s) | grid 1x2x2 (dp x p x p) | transport gloo" in out
    assert "row groups: [0, 1] [2, 3]" in out and "col groups: [0, 2] [1, 3]" in out
    assert "self-check: 9/9 collectives exact" in out
    assert out.count("foldcp-hpc 0.") == 1, "only rank 0 speaks"


def test_an_exception_on_one_rank_ends_the_whole_job_quickly():
    script = textwrap.dedent("""
        import time, torch
        from foldcp_hpc.runtime import abort_on_error
        from foldcp_hpc.distributed.grid import ProcessGrid
        from foldcp_hpc.distributed import collectives as raw
        with abort_on_error():
            grid = ProcessGrid.create(backend="gloo", timeout_s=600)
            if grid.rank == 2:
                time.sleep(0.5)
                raise ValueError("boom from rank 2")
            raw.all_reduce(torch.ones(3), grid, "grid")  # the others wait for rank 2 in a collective
            time.sleep(600)
    """)
    start = time.monotonic()
    result = mpirun(4, sys.executable, "-c", script, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 30, f"the job took {elapsed:.1f} s to end"
    assert "foldcp-hpc: rank 2/4: ValueError: boom from rank 2" in result.stderr


def test_a_grid_that_does_not_fit_the_world_is_reported_once():
    start = time.monotonic()
    result = mpirun(4, *FOLDCP, "info", "jobs/demo.toml", "grid.cp=3", timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - start < 30
    lines = [line for line in result.stderr.splitlines() if line.startswith("foldcp-hpc:")]
    assert lines == ["foldcp-hpc: rank 0/4: GridError: grid 3x3 needs 9 ranks, got 4"]


def test_a_bad_job_file_names_the_file_and_field(tmp_path):
    job = tmp_path / "bad.toml"
    job.write_text("[runtime]\nbackend_ = 'gloo'\n")
    result = mpirun(4, *FOLDCP, "info", str(job), timeout=60)
    assert result.returncode != 0
    assert f"{job}: [runtime] has no key 'backend_'; did you mean 'backend'?" in result.stderr
