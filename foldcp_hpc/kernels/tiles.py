"""``@triton.jit`` helpers the row kernels share (:mod:`.layer_norm`, :mod:`.norm_gate`, :mod:`.swiglu`).

This module imports Triton when it is imported: the kernel builders import it on first use only. A kernel calls
a helper by a name in its own module's globals (the builders put them there): Triton's compiler and its CPU
interpreter both look a kernel's callees up among those globals, and the interpreter does not see a builder's
local names.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["normalise", "round_bf16", "HELPERS"]


@triton.jit
def normalise(x, w_ptr, b_ptr, eps, C: tl.constexpr):
    """LayerNorm of a float32 tile x [BLOCK_M, C] over its C channels (statistics in float32), with the weight and
    bias at w_ptr and b_ptr; returns float32."""
    cols = tl.arange(0, C)
    centred = x - (tl.sum(x, 1) / C)[:, None]
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / C + eps)
    return centred * rstd[:, None] * tl.load(w_ptr + cols).to(tl.float32)[None, :] \
        + tl.load(b_ptr + cols).to(tl.float32)[None, :]


@triton.jit
def round_bf16(x):
    """A float32 tile rounded to the nearest bfloat16 (ties to even), kept in float32: the GPU's cast, by hand for
    Triton's CPU interpreter, whose casts truncate."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


HELPERS = {"normalise": normalise, "round_bf16": round_bf16}
