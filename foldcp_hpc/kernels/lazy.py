"""Kernels built on first use: Triton is imported only then, and a machine without it gets None."""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Optional


def lazy_kernel(build: Callable[[Any, Any], Any]) -> Callable[[], Optional[Any]]:
    """``build(triton, triton.language)`` -> kernel, called once on the first call of the returned function;
    that function returns None where Triton does not import."""
    @functools.lru_cache(maxsize=1)
    def kernel() -> Optional[Any]:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            return None
        return build(triton, tl)

    kernel.__doc__ = build.__doc__
    return kernel


def autotune_options(triton: Any) -> dict:
    """Keyword arguments for ``triton.autotune`` that every kernel of the package passes.

    ``cache_results``: the autotuner's timings are kept on disk in Triton's cache folder (``TRITON_CACHE_DIR``,
    by default ``~/.triton/cache``), keyed by the kernel's source, the GPU target and the tuning key. A later
    process on the same node (or on any node sharing that folder) reuses the chosen configuration instead of
    timing every one again. ``FOLDCP_AUTOTUNE_CACHE=0`` turns this off (the timings are then made in every
    process), as does a Triton whose ``autotune`` has no such argument.
    """
    if os.environ.get("FOLDCP_AUTOTUNE_CACHE", "1") == "0":
        return {}
    try:
        parameters = inspect.signature(triton.autotune).parameters
    except (TypeError, ValueError):
        return {}
    return {"cache_results": True} if "cache_results" in parameters else {}
