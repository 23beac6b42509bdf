"""Kernels built on first use: Triton is imported only then, and a machine without it gets None."""

from __future__ import annotations

import functools
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
