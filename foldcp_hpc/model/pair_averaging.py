"""Pair-weighted averaging on the grid (Boltz's ``layers/pair_averaging.py``, MSA module).

    o[s, i] = proj_o( g[s, i] * sum_j softmax_j(b[i, j]) v[s, j] ),   b = proj_z(norm_z(z)) per head

Rank (r, c) holds the MSA rows block c of token block r and the pair tile (r, c). The softmax over j spans
grid row r: partial maxima and sums per tile, reduced along the row (as the single-track attention does).
The weighted sum sum_j w[i, j] v[s, j] is Cannon's ring: w tiles travel along grid rows, the MSA blocks
v[S_c, block k] (held by rank (k, c)) along grid columns, and the result lands where the MSA block lives.
Padded tokens are removed exactly. Parameter names are Boltz's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from ..distributed import autograd as cp
from ..distributed import collectives as raw
from .common import PAD_BIAS, ChunkWriter, block_is_padding, chunk_rows, ring, row_chunks

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid


class PairWeightedAveraging(nn.Module):
    """Same constructor arguments as Boltz's (c_m, c_z, c_h, num_heads, inf) plus ``grid``."""

    def __init__(self, c_m: int, c_z: int, c_h: int, num_heads: int, inf: float = 1e6, *,
                 grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.c_m, self.c_z, self.c_h, self.num_heads, self.inf = c_m, c_z, c_h, num_heads, inf
        self.norm_m = nn.LayerNorm(c_m)
        self.norm_z = nn.LayerNorm(c_z)
        self.proj_m = nn.Linear(c_m, c_h * num_heads, bias=False)
        self.proj_g = nn.Linear(c_m, c_h * num_heads, bias=False)
        self.proj_z = nn.Linear(c_z, num_heads, bias=False)
        self.proj_o = nn.Linear(c_h * num_heads, c_m, bias=False)

    def forward(self, m: Tensor, z: Tensor, mask: Tensor, chunk_heads: bool = False,
                n_tokens: Optional[int] = None) -> Tensor:
        """m: [B, S_c, N_r, c_m] MSA block (rows block c, tokens block r); z: [B, N_i, N_j, c_z] pair tile
        (row-block r, col-block c); mask: [B, N_i, N_j] pair-mask tile; n_tokens: the true N (default: the
        grid's record). returns: [B, S_c, N_r, c_m] update of the MSA block.
        """
        grid = self.grid
        heads, width = self.num_heads, self.c_h
        n_tokens = grid.padding_for(z.shape[1], n_tokens)
        m = self.norm_m(m)
        v = self.proj_m(m)
        v = v.reshape(*v.shape[:3], heads, width).permute(0, 3, 1, 2, 4)  # [B,s,j,H,D] -> [B,H,s,j,D]
        n_i = z.shape[1]
        writer = ChunkWriter(dim=1, size=n_i)  # z normalised a chunk of rows at a time: never a second tile
        for rows in row_chunks(n_i, chunk_rows(1.0, z.numel(), z[:, :1].numel(), n_i, z.is_cuda)):
            writer.put(rows, self.proj_z(self.norm_z(z[:, rows])))
        bias = writer.result().permute(0, 3, 1, 2)  # [B,i,j,H] -> [B,H,i,j]
        bias = bias + (1 - mask[:, None]) * -self.inf
        padding = block_is_padding(n_tokens, grid, grid.col, z.device)
        if padding is not None:
            bias = bias.masked_fill(padding, PAD_BIAS)
        # softmax over all j of grid row r: per-tile statistics, reduced along the row
        row_max = raw.all_reduce(bias.detach().amax(dim=-1, keepdim=True), grid, "row", op="max")
        weights = torch.exp(bias - row_max)
        weights = weights / cp.all_reduce(weights.sum(dim=-1, keepdim=True), grid, "row")  # [B,H,i,j]

        # o[s, i] = sum_k w(r, k)[i, j] v(k, c)[s, j]: Cannon, w along rows, v along columns
        out = None
        w_steps = ring([weights], grid, "row", skew=grid.row)
        v_steps = ring([v], grid, "col", skew=grid.col)
        for (w_k,), (v_k,) in zip(w_steps, v_steps):
            part = torch.einsum("bhij,bhsjd->bhsid", w_k, v_k)
            out = part if out is None else out + part
        o = out.permute(0, 2, 3, 1, 4)  # [B,H,s,i,D] -> [B,s,i,H,D]
        o = o.reshape(*o.shape[:3], heads * width)
        return self.proj_o(self.proj_g(m).sigmoid() * o)
