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

import torch.nn.functional as F

from ..distributed import autograd as cp
from ..kernels import triangle_attention as flash
from ..kernels.norm_linear import norm_linear, norm_linear_ok
from .common import (PAD_BIAS, ChunkWriter, at_least_f32, autocast_low_dtype, block_is_padding, layer_norm,
                     refuse_autograd, ring, row_chunks, rows_within, inference_rows, wide_linear)

# The logits of one chunk of query rows stay within this fraction of the tile's size.
LOGITS_BUDGET = 0.125
# In place (inference): the normalised rows and their q, k, v, g projections stay within this fraction.
PROJECTION_BUDGET = 0.125

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid


def accumulates_in_float32(z: Tensor, low: torch.dtype | None, o: Tensor) -> bool:
    """Whether the output projection takes operands in the autocast dtype ``low`` and accumulates into float32 z
    in one GEMM (``torch.baddbmm(..., out_dtype=torch.float32)``, which PyTorch has on CUDA only)."""
    return z.is_cuda and z.dtype == torch.float32 and low in (torch.bfloat16, torch.float16) \
        and o.dtype in (low, torch.float32)


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


    # -- inference: the update added into z's own storage ------------------------------------------------------

    def add_update(self, z: Tensor, mask: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                   n_tokens: Optional[int] = None) -> Tensor:
        """``z + self(z, mask)`` written into z's storage (inference only: autograd must be off).

        z: [B, N_i, N_j, C] pair tile (row-block r, col-block c), overwritten and returned; mask: the same tile.
        No transposed or normalised copy of z is made: the starting node works on chunks of the tile's rows,
        the ending node on chunks of its columns (their keys travel round the grid column), and each chunk's
        update is added to z as soon as it is done (a chunk's update reads only its own rows or columns, and
        the triangle bias, made from all of z first). Beyond z a rank holds the bias (H/C of a tile, gathered
        over the axis) and one chunk's projections (within ``PROJECTION_BUDGET`` of a tile). On CUDA the
        attention is the flash kernel (:mod:`foldcp_hpc.kernels.triangle_attention`), so no logits are stored;
        elsewhere, and in float64, the ring of :meth:`_starting` with the logits of one chunk at a time.
        ``chunk_size`` bounds the rows (columns) of a chunk as Boltz's query chunk does.
        """
        refuse_autograd(self, z)
        grid = self.grid
        batch, n_i, n_j, c_in = z.shape
        n_tokens = grid.padding_for(n_i, n_tokens)
        if mask is None:
            mask = z.new_ones(z.shape[:-1])
        heads, width = self.no_heads, self.c_hidden
        tri_bias = self._bias_for_chunks(z)  # [B,H,Q,K_all]
        axis, first = ("row", grid.col) if self.starting else ("col", grid.row)
        padding = [block_is_padding(n_tokens, grid, block, z.device) for block in range(grid.p)]
        n_queries, n_keys = (n_j, n_j) if self.starting else (n_i, n_i)
        kernel = flash.kernels_available(z.device) and z.dtype != torch.float64
        per_line = batch * n_queries * (heads * width * 4 + 2 * c_in)
        if not kernel:  # the logits of a chunk, as in :meth:`_starting`
            per_line = max(per_line, batch * heads * n_queries * n_keys * 2)
        lines = inference_rows(PROJECTION_BUDGET, z.numel(), per_line, n_i if self.starting else n_j,
                               z.is_cuda)
        if chunk_size is not None and not kernel:
            lines = min(lines, chunk_size)
        fold_cache = {}  # the bias with the key mask folded in, made once per key block (see the kernel)
        mha = self.mha
        weight = torch.cat([mha.linear_q.weight, mha.linear_k.weight, mha.linear_v.weight, mha.linear_g.weight])
        low = autocast_low_dtype(z)
        if low is not None:  # rounded once, as autocast would round it for every chunk's Linear
            weight = weight.to(low)
        for sl in row_chunks(n_i if self.starting else n_j, lines):
            if self.starting:
                x = z[:, sl]  # [B,i,J,C]: row i's queries j and keys k (columns)
                key_mask = mask[:, sl]  # [B,i,K]
            else:
                x = z[:, :, sl].transpose(1, 2)  # [B,I,j,C] -> [B,j,I,C]: column j's queries and keys (rows)
                key_mask = mask[:, :, sl].transpose(1, 2)  # [B,I,j] -> [B,j,K]: keys k are rows of the column
            qkvg = self._norm_linear(x, weight)  # [B,l,Q,4HD]
            o = self._attend(qkvg, self.inf * (key_mask - 1), tri_bias, axis, first, padding, kernel, fold_cache)
            self._add_output(z, sl, o)
        return z

    def _norm_linear(self, x: Tensor, weight: Tensor, wide: bool = False) -> Tensor:
        """``LN(x) @ weight^T`` for rows x [..., C] (any strides): one kernel pass under autocast on CUDA
        (:func:`~foldcp_hpc.kernels.norm_linear.norm_linear`, the same roundings), the LayerNorm then the Linear
        otherwise. weight: [E, C]; wide: under autocast the float32 sums are returned unrounded (the triangle
        bias, which the flash kernel's fold shifts and rounds once); returns [..., E]."""
        low = autocast_low_dtype(x)
        if low is not None and norm_linear_ok(x):
            out = torch.empty(*x.shape[:-1], weight.shape[0], device=x.device, dtype=torch.float32) if wide \
                else None
            return norm_linear(x, self.layer_norm, weight.to(low).contiguous(), out=out)
        if wide:
            return wide_linear(layer_norm(self.layer_norm, x), weight)
        return F.linear(layer_norm(self.layer_norm, x), weight)

    def _add_output(self, z: Tensor, sl: slice, o: Tensor) -> None:
        """z's chunk += o W_o^T: rows ``sl`` (starting node) or columns ``sl`` (ending node).

        z: [B, N_i, N_j, C] pair tile; o: [B, l, Q, H*D] the chunk's gated attention output (l lines of Q).
        Where z, o and the weight (as autocast would round it) share a dtype, one batched GEMM per batch entry
        adds the product into z's storage (beta = 1: no update tensor, no separate add; the ending node's
        columns are a strided batch, one column per matrix). On CUDA with z in float32 under a bfloat16 or
        float16 autocast, the same GEMM takes the operands in the autocast dtype and accumulates into float32 z
        (``out_dtype``): Boltz's update is rounded to the autocast dtype before it is added, this one is not
        (at N = 4,096 on an H100, 9.6 and 10.0 ms against 11.8 and 13.8 ms for the product and the add).
        Otherwise the update is made and added.
        """
        linear = self.mha.linear_o
        low = torch.get_autocast_dtype(z.device.type) if torch.is_autocast_enabled(z.device.type) else None
        weight_dtype = low if low is not None else linear.weight.dtype
        widen = accumulates_in_float32(z, low, o)
        if not widen and not (z.dtype == weight_dtype and o.dtype in (z.dtype, torch.float32)):
            update = linear(o)
            if self.starting:
                z[:, sl] += update
            else:
                z[:, :, sl] += update.transpose(1, 2)  # [B,j,I,C] -> [B,I,j,C]
            return
        operands = low if widen else z.dtype
        weight_t = linear.weight.to(operands).t()  # [C_out, HD] -> [HD, C_out]
        o = o.to(operands)
        with torch.autocast(z.device.type, enabled=False):
            for b in range(z.shape[0]):
                if self.starting:
                    target = z[b, sl]  # [i, J, C], rows contiguous
                else:
                    target = z[b, :, sl].transpose(0, 1)  # [I, j, C] -> [j, I, C]: matrix j's rows stride N_j*C
                if widen:
                    torch.baddbmm(target, o[b], weight_t.expand(o.shape[1], -1, -1), out_dtype=torch.float32,
                                  out=target)
                else:
                    target.baddbmm_(o[b], weight_t.expand(o.shape[1], -1, -1))

    def _bias_for_chunks(self, z: Tensor) -> Tensor:
        """The triangle bias for :meth:`add_update`: [B, H, Q, K_all] with queries Q of this rank's chunks.

        starting: b[j, k] = w . LN(z)[j, k] for j in col-block c, every k (gathered along the grid column);
        ending: b[i, k] = w . LN(z)[k, i] for i in row-block r, every k (gathered along the grid row).
        """
        grid = self.grid
        lines = inference_rows(PROJECTION_BUDGET, z.numel(), z.shape[0] * z.shape[2] * z.shape[3] * 2, z.shape[1],
                               z.is_cuda)
        bias = ChunkWriter(dim=1, size=z.shape[1])
        for sl in row_chunks(z.shape[1], lines):
            bias.put(sl, self._norm_linear(z[:, sl], self.linear.weight, wide=True))
        bias = cp.transpose_tiles(bias.result(), grid)  # [B,I,J,H] of b -> tile of b^T
        if self.starting:
            bias = cp.all_gather(bias, grid, "col", dim=1)  # [B,K,J,H]: b^T[k, j] = b[j, k]
            return bias.permute(0, 3, 2, 1).contiguous()  # [B,K,J,H] -> [B,H,J,K]
        bias = cp.all_gather(bias, grid, "row", dim=2)  # [B,I,K,H]: b^T[i, k] = b[k, i]
        return bias.permute(0, 3, 1, 2).contiguous()  # [B,I,K,H] -> [B,H,I,K]

    def _attend(self, qkvg: Tensor, mask_bias: Tensor, tri_bias: Tensor, axis: str, first: int,
                padding: list, kernel: bool, fold_cache: dict | None = None) -> Tensor:
        """One chunk of lines (rows, or transposed columns) attending along themselves across the grid axis.

        qkvg: [B, l, Q, 4 H D] the lines' q, k, v and gate projections (of the normalised rows); mask_bias:
        [B, l, K_local] for this rank's keys; tri_bias: [B, H, Q, K_all]; the keys of block ``(first + t) % p``
        are here at ring step t; fold_cache: kept across the chunks of one attention for the kernel
        (:func:`~foldcp_hpc.kernels.triangle_attention.fold_key_mask`).
        returns: [B, l, Q, H*D] the gated attention output, before the output projection (:meth:`_add_output`).
        """
        grid = self.grid
        batch, lines, n_q, _ = qkvg.shape
        heads, width = self.no_heads, self.c_hidden
        n_k = mask_bias.shape[-1]
        q, k, v, g = qkvg.split(heads * width, dim=-1)  # 4 x [B,l,Q,H*D]
        scale = 1.0 / math.sqrt(width)
        gated = kernel and grid.p == 1  # the kernel sees all keys, so it applies the gate as it stores o
        if kernel:
            q = q.flatten(0, 1).unflatten(-1, (heads, width))  # [B,l,Q,HD] -> [R,Q,H,D]
            k = k.flatten(0, 1).unflatten(-1, (heads, width))
            v = v.flatten(0, 1).unflatten(-1, (heads, width))
            gate = g.flatten(0, 1).unflatten(-1, (heads, width)) if gated else None
            state = None
            keys = [k, v, mask_bias.flatten(0, 1)]
            for step, (k_t, v_t, mb_t) in enumerate(ring(keys, grid, axis, skew=0)):
                block = (first + step) % grid.p
                if padding[block] is not None:
                    mb_t = mb_t.masked_fill(padding[block], PAD_BIAS)
                bias_t = tri_bias[..., block * n_k:(block + 1) * n_k]
                o, lse = flash.flash_triangle_attention(q, k_t, v_t, bias_t, mb_t, scale, lines, gate=gate,
                                                        fold_cache=fold_cache)
                state = flash.merge_partial(state, o, lse) if grid.p > 1 else (o, lse)
            o = state[0].unflatten(0, (batch, lines)).flatten(-2)  # [R,Q,H,D] -> [B,l,Q,H*D]
        else:
            q = (q * scale).unflatten(-1, (heads, width)).permute(0, 1, 3, 2, 4)  # [B,l,Q,H,D] -> [B,l,H,Q,D]
            k = k.unflatten(-1, (heads, width)).permute(0, 1, 3, 2, 4).contiguous()
            v = v.unflatten(-1, (heads, width)).permute(0, 1, 3, 2, 4).contiguous()
            state = None
            for step, (k_t, v_t, mb_t) in enumerate(ring([k, v, mask_bias.contiguous()], grid, axis, skew=0)):
                block = (first + step) % grid.p
                logits = at_least_f32(torch.einsum("bihjc,bihkc->bihjk", q, k_t))
                logits.add_(mb_t[:, :, None, None, :]).add_(tri_bias[:, None, ..., block * n_k:(block + 1) * n_k])
                if padding[block] is not None:
                    logits.masked_fill_(padding[block], PAD_BIAS)
                state = _merge(state, logits, v_t)
            _, norm, acc = state
            o = acc.div_(norm).permute(0, 1, 3, 2, 4).flatten(-2)  # [B,l,H,Q,D] -> [B,l,Q,H*D]
        if not gated:
            o = o.to(g.dtype).mul_(g.sigmoid())
        return o


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
