"""Single-track attention with pair bias (Boltz-2's ``layers/attentionv2.AttentionPairBias``) on pair tiles.

s is replicated on every rank. Rank (r, c) scores the queries of token block r against the keys of block
c with the pair bias of its own tile, keeps partial softmax statistics (max, sum, weighted values), and
combines them along grid row r; the finished query blocks are then gathered along the grid columns, so
every rank ends with the same full output. Padded keys are removed exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from ..distributed import autograd as cp
from ..distributed import collectives as raw
from ..kernels import triangle_attention as flash
from ..kernels.norm_linear import norm_linear, norm_linear_ok
from .common import (PAD_BIAS, ChunkWriter, at_least_f32, autocast_low_dtype, block_is_padding, layer_norm,
                     per_token, repeat_samples, row_chunks, rows_within)

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid


class _ToHeadsFirst(nn.Module):
    """``b ... h -> b h ...`` (stands where Boltz has an einops Rearrange; no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.movedim(-1, 1)


class AttentionPairBias(nn.Module):
    """Attention of s over itself with a bias projected from the pair tiles; parameters named as in Boltz."""

    def __init__(self, c_s: int, c_z: Optional[int] = None, num_heads: Optional[int] = None, inf: float = 1e6,
                 compute_pair_bias: bool = True, *, grid: "ProcessGrid") -> None:
        super().__init__()
        if num_heads is None or c_s % num_heads:
            raise ValueError(f"c_s={c_s} must be a multiple of num_heads={num_heads}")
        self.grid = grid
        self.c_s = c_s
        self.num_heads = num_heads
        self.head_dim = c_s // num_heads
        self.inf = inf
        self.proj_q = nn.Linear(c_s, c_s)
        self.proj_k = nn.Linear(c_s, c_s, bias=False)
        self.proj_v = nn.Linear(c_s, c_s, bias=False)
        self.proj_g = nn.Linear(c_s, c_s, bias=False)
        self.compute_pair_bias = compute_pair_bias
        if compute_pair_bias:
            self.proj_z = nn.Sequential(nn.LayerNorm(c_z), nn.Linear(c_z, num_heads, bias=False), _ToHeadsFirst())
        else:
            self.proj_z = _ToHeadsFirst()
        self.proj_o = nn.Linear(c_s, c_s, bias=False)

    def forward(self, s: Tensor, z: Tensor, mask: Tensor, k_in: Tensor, multiplicity: int = 1) -> Tensor:
        """s, k_in: [B, N, C_s] replicated; z: [B, N_i, N_j, C_z] pair tile (row-block r, col-block c)
        (or a precomputed bias tile [B, N_i, N_j, H] when ``compute_pair_bias`` is False);
        mask: [B, N] replicated key mask. returns: [B, N, C_s] replicated.
        """
        grid = self.grid
        n_tokens = s.shape[1]
        # projections of the own blocks only (row block r for queries, column block c for keys and values)
        o = self.row_attention(cp.scatter_tokens(s, grid, by="row"), cp.scatter_tokens(k_in, grid, by="col"), z,
                               cp.scatter_tokens(at_least_f32(mask), grid, by="col"), n_tokens, multiplicity)
        o = cp.gather_tokens(o, grid, n_tokens, by="row")  # [B,N,C] replicated
        return per_token(lambda s_, o_: self.proj_o(self.proj_g(s_).sigmoid() * o_), grid, s, o)

    def _pair_bias(self, z: Tensor) -> Tensor:
        """proj_z of the tile in float32 as Boltz computes it (``z.float()``): without autograd in one kernel
        pass over z's rows (:func:`~foldcp_hpc.kernels.norm_linear.norm_linear`), otherwise a few rows at a time,
        so that a low-precision z is never copied whole to float32. z: [B, N_i, N_j, C]; returns [B, H, N_i, N_j].
        A precomputed bias tile (``compute_pair_bias`` False, C = H) is only moved heads-first: a view when it is
        float32, one float32 copy when it is not (the copy Boltz's ``.float()`` makes)."""
        if not self.compute_pair_bias:
            return self.proj_z(at_least_f32(z))  # [B,I,J,H] -> [B,H,I,J]
        norm, linear, heads_first = self.proj_z
        dtype = autocast_low_dtype(z) or linear.weight.dtype  # the Linear's operands (float32: Boltz's layer)
        if dtype != torch.float64 and z.dtype != torch.float64 and not torch.is_grad_enabled() \
                and norm_linear_ok(z):
            # one pass: z's rows normalised and projected straight into the heads-first bias, in the dtype the
            # Linear returns (no float32 copy of z, no normalised rows, no move to heads-first)
            weight = linear.weight.to(dtype).contiguous()
            bias = z.new_empty(z.shape[0], self.num_heads, *z.shape[1:3], dtype=dtype)  # [B,H,I,J]
            for b in range(z.shape[0]):
                norm_linear(z[b], norm, weight, out=bias[b].permute(1, 2, 0))  # [H,I,J] -> [I,J,H] view
            return bias
        rows = rows_within(z.numel() / 8, z[:, :1].numel(), z.shape[1])
        bias = ChunkWriter(dim=2, size=z.shape[1])
        for sl in row_chunks(z.shape[1], rows):
            # layer_norm: the Triton kernel without autograd on CUDA (PyTorch's gives each 128-channel row a block)
            bias.put(sl, heads_first(linear(layer_norm(norm, at_least_f32(z[:, sl])))))
        return bias.result()

    def row_attention(self, s_rows: Tensor, k_cols: Tensor, z: Tensor, key_mask: Tensor, n_tokens: int,
                      multiplicity: int = 1) -> Tensor:
        """The attention of token block r over all keys, before the output gate and projection.

        s_rows: [B, n, C_s] token block r; k_cols: [B, n, C_s] token block c; z: pair tile (or bias tile);
        key_mask: [B, n] mask of block c. returns o: [B, n, C_s] for block r, the same on every rank of row r
        (partial softmaxes over each tile's keys combined along the grid row).
        """
        grid = self.grid
        batch = s_rows.shape[0]
        heads, width = self.num_heads, self.head_dim
        q = self.proj_q(s_rows).view(batch, -1, heads, width)  # [B,I,H,D] block r
        k = self.proj_k(k_cols).view(batch, -1, heads, width)  # [B,J,H,D] block c
        v = self.proj_v(k_cols).view(batch, -1, heads, width)
        if self._use_kernel(q, k, v, z):
            return self._kernel_attention(q, k, v, z, key_mask, n_tokens, multiplicity).reshape(batch, -1, self.c_s)
        bias = repeat_samples(self._pair_bias(z), multiplicity)  # [B,H,I,J]
        with torch.autocast("cuda", enabled=False):
            logits = torch.einsum("bihd,bjhd->bhij", at_least_f32(q), at_least_f32(k))
            logits = logits / (width**0.5) + at_least_f32(bias)
            logits = logits + (1 - at_least_f32(key_mask)[:, None, None]) * -self.inf
            padding = block_is_padding(n_tokens, grid, grid.col, s_rows.device)
            if padding is not None:
                logits = logits.masked_fill(padding, PAD_BIAS)
            # partial softmax over this tile's keys, combined along the grid row
            row_max = raw.all_reduce(logits.detach().amax(dim=-1, keepdim=True), grid, "row", op="max")
            weights = torch.exp(logits - row_max)  # [B,H,I,J]
            norm = cp.all_reduce(weights.sum(dim=-1), grid, "row")  # [B,H,I]
            acc = cp.all_reduce(torch.einsum("bhij,bjhd->bihd", weights, at_least_f32(v)), grid, "row")
            o = (acc / norm.permute(0, 2, 1)[..., None]).to(v.dtype)  # [B,I,H,D] block r
        return o.reshape(batch, -1, self.c_s)

    def _use_kernel(self, q: Tensor, k: Tensor, v: Tensor, z: Tensor) -> bool:
        """Whether :meth:`row_attention` runs the flash kernel: forward only (no tensor needs a gradient), not in
        float64 (the parity tests' exact path), where the ``FOLDCP_TRITON`` switch allows it."""
        if q.dtype == torch.float64 or z.dtype == torch.float64:
            return False
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or z.requires_grad):
            return False
        return flash.kernels_available(q.device)

    def _kernel_attention(self, q: Tensor, k: Tensor, v: Tensor, z: Tensor, key_mask: Tensor, n_tokens: int,
                          multiplicity: int) -> Tensor:
        """:meth:`row_attention`'s softmax and weighted values in the flash kernel: no [H, I, J] logits are stored,
        and the weights reach the values with ~16 bits (``exact_weights``), so that bfloat16 q, k, v give Boltz's
        float32 result up to summation order. A precomputed bias tile is read in place (any dtype and strides).

        q: [B m, I, H, D] block r; k, v: [B m, J, H, D] block c; z: the pair or bias tile; key_mask: [B m, J].
        returns o: [B m, I, H, D] block r in v's dtype, the grid row's partial softmaxes combined.
        """
        grid = self.grid
        if self.compute_pair_bias:
            bias = self._pair_bias(z)  # [B,H,I,J] float32, made a few rows at a time
        else:
            bias = z.movedim(-1, 1)  # [B,I,J,H] -> [B,H,I,J], a view
        mask_bias = (1 - at_least_f32(key_mask)) * -self.inf  # [B m, J]
        padding = block_is_padding(n_tokens, grid, grid.col, q.device)
        if padding is not None:
            mask_bias = mask_bias.masked_fill(padding, PAD_BIAS)
        partial = grid.p > 1
        o, lse = flash.flash_triangle_attention(
            q, k, v, bias, mask_bias, self.head_dim**-0.5, multiplicity, exact_weights=True,
            out_dtype=torch.float32 if partial else v.dtype)
        if not partial:
            return o
        # the row's partial softmaxes: o = sum_c exp(lse_c - lse) o_c over the grid row
        row_max = raw.all_reduce(lse, grid, "row", op="max")  # [B m,H,I]
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        weight = torch.exp(lse - row_max)
        norm = raw.all_reduce(weight, grid, "row")
        acc = raw.all_reduce(o * weight.transpose(1, 2)[..., None], grid, "row")  # [B m,I,H,D]
        return (acc / norm.transpose(1, 2)[..., None]).to(v.dtype)
