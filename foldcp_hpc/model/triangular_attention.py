"""Triangle self-attention on pair tiles (AF3 Algorithms 14 and 15; Boltz's ``layers/triangular_attention``).

Starting node: query (i, j) attends over keys (i, k) of the same row i, with bias b[j, k] and Boltz's mask
bias 1e9 (mask[i, k] - 1):

    o[i, j] = sum_k softmax_k(q[i, j] . k[i, k] / sqrt(c) + mask_bias[i, k] + b[j, k]) v[i, k]

On rank (r, c) the queries of the tile stay put. Keys, values and key mask of row-block r travel round
grid row r; the bias slices b[j in block c, k in block kb] they need travel round grid column c after one
tile transpose. Both are skewed Cannon-style so that at step t the keys of block kb = r + c + t meet the
bias of the same block. Each step updates an online (log-sum-exp) softmax; query rows are processed in
chunks of ``chunk_size`` as Boltz chunks them. Ending node: the same on the tile-transposed pair tensor.
Padded keys are removed exactly (see ``common.PAD_BIAS``), so padded runs equal unpadded ones.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from ..distributed import autograd as cp
from .common import PAD_BIAS, block_is_padding, ring

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid


class _Attention(nn.Module):
    """The gated multi-head attention weights of Boltz's ``primitives.Attention`` (same parameter names)."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int) -> None:
        super().__init__()
        self.c_hidden = c_hidden
        self.no_heads = no_heads
        self.linear_q = nn.Linear(c_in, c_hidden * no_heads, bias=False)
        self.linear_k = nn.Linear(c_in, c_hidden * no_heads, bias=False)
        self.linear_v = nn.Linear(c_in, c_hidden * no_heads, bias=False)
        self.linear_o = nn.Linear(c_hidden * no_heads, c_in, bias=False)
        self.linear_g = nn.Linear(c_in, c_hidden * no_heads, bias=False)
        self.sigmoid = nn.Sigmoid()


