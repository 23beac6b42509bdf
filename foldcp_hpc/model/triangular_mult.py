"""Triangle multiplicative update on pair tiles (AF3 Algorithms 12 and 13; Boltz's ``layers/triangular_mult.py``).

Outgoing: out[i, j] = sum_k a[i, k] b[j, k]; incoming: out[i, j] = sum_k a[k, i] b[k, j]. On the grid the
contraction over k is a Cannon ring (:func:`tile_matmul`) after one tile transpose of the operand whose k
index runs along the wrong axis. Like Boltz, the contraction runs in float32 (float64 stays float64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..distributed import autograd as cp
from ..distributed.matmul import tile_matmul
from .common import at_least_f32

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid


class _TriangleMultiplication(nn.Module):
    """Both directions; parameters named as in Boltz so that state dicts load strictly."""

    outgoing: bool

    def __init__(self, dim: int = 128, *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
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
        # Input gating: D -> D
        x = self.norm_in(x)
        x_in = x
        x = self.p_in(x) * self.g_in(x).sigmoid()
        x = x * mask.unsqueeze(-1)
        a, b = at_least_f32(x).chunk(2, dim=-1)

        # Triangular projection as a tiled matrix product per (batch, channel)
        a = a.permute(0, 3, 1, 2)  # [B,I,K,D] -> [B,D,I,K]
        b = b.permute(0, 3, 1, 2)  # [B,J,K,D] -> [B,D,J,K] (outgoing) / [B,K,J,D] -> [B,D,K,J] (incoming)
        if self.outgoing:  # einsum "bikd,bjkd->bijd" = A @ B^T
            x = tile_matmul(a, cp.transpose_tiles(b, self.grid, dims=(2, 3)), self.grid)
        else:  # einsum "bkid,bkjd->bijd" = A^T @ B
            x = tile_matmul(cp.transpose_tiles(a, self.grid, dims=(2, 3)), b, self.grid)
        x = x.permute(0, 2, 3, 1)  # [B,D,I,J] -> [B,I,J,D]

        # Output gating
        return self.p_out(self.norm_out(x)) * self.g_out(x_in).sigmoid()


class TriangleMultiplicationOutgoing(_TriangleMultiplication):
    """Outgoing edges: out[i, j] = sum_k a[i, k] b[j, k] (AF3 Algorithm 12)."""

    outgoing = True


class TriangleMultiplicationIncoming(_TriangleMultiplication):
    """Incoming edges: out[i, j] = sum_k a[k, i] b[k, j] (AF3 Algorithm 13)."""

    outgoing = False
