"""The kernels' autotuning timings are kept on disk (``kernels.lazy.autotune_options``), so that a later process
does not time every configuration again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


class _Triton:
    """A stand-in for the triton module whose ``autotune`` takes the given keyword arguments."""

    def __init__(self, with_cache: bool) -> None:
        if with_cache:
            def autotune(configs, key, cache_results=False):
                return None
        else:
            def autotune(configs, key):
                return None
        self.autotune = autotune


def test_autotune_options_cache_where_triton_has_it(monkeypatch):
    from foldcp_hpc.kernels.lazy import autotune_options

    monkeypatch.delenv("FOLDCP_AUTOTUNE_CACHE", raising=False)
    assert autotune_options(_Triton(with_cache=True)) == {"cache_results": True}
    assert autotune_options(_Triton(with_cache=False)) == {}
    monkeypatch.setenv("FOLDCP_AUTOTUNE_CACHE", "0")
    assert autotune_options(_Triton(with_cache=True)) == {}


def test_every_autotuned_kernel_caches_its_timings():
    """Built as on a GPU (not in the interpreter, where Triton never caches), each autotuned kernel of the package
    keeps its timings on disk."""
    triton = pytest.importorskip("triton")
    import inspect

    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        pytest.skip(f"Triton {triton.__version__} has no cache_results")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FOLDCP_AUTOTUNE_CACHE")}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    code = ("from foldcp_hpc.kernels import norm_gate, norm_linear, swiglu, triangle_attention\n"
            "print(*(k.cache_results for k in (triangle_attention._build(), norm_gate._kernel(), "
            "norm_linear._kernel(), swiglu._kernel())))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True"] * 4, done.stdout
