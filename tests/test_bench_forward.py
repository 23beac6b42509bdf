"""``python -m foldcp_hpc.bench forward`` at a tiny size on the CPU (one rank, through the launcher): both rows in
the table and in the JSON, and the two trunks' distogram logits equal to float32 rounding; an out-of-memory
error becomes an OOM row, any other error is raised."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from conftest import mpirun
from foldcp_hpc.bench.forward import _measured


def test_bench_forward_ours_and_boltz(tmp_path):
    out = tmp_path / "forward.json"
    done = mpirun(1, sys.executable, "-m", "foldcp_hpc.bench", "forward", "--n", "24", "--recycles", "1",
                  "--steps", "2", "--architecture", "boltz2-small", "--blocks", "1", "--impl", "ours,boltz",
                  "--dtype", "float32", "--device", "cpu", "--json", str(out), timeout=180,
                  env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    table = {m.group(1): m for m in (re.match(r"\s*24\s+\d+\s+(ours|boltz)\s+1\s+([\d.]+)\s+([\d.]+)", line)
                                     for line in lines) if m}
    assert set(table) == {"ours", "boltz"}, done.stdout
    assert "boltz kernels (cuEquivariance): off" in done.stdout

    report = json.loads(out.read_text())
    rows = {r["impl"]: r for r in report["rows"]}
    assert set(rows) == {"ours", "boltz"}
    for row in rows.values():
        assert row["status"] == "ok" and row["n"] == 24 and row["ranks"] == 1
        assert row["seconds"] > 0 and row["peak_bytes"][0] > 0
        assert 6 * 24 <= row["atoms"] <= 12 * 24  # about 8 heavy atoms a residue
    (check,) = report["trunk_check"]
    assert check["n"] == 24 and check["max_abs_boltz"] > 0.1  # logits that are not all zero
    assert check["relative"] < 1e-4, check
    assert f"trunk check at N=24: distogram logits, max |ours - boltz| {check['max_abs_diff']:.3e}" in done.stdout


def test_out_of_memory_is_reported_not_raised():
    def runs_out():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.17 GiB")

    def fails():
        raise RuntimeError("shapes do not match")

    assert _measured(runs_out, torch.device("cpu"), warmup=0, keep=True) == ("OOM", None, None, None, None)
    with pytest.raises(RuntimeError, match="shapes"):
        _measured(fails, torch.device("cpu"), warmup=0, keep=True)
    status, seconds, peak, device_peak, kept = _measured(lambda: torch.ones(3), torch.device("cpu"), 1, keep=True)
    assert status == "ok" and seconds >= 0 and device_peak is None and kept.tolist() == [1.0, 1.0, 1.0]
