"""Outer product mean on the grid (AF3 Algorithm 9; Boltz's ``layers/outer_product_mean.py``).

    z[i, j] = proj_o( sum_s a[s, i] (x) b[s, j] / sum_s mask[s, i] mask[s, j] )

The MSA is placed as rows block c of token block r on rank (r, c). Tile (r, c) of z sums over all row blocks
k the products of a[S_k, block r] (rank (r, k)) and b[S_k, block c] (rank (c, k), brought to rank (k, c) by
one exchange with the mirror rank): Cannon's ring with the MSA rows as the inner dimension. Each step's
[i, j, c_hidden^2] products are projected at once (proj_o is linear), query rows in chunks, so a rank never
holds more than a chunk of them. Parameter names are Boltz's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..distributed import autograd as cp
from .common import ChunkWriter, chunk_rows, ring, row_chunks

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

# the [i, j, c_hidden^2] products of one chunk of rows stay within this fraction of the output tile
PRODUCT_BUDGET = 0.5


class OuterProductMean(nn.Module):
    """Same constructor arguments as Boltz's (c_in, c_hidden, c_out) plus ``grid``."""

    def __init__(self, c_in: int, c_hidden: int, c_out: int, *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.c_hidden = c_hidden
        self.norm = nn.LayerNorm(c_in)
        self.proj_a = nn.Linear(c_in, c_hidden, bias=False)
        self.proj_b = nn.Linear(c_in, c_hidden, bias=False)
        self.proj_o = nn.Linear(c_hidden * c_hidden, c_out)

    def forward(self, m: Tensor, mask: Tensor, chunk_size: int | None = None) -> Tensor:
        """m: [B, S_c, N_r, c_in] MSA block (rows block c, tokens block r); mask: [B, S_c, N_r] the same block.

        returns: [B, N_i, N_j, c_out] pair tile (row-block r, col-block c).
        """
        grid = self.grid
        mask = mask.unsqueeze(-1).to(m)
        m = self.norm(m)
        a = self.proj_a(m) * mask  # [B,s,i,C]
        b = self.proj_b(m) * mask  # [B,s,j,D]
        # b and its mask for rows block r of token block c live on the mirror rank (c, r): an exchange
        # only (dims=(1, 1): the block's own dims [B, s, j, D] stay as they are)
        b_t = cp.transpose_tiles(b, grid, dims=(1, 1))
        mask_t = cp.transpose_tiles(mask, grid, dims=(1, 1))
        batch, _, n_i, width = a.shape
        n_j = b_t.shape[2]
        weight = self.proj_o.weight  # [out, C*D], columns ordered (c, d)
        rows = chunk_rows(PRODUCT_BUDGET, batch * n_i * n_j * weight.shape[0], batch * n_j * width * width, n_i,
                          m.is_cuda)

        z = None
        count = None
        a_steps = ring([a, mask], grid, "row", skew=grid.row)  # rank (r, c) sees a[S_k] with k = r + c + step
        b_steps = ring([b_t, mask_t], grid, "col", skew=grid.col)
        for (a_k, mask_a), (b_k, mask_b) in zip(a_steps, b_steps):
            pairs = torch.einsum("bsi,bsj->bij", mask_a[..., 0], mask_b[..., 0])
            count = pairs if count is None else count + pairs
            step = ChunkWriter(dim=1, size=n_i)
            for sl in row_chunks(n_i, rows):
                product = torch.einsum("bsic,bsjd->bijcd", a_k[:, :, sl], b_k)  # [B,i,j,C,D]
                step.put(sl, product.reshape(*product.shape[:3], -1) @ weight.T)
            z = step.result() if z is None else (z + step.result() if z.requires_grad else z.add_(step.result()))
        if z.requires_grad:
            return z / count.clamp(min=1).unsqueeze(-1) + self.proj_o.bias
        mean = z.div_(count.clamp(min=1).unsqueeze(-1)) if z.dtype == torch.promote_types(z.dtype, count.dtype) \
            else z / count.clamp(min=1).unsqueeze(-1)
        return mean.add_(self.proj_o.bias) if mean.dtype == torch.promote_types(mean.dtype, self.proj_o.bias.dtype) \
            else mean + self.proj_o.bias
