"""Triangle self-attention on pair tiles (AF3 Algorithms 14 and 15; Boltz's ``layers/triangular_attention``).

Starting node: query (i, j) attends over keys (i, k) of the same row i, with bias b[j, k] and Boltz's mask
bias 1e9 (mask[i, k] - 1):

    o[i, j] = sum_k softmax_k(q[i, j] . k[i, k] / sqrt(c) + mask_bias[i, k] + b[j, k]) v[i, k]

On rank (r, c) the queries of the tile stay put. They are processed in chunks of rows i; for each chunk, the
keys, values and key mask of those rows travel round grid row r (p steps, the next step's transfer in flight
during this step's work), and each step updates an online (log-sum-exp) softmax. The bias b[j, k] for this
tile's columns j and all keys k is gathered once per layer along grid column c after one tile transpose
(H / C_in of a tile per grid row). Chunks are as large as keeps the logits within an eighth of a tile, and never
larger than Boltz's ``chunk_size``. Ending node: the same on the tile-transposed pair tensor. Padded keys are
removed exactly (see ``common.PAD_BIAS``), so padded runs equal unpadded ones.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from ..distributed import autograd as cp
from .common import at_least_f32, PAD_BIAS, ChunkWriter, block_is_padding, ring, row_chunks, rows_within

# The logits of one chunk of query rows stay within this fraction of the tile's size.
LOGITS_BUDGET = 0.125

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
        n_tokens: the true N; padded keys are then removed exactly. Default: the N recorded by the grid's
            ``scatter_pair``; without either, padding counts as masked, which changes nothing at unmasked
            positions.
        returns: [B, N_i, N_j, C] update of the same tile.
        """
        grid = self.grid
        n_tokens = grid.padding_for(x.shape[1], n_tokens)
        if mask is None:
            mask = x.new_ones(x.shape[:-1])
        if self.starting:
            return self._starting(x, mask, chunk_size, n_tokens)
        # ending node: the starting node on the transposed tiles (passed on unbound, so that the transposed
        # input is freed as soon as it is normalised)
        out = self._starting(cp.transpose_tiles(x, grid), cp.transpose_tiles(mask, grid), chunk_size, n_tokens)
        return cp.transpose_tiles(out, grid)

    def _starting(self, x: Tensor, mask: Tensor, chunk_size: Optional[int], n_tokens: Optional[int]) -> Tensor:
        grid, mha = self.grid, self.mha
        batch, n_i, n_j, _ = x.shape
        heads, width = self.no_heads, self.c_hidden
        x = self.layer_norm(x)
        mask_bias = self.inf * (mask - 1)  # [B,I,K]

        # The triangle bias b[j, k] for every k: this tile's columns j along the whole key range. b^T's tiles
        # in grid column c hold b[j in block c, k in block r']: gather them along the column (H/C_in of a
        # tile per grid row: p/32 of a tile for Boltz's sizes).
        tri_bias = cp.transpose_tiles(self.linear(x), grid)  # [B,K_r,J_c,H] of b^T
        tri_bias = cp.all_gather(tri_bias, grid, "col", dim=1)  # [B,K,J,H], K over all blocks
        tri_bias = tri_bias.permute(0, 3, 2, 1).contiguous()  # [B,K,J,H] -> [B,H,J,K]
        n_k = n_j
        padding = [block_is_padding(n_tokens, grid, block, x.device) for block in range(grid.p)]

        # Query rows in chunks; each chunk's keys, values and key mask travel round the grid row.
        budget = LOGITS_BUDGET * n_i * n_j * self.c_in  # logits of a chunk stay within a fraction of a tile
        rows = rows_within(budget, batch * heads * n_j * n_k, n_i)
        if chunk_size is not None:
            rows = min(rows, chunk_size)
        out = ChunkWriter(dim=1, size=n_i)
        for sl in row_chunks(n_i, rows):
            x_rows = x[:, sl]
            ci = x_rows.shape[1]
            q = (mha.linear_q(x_rows) / math.sqrt(width)).view(batch, ci, n_j, heads, width)
            k = mha.linear_k(x_rows).view(batch, ci, n_k, heads, width)
            v = mha.linear_v(x_rows).view(batch, ci, n_k, heads, width)
            q = q.permute(0, 1, 3, 2, 4).contiguous()  # [B,i,J,H,C] -> [B,i,H,J,C]
            k = k.permute(0, 1, 3, 2, 4).contiguous()  # [B,i,K,H,C] -> [B,i,H,K,C]
            v = v.permute(0, 1, 3, 2, 4).contiguous()
            state = None
            for step, (k_t, v_t, mb_t) in enumerate(ring([k, v, mask_bias[:, sl].contiguous()], grid, "row", skew=0)):
                block = (grid.col + step) % grid.p  # keys of block c + t are here now
                # logits [B,i,H,J,K]: q.k, then the mask bias, then the triangle bias (Boltz's order)
                # float32 from here (under bfloat16 autocast the product is bfloat16): the online softmax's
                # statistics and sums must not round at every ring step (Boltz's softmax runs in float32)
                logits = at_least_f32(torch.einsum("bihjc,bihkc->bihjk", q, k_t))
                bias_t = tri_bias[..., block * n_k:(block + 1) * n_k]
                if logits.requires_grad:
                    logits = logits + mb_t[:, :, None, None, :]
                    logits = logits + bias_t[:, None]
                    if padding[block] is not None:
                        logits = logits.masked_fill(padding[block], PAD_BIAS)
                else:
                    logits.add_(mb_t[:, :, None, None, :]).add_(bias_t[:, None])
                    if padding[block] is not None:
                        logits.masked_fill_(padding[block], PAD_BIAS)
                state = _merge(state, logits, v_t)
            _, norm, acc = state
            o = acc / norm if acc.requires_grad else acc.div_(norm)  # [B,i,H,J,C]
            o = o.permute(0, 1, 3, 2, 4)  # [B,i,H,J,C] -> [B,i,J,H,C]
            gate = mha.sigmoid(mha.linear_g(x_rows)).view(batch, ci, n_j, heads, width)
            o = o * gate
            out.put(sl, mha.linear_o(o.reshape(batch, ci, n_j, heads * width)))
        return out.result()


