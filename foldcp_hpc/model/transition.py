"""Transition (SwiGLU MLP), Boltz's ``layers/transition.py``: per element, so tile-local with no communication."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..kernels.gating import gate_product
from ..kernels.swiglu import swiglu_add, swiglu_ok
from .common import (ChunkWriter, autocast_low_dtype, inference_rows, layer_norm, refuse_autograd, row_chunks,
                     rows_within, wide_linear)

# The [..., hidden] activations of one row chunk stay within this fraction of the input's size.
HIDDEN_BUDGET = 0.5
# add_update: two hidden activations live at once (silu(fc1) and fc2), together within 1/4 of the input.
INPLACE_HIDDEN_BUDGET = 0.125


class Transition(nn.Module):
    """Two-layer SwiGLU MLP applied to the last dim; same parameters as Boltz's ``Transition``.

    x: [B, N_i, ..., D] any placement (a pair tile or the replicated single representation); returns
    [B, N_i, ..., out_dim]. Rows of dim 1 are processed in chunks so that the hidden activations never
    exceed half the size of x (Boltz materialises all of them: four times a pair tensor). ``chunk_size``
    also splits the hidden layer, as Boltz's does.
    """

    def __init__(self, dim: int = 128, hidden: int = 512, out_dim: Optional[int] = None) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(dim, hidden, bias=False)
        self.fc3 = nn.Linear(hidden, out_dim, bias=False)
        self.silu = nn.SiLU()
        self.hidden = hidden

    def forward(self, x: Tensor, chunk_size: Optional[int] = None) -> Tensor:
        if x.dim() < 3:
            return self._mlp(x, chunk_size)
        per_row = x[:, :1].numel() // x.shape[-1] * self.hidden
        rows = rows_within(HIDDEN_BUDGET * x.numel(), per_row, x.shape[1])
        if rows == x.shape[1]:
            return self._mlp(x, chunk_size)
        writer = ChunkWriter(dim=1, size=x.shape[1])
        for sl in row_chunks(x.shape[1], rows):
            writer.put(sl, self._mlp(x[:, sl], chunk_size))
        return writer.result()

    def add_update(self, x: Tensor, chunk_size: Optional[int] = None) -> Tensor:
        """``x + self(x, chunk_size)`` computed into x's storage, for inference: x is overwritten and returned.

        x: [B, N_i, ..., D] as for :meth:`forward` (out_dim must be D). Rows of dim 1 are updated chunk by chunk,
        each chunk's hidden activations within 1/4 of x's size (a row at least). Raises ValueError when autograd
        is on and x or a parameter requires grad.
        """
        refuse_autograd(self, x)
        if self.fc3.out_features != x.shape[-1]:
            raise ValueError(f"add_update needs out_dim == dim, got {self.fc3.out_features} for inputs of "
                             f"{x.shape[-1]} channels")
        low = autocast_low_dtype(x)
        if low is not None and x.is_contiguous() and swiglu_ok(x, x.shape[-1], self.hidden):
            # one kernel pass: LayerNorm, fc1, fc2, the gate and fc3, the hidden layer never in memory
            weights = [w.to(low).contiguous() for w in (self.fc1.weight, self.fc2.weight, self.fc3.weight)]
            swiglu_add(x.view(-1, x.shape[-1]), self.norm, *weights)
            return x
        # under autocast the update is added unrounded (float32): each chunk's goes straight into x
        mlp = self._mlp if low is None else lambda rows, _: self._wide_mlp(rows)
        if x.dim() < 3:
            return x.add_(mlp(x, chunk_size))
        per_row = x[:, :1].numel() // x.shape[-1] * self.hidden
        for rows in row_chunks(x.shape[1], inference_rows(INPLACE_HIDDEN_BUDGET, x.numel(), per_row, x.shape[1],
                                                              x.is_cuda)):
            x[:, rows].add_(mlp(x[:, rows], chunk_size))
        return x

    def _wide_mlp(self, x: Tensor) -> Tensor:
        """:meth:`_mlp` under autocast without autograd, with two roundings fewer than Boltz's: fc1 and fc2 are one
        GEMM (bfloat16 outputs, as autocast gives), silu(fc1) * fc2 is computed in float32 and rounded once as
        fc3's operand (:func:`~foldcp_hpc.kernels.gating.gate_product`), and fc3's output stays float32
        (:func:`~.common.wide_linear`), added to x unrounded. returns float32."""
        x = layer_norm(self.norm, x)
        # fc1 and fc2 as one GEMM, bfloat16 as autocast gives them (a float32 output measured 1.5x slower here)
        both = nn.functional.linear(x, torch.cat([self.fc1.weight, self.fc2.weight]))  # [..., 2 hidden]
        hidden = both.new_empty(*both.shape[:-1], self.hidden, dtype=autocast_low_dtype(x))
        gate_product(both[..., self.hidden:], both[..., :self.hidden], "silu", out=hidden)  # silu(fc1) * fc2
        return wide_linear(hidden, self.fc3.weight)

    def _mlp(self, x: Tensor, chunk_size: Optional[int]) -> Tensor:
        x = layer_norm(self.norm, x)
        if chunk_size is None or self.training:
            hidden = self.silu(self.fc1(x))
            hidden = hidden * self.fc2(x) if hidden.requires_grad else hidden.mul_(self.fc2(x))
            return self.fc3(hidden)
        out = None
        for start in range(0, self.hidden, chunk_size):
            stop = start + chunk_size
            h = self.silu(x @ self.fc1.weight[start:stop].T) * (x @ self.fc2.weight[start:stop].T)
            part = h @ self.fc3.weight[:, start:stop].T
            out = part if out is None else out + part
        return out
