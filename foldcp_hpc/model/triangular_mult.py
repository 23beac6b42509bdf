"""Triangle multiplicative update on pair tiles (AF3 Algorithms 12 and 13; Boltz's ``layers/triangular_mult.py``).

Outgoing: out[i, j] = sum_k a[i, k] b[j, k]; incoming: out[i, j] = sum_k a[k, i] b[k, j]. On the grid the
contraction over k is a Cannon ring (:func:`tile_matmul`) after one tile transpose of the operand whose k
index runs along the wrong axis. Like Boltz, the contraction runs in float32 (float64 stays float64).

Memory: the channels are contracted in ``CHANNEL_GROUPS`` groups (each group's a and b are projected,
gated, masked and sent round the ring on their own), and the output gating runs in row chunks, so besides
its input and output tiles a rank holds about one more tile, where Boltz holds the four [N, N, 2D]
projections at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import autograd as cp
from ..distributed.matmul import tile_matmul
from .common import ChunkWriter, at_least_f32, row_chunks

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

CHANNEL_GROUPS = 8  # the D channels are contracted in this many groups, one Cannon ring each
OUTPUT_ROW_FRACTION = 4  # the output gating runs on 1/4 of the tile's rows at a time


class _TriangleMultiplication(nn.Module):
    """Both directions; parameters named as in Boltz so that state dicts load strictly."""

    outgoing: bool

    def __init__(self, dim: int = 128, *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.dim = dim
        self.norm_in = nn.LayerNorm(dim, eps=1e-5)
        self.p_in = nn.Linear(dim, 2 * dim, bias=False)
        self.g_in = nn.Linear(dim, 2 * dim, bias=False)
        self.norm_out = nn.LayerNorm(dim)
        self.p_out = nn.Linear(dim, dim, bias=False)
        self.g_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor, use_kernels: bool = False) -> Tensor:
        """x: [B, N_i, N_j, D] pair tile (row-block r, col-block c); mask: [B, N_i, N_j] same tile.

        returns: [B, N_i, N_j, D] update of the same tile.
        """
        dim, grid = self.dim, self.grid
        x_in = self.norm_in(x)
        mask = mask.unsqueeze(-1)

        # Triangular projection, per group of channels d: a tiled matrix product over k
        product = ChunkWriter(dim=3, size=dim)
        for group in row_chunks(dim, -(-dim // CHANNEL_GROUPS)):
            a = self._gated_input(x_in, group, mask)  # [B,I,K,g]
            b = self._gated_input(x_in, slice(dim + group.start, dim + group.stop), mask)
            a = a.permute(0, 3, 1, 2)  # [B,I,K,g] -> [B,g,I,K]
            b = b.permute(0, 3, 1, 2)  # [B,J,K,g] -> [B,g,J,K] (outgoing) / [B,K,J,g] -> [B,g,K,J] (incoming)
            if self.outgoing:  # einsum "bikd,bjkd->bijd" = A @ B^T
                part = tile_matmul(a.contiguous(), cp.transpose_tiles(b, grid, dims=(2, 3)), grid)
            else:  # einsum "bkid,bkjd->bijd" = A^T @ B
                part = tile_matmul(cp.transpose_tiles(a, grid, dims=(2, 3)), b.contiguous(), grid)
            product.put(group, part.permute(0, 2, 3, 1))  # [B,g,I,J] -> [B,I,J,g]
        x = product.result()

        # Output gating, in row chunks
        out = ChunkWriter(dim=1, size=x.shape[1], into=x)
        for rows in row_chunks(x.shape[1], -(-x.shape[1] // OUTPUT_ROW_FRACTION)):
            gate = self.g_out(x_in[:, rows]).sigmoid()
            update = self.p_out(self.norm_out(x[:, rows]))
            out.put(rows, update * gate if update.requires_grad else update.mul_(gate))
        return out.result()

    def _gated_input(self, x: Tensor, channels: slice, mask: Tensor) -> Tensor:
        """Input gating for ``channels`` of the 2D projections: p_in(x) * sigmoid(g_in(x)) * mask, in float32."""
        projected = F.linear(x, self.p_in.weight[channels])
        gate = F.linear(x, self.g_in.weight[channels])
        if projected.requires_grad:
            return at_least_f32(projected * gate.sigmoid() * mask)
        return at_least_f32(projected.mul_(gate.sigmoid_()).mul_(mask))


class TriangleMultiplicationOutgoing(_TriangleMultiplication):
    """Outgoing edges: out[i, j] = sum_k a[i, k] b[j, k] (AF3 Algorithm 12)."""

    outgoing = True


class TriangleMultiplicationIncoming(_TriangleMultiplication):
    """Incoming edges: out[i, j] = sum_k a[k, i] b[k, j] (AF3 Algorithm 13)."""

    outgoing = False