def _merge(state: tuple[Tensor, Tensor, Tensor] | None, logits: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One online-softmax step. logits: [B,i,H,J,K]; v: [B,i,H,K,C]; state: (max, sum, weighted values).

    The running max only stabilises the exponentials; the result does not depend on it, so it carries no
    gradient. Without autograd the logits become the weights in place.
    """
    block_max = logits.detach().amax(dim=-1, keepdim=True)  # [B,i,H,J,1]
    new_max = block_max if state is None else torch.maximum(state[0], block_max)
    if logits.requires_grad:
        weights = torch.exp(logits - new_max)
    else:
        weights = logits.sub_(new_max).exp_()
    block_sum = weights.sum(-1, keepdim=True)
    block_acc = at_least_f32(torch.einsum("bihjk,bihkc->bihjc", weights, v))  # accumulated in float32
    if state is None:
        return new_max, block_sum, block_acc
    run_max, norm, acc = state
    scale = torch.exp(run_max - new_max)
    if block_acc.requires_grad or acc.requires_grad:
        return new_max, norm * scale + block_sum, acc * scale + block_acc
    return new_max, norm.mul_(scale).add_(block_sum), acc.mul_(scale).add_(block_acc)


class TriangleAttentionStartingNode(TriangleAttention):
    """Around the starting node: row i attends along its own row (AF3 Algorithm 14)."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, inf: float = 1e9, *, grid: "ProcessGrid") -> None:
        super().__init__(c_in, c_hidden, no_heads, starting=True, inf=inf, grid=grid)


class TriangleAttentionEndingNode(TriangleAttention):
    """Around the ending node: column j attends along its own column (AF3 Algorithm 15)."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, inf: float = 1e9, *, grid: "ProcessGrid") -> None:
        super().__init__(c_in, c_hidden, no_heads, starting=False, inf=inf, grid=grid)
