"""The flash kernel's machine code for an H100, compiled here without a GPU (``kernel_codegen.py``).

CI has no GPU, so this is where a change that quietly slows the kernel shows: ptxas serialising the tensor-core
products (its note C7515, which is why the key loop tells the compiler it runs at least once) or the first
configuration spilling past its register cap (the cap lets three programs share an SM; with both, the kernel took
0.185 s at N = 4096 on an H100 against 0.208 s before: docs/performance.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_flash_kernel_compiles_for_sm90_without_serialised_products():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("kernel_codegen.py"))], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode == 3:  # kernel_codegen.UNSUPPORTED
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    cases = {}  # "even=1 gate=0 folded=1 fixed=0" -> {"regs": .., "spill": .., "C7515": ..}
    for line in done.stdout.splitlines():
        if line.startswith("even="):
            words = line.split()
            cases[" ".join(words[:4])] = dict(word.split("=") for word in words[4:])
    assert len(cases) == 12, done.stdout
    for case, report in cases.items():
        assert report["C7515"] == "0", f"{case}: ptxas serialised the wgmma products (C7515)"
        if case.startswith("even=1"):
            assert int(report["spill"]) <= 16, f"{case}: {report['spill']} bytes spilled at {report['regs']} registers"
    # the warp-specialised Gluon kernel (flash_ws): 128 registers at launch, moved to the consumers; no spill, no
    # serialised products
    ws = [line for line in done.stdout.splitlines() if line.startswith("ws ")]
    assert len(ws) == 1, done.stdout
    if ws[0].startswith("ws unsupported"):
        pytest.skip(ws[0])
    report = dict(word.split("=") for word in ws[0].split()[1:])
    assert report == {"regs": "128", "spill": "0", "C7515": "0", "C7511": "0"}, ws[0]