class TriangleAttention(nn.Module):
    """Triangle attention around the starting node (``starting=True``) or the ending node."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, starting: bool = True, inf: float = 1e9, *,
                 grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.c_in = c_in
        self.c_hidden = c_hidden
        self.no_heads = no_heads
        self.starting = starting
        self.inf = inf
        self.layer_norm = nn.LayerNorm(c_in)
        self.linear = nn.Linear(c_in, no_heads, bias=False)
        self.mha = _Attention(c_in, c_hidden, no_heads)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                use_kernels: bool = False, n_tokens: Optional[int] = None) -> Tensor:
        """x: [B, N_i, N_j, C] pair tile (row-block r, col-block c); mask: [B, N_i, N_j] the same tile.

        chunk_size: query rows per chunk (None: all local rows at once).
        n_tokens: the true N; padded keys are then removed exactly. Without it, padding counts as masked,
            which changes nothing at unmasked positions.
        returns: [B, N_i, N_j, C] update of the same tile.
        """
        grid = self.grid
        if mask is None:
            mask = x.new_ones(x.shape[:-1])
        if not self.starting:
            x = cp.transpose_tiles(x, grid)
            mask = cp.transpose_tiles(mask, grid)
        out = self._starting(x, mask, chunk_size, n_tokens)
        if not self.starting:
            out = cp.transpose_tiles(out, grid)
        return out

    def _starting(self, x: Tensor, mask: Tensor, chunk_size: Optional[int], n_tokens: Optional[int]) -> Tensor:
        grid, mha = self.grid, self.mha
        batch, n_i, n_j, _ = x.shape
        heads, width = self.no_heads, self.c_hidden
        x = self.layer_norm(x)

        # Tile-local projections. q: [B,I,J,H,C]; k, v: [B,I,K,H,C] (the tile's columns are keys too)
        q = mha.linear_q(x).view(batch, n_i, n_j, heads, width) / math.sqrt(width)
        k = mha.linear_k(x).view(batch, n_i, n_j, heads, width)
        v = mha.linear_v(x).view(batch, n_i, n_j, heads, width)
        gate = mha.sigmoid(mha.linear_g(x))
        mask_bias = self.inf * (mask - 1)  # [B,I,K]
        # the triangle bias b[j, k] for k in this tile's column block lives on the mirror tile:
        tri_bias = cp.transpose_tiles(self.linear(x), grid)  # [B,I,J,H] of b^T: [B,K,J,H] with K = row block

        q = q.permute(0, 1, 3, 2, 4)  # [B,I,J,H,C] -> [B,I,H,J,C]
        k = k.permute(0, 1, 3, 2, 4)  # [B,I,K,H,C] -> [B,I,H,K,C]
        v = v.permute(0, 1, 3, 2, 4)  # [B,I,K,H,C] -> [B,I,H,K,C]
        tri_bias = tri_bias.permute(0, 3, 2, 1)  # [B,K,J,H] -> [B,H,J,K]

        chunk = n_i if chunk_size is None else max(1, chunk_size)
        rows = [slice(s, min(s + chunk, n_i)) for s in range(0, n_i, chunk)]
        state: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(rows)

        keys = ring([k, v, mask_bias], grid, "row", skew=grid.row)
        biases = ring([tri_bias], grid, "col", skew=grid.col)
        for step, ((k_t, v_t, mb_t), (b_t,)) in enumerate(zip(keys, biases)):
            block = (grid.row + grid.col + step) % grid.p
            padding = block_is_padding(n_tokens, grid, block, x.device)
            for index, sl in enumerate(rows):
                # logits [B,i,H,J,K]: q.k, then the mask bias, then the triangle bias (Boltz's order)
                logits = torch.einsum("bihjc,bihkc->bihjk", q[:, sl], k_t[:, sl])
                logits = logits + mb_t[:, sl, None, None, :]
                logits = logits + b_t[:, None]
                if padding is not None:
                    logits = logits.masked_fill(padding, PAD_BIAS)
                state[index] = _merge(state[index], logits, v_t[:, sl])
        o = torch.cat([acc / norm for _, norm, acc in state], dim=1)  # [B,I,H,J,C]
        o = o.permute(0, 1, 3, 2, 4)  # [B,I,H,J,C] -> [B,I,J,H,C]
        o = o * gate.view(batch, n_i, n_j, heads, width)
        return mha.linear_o(o.reshape(batch, n_i, n_j, heads * width))


def _merge(state: tuple[Tensor, Tensor, Tensor] | None, logits: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One online-softmax step. logits: [B,i,H,J,K]; v: [B,i,H,K,C]; state: (max, sum, weighted values).

    The running max only stabilises the exponentials; the result does not depend on it, so it carries no
    gradient.
    """
    block_max = logits.detach().amax(dim=-1, keepdim=True)  # [B,i,H,J,1]
    if state is None:
        weights = torch.exp(logits - block_max)
        return block_max, weights.sum(-1, keepdim=True), torch.einsum("bihjk,bihkc->bihjc", weights, v)
    run_max, norm, acc = state
    new_max = torch.maximum(run_max, block_max)
    scale = torch.exp(run_max - new_max)
    weights = torch.exp(logits - new_max)
    norm = norm * scale + weights.sum(-1, keepdim=True)
    acc = acc * scale + torch.einsum("bihjk,bihkc->bihjc", weights, v)
    return new_max, norm, acc


class TriangleAttentionStartingNode(TriangleAttention):
    """Around the starting node: row i attends along its own row (AF3 Algorithm 14)."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, inf: float = 1e9, *, grid: "ProcessGrid") -> None:
        super().__init__(c_in, c_hidden, no_heads, starting=True, inf=inf, grid=grid)


class TriangleAttentionEndingNode(TriangleAttention):
    """Around the ending node: column j attends along its own column (AF3 Algorithm 15)."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, inf: float = 1e9, *, grid: "ProcessGrid") -> None:
        super().__init__(c_in, c_hidden, no_heads, starting=False, inf=inf, grid=grid)
