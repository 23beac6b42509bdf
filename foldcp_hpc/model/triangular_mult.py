"""Triangle multiplicative update on pair tiles (AF3 Algorithms 12 and 13; Boltz's ``layers/triangular_mult.py``).

Outgoing: out[i, j] = sum_k a[i, k] b[j, k]; incoming: out[i, j] = sum_k a[k, i] b[k, j]. On the grid the
contraction over k is a Cannon ring (:func:`tile_matmul`) after one tile transpose of the operand whose k
index runs along the wrong axis.

Precision: like Boltz, the contraction of a float32 tile runs in float32 with autocast off (float64 stays
float64, for the parity tests). A tile stored in bfloat16 or float16 contracts in its own dtype: a and b stay
in that dtype and the GEMM (which accumulates in float32 inside) writes the product in it, halving the
product's memory and running at the low-precision GEMM rate. In inference under autocast
(:meth:`~_TriangleMultiplication.add_update`) a float32 tile's a and b are bfloat16 values already, and the
product, summed in float32, is stored rounded once to bfloat16 for the output's LayerNorm: [D, N, N] in bfloat16
is half a float32 tile, so the layer holds z and about 3/4 of a tile more instead of 5/4 (a device peak of 15.2
GiB instead of ~19 GiB at N = 4,096 on one H100), for a layer error of 3.69e-3 instead of 3.60e-3
(cuEquivariance's: 4.43e-3; docs/performance.md).

Memory: the channels are contracted in ``CHANNEL_GROUPS`` groups (each group's a and b are projected,
gated, masked and sent round the ring on their own), and the output gating runs in row chunks, so besides
its input and output tiles a rank holds about one more tile, where Boltz holds the four [N, N, 2D]
projections at once. Without autograd, :meth:`~_TriangleMultiplication.add_update` adds the update into z
itself: z, the product tile and about 1/8 of a tile more (one rank; see its docstring).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import autograd as cp
from ..distributed.matmul import cannon_matmul, tile_matmul, widening_bmm
from ..kernels.gating import gate_product
from ..kernels.norm_gate import norm_gate, norm_gate_ok
from .common import (ChunkWriter, autocast_low_dtype, inference_rows, layer_norm, refuse_autograd, row_chunks,
                     wide_linear)

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

CHANNEL_GROUPS = 8  # the D channels are contracted in this many groups, one Cannon ring each
OUTPUT_ROW_FRACTION = 4  # the output gating runs on 1/4 of the tile's rows at a time
# add_update: one group's a and b together are 2/4 of a tile (in z's dtype); its row chunks are 1/16 of the
# tile's rows (a chunk's four projections: 2/16 of a tile).
INPLACE_CHANNEL_GROUPS = 4
INPLACE_ROW_FRACTION = 16
LOW_PRECISION = (torch.bfloat16, torch.float16)


def contraction_dtype(z_dtype: torch.dtype) -> torch.dtype:
    """dtype of the operands a, b and of the product for a tile stored in ``z_dtype``: bfloat16 and float16 keep
    their own (the fast path), float64 stays float64, anything else contracts in float32 as Boltz does."""
    if z_dtype in LOW_PRECISION or z_dtype == torch.float64:
        return z_dtype
    return torch.float32


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
        dim, dtype = self.dim, contraction_dtype(x.dtype)
        x_in = self.norm_in(x)
        mask = mask.unsqueeze(-1)

        # Triangular projection, per group of channels d: a tiled matrix product over k
        product = ChunkWriter(dim=3, size=dim)
        for group in row_chunks(dim, -(-dim // CHANNEL_GROUPS)):
            a = self._gated_input(x_in, group, mask, dtype)  # [B,I,K,g]
            b = self._gated_input(x_in, slice(dim + group.start, dim + group.stop), mask, dtype)
            a = a.permute(0, 3, 1, 2)  # [B,I,K,g] -> [B,g,I,K]
            b = b.permute(0, 3, 1, 2)  # [B,J,K,g] -> [B,g,J,K] (outgoing) / [B,K,J,g] -> [B,g,K,J] (incoming)
            product.put(group, self._contract(a, b).permute(0, 2, 3, 1))  # [B,g,I,J] -> [B,I,J,g]
        x = product.result()

        # Output gating, in row chunks
        out = ChunkWriter(dim=1, size=x.shape[1], into=x)
        for rows in row_chunks(x.shape[1], -(-x.shape[1] // OUTPUT_ROW_FRACTION)):
            gate = self.g_out(x_in[:, rows]).sigmoid()
            update = self.p_out(self.norm_out(x[:, rows]))
            out.put(rows, update * gate if update.requires_grad else update.mul_(gate))
        return out.result()

    def add_update(self, z: Tensor, mask: Tensor) -> Tensor:
        """``z + self(z, mask)`` computed into z's storage, for inference: z is overwritten and returned.

        z: [B, N_i, N_j, D] pair tile (row-block r, col-block c); mask: [B, N_i, N_j] same tile.
        returns: z, now holding z + update.

        Raises ValueError when autograd is on and z or a parameter requires grad (no graph could be kept).
        Memory besides z: the product [D, B, N_i, N_j] in :func:`contraction_dtype`, or in autocast's dtype for a
        float32 z under autocast (one bfloat16 tile either way; see the module docstring),
        one channel group's a and b (2 / ``INPLACE_CHANNEL_GROUPS`` of a tile) and the row chunks' projections
        (a 1 / ``INPLACE_ROW_FRACTION`` of the rows at a time). ``norm_in`` runs once per group and row chunk
        and all four projections of a group (a, b and their gates) are one GEMM. On one rank the product GEMM
        writes straight into the product; on a p x p grid the Cannon ring's copies add about 6/16 of a tile.
        Under autocast where Triton runs (CUDA), a group's operands and then the output gate are one fused kernel
        pass each over z (:mod:`~foldcp_hpc.kernels.norm_gate`): no row chunks and no float32 projections in
        memory, the same arithmetic.
        """
        refuse_autograd(self, z)
        dim, dtype = self.dim, contraction_dtype(z.dtype)
        per_row = z[:, :1].numel() * 4 // INPLACE_CHANNEL_GROUPS  # a chunk's four projections of a group
        chunks = row_chunks(z.shape[1], inference_rows(4 / INPLACE_CHANNEL_GROUPS / INPLACE_ROW_FRACTION, z.numel(),
                                                       per_row, z.shape[1], z.is_cuda))

        # Triangular projection into product[d] = [B,I,J] for the channels d of each group. Under autocast a
        # float32 tile's operands are bfloat16 values already (the projections ran under autocast; Boltz's
        # ``.float()`` widens them exactly), so they stay in bfloat16 (and travel the Cannon ring so) and the
        # GEMM accumulates and writes float32 (tensor cores on CUDA): Boltz's float32 product, summed in
        # another order.
        low = autocast_low_dtype(z)
        operand = low if dtype == torch.float32 and low is not None else dtype
        # the product summed in `dtype` (float32 for a float32 z), stored in the operands' dtype
        product = z.new_empty((dim, *z.shape[:3]), dtype=operand)
        # on a grid each group's Cannon ring holds skewed, in-flight and result copies: smaller groups there
        groups = INPLACE_CHANNEL_GROUPS if self.grid.p == 1 else 4 * INPLACE_CHANNEL_GROUPS
        fused = (low is not None and z.is_contiguous() and operand == low
                 and norm_gate_ok(z, dim))
        for group in row_chunks(dim, -(-dim // groups)):
            # (no name holds a group's operands: they are freed before the next group's are made)
            self._contract(*(self._fused_operands(z, mask, group, low) if fused
                             else self._operands(z, mask, group, chunks, operand)), out=product[group],
                           sum_dtype=dtype)

        if fused:  # z += p_out(LN_out(product)) * sigmoid(g_out(LN_in(z))): one pass over z and the product
            rows = z.view(-1, dim)  # [B*I*J, D]
            norm_gate(product.view(dim, -1).t(), self.norm_out, self.p_out.weight.to(low).contiguous(),
                      self.g_out.weight.to(low).contiguous(), out=rows, x_g=rows, norm_g=self.norm_in,
                      accumulate=True)  # [D,B,I,J] read as rows [B*I*J, D] (channel-first strides)
            return z

        # Output gating, in row chunks; each chunk's gate reads z's rows before the update is added to them
        # (under autocast both GEMMs return float32: gate, product and update are not rounded to bfloat16)
        for rows in chunks:
            gate = wide_linear(layer_norm(self.norm_in, z[:, rows]), self.g_out.weight)
            # [D,B,i,J] -> [B,i,J,D]: normalised from the channel-first product (the kernel reads any strides)
            update = wide_linear(layer_norm(self.norm_out, product[:, :, rows].permute(1, 2, 3, 0)), self.p_out.weight)
            if autocast_low_dtype(z) is None:
                z[:, rows].add_(update.mul_(gate.sigmoid_()))
            else:  # z += update * sigmoid(gate) in one pass, nothing rounded to bfloat16
                gate_product(update, gate, "sigmoid", out=z[:, rows], accumulate=True)
        return z

    def _fused_operands(self, z: Tensor, mask: Tensor, group: slice, low: torch.dtype) -> tuple[Tensor, Tensor]:
        """:meth:`_operands` in one kernel pass over z (:func:`~foldcp_hpc.kernels.norm_gate.norm_gate`): the
        LayerNorm, the four projections, the gates and the mask, a and b written channel-first in ``low``."""
        width = group.stop - group.start
        other = slice(self.dim + group.start, self.dim + group.stop)
        value = torch.cat([self.p_in.weight[group], self.p_in.weight[other]]).to(low)  # [2g, D]: a then b
        gate = torch.cat([self.g_in.weight[group], self.g_in.weight[other]]).to(low)
        ab = z.new_empty((2 * width, z[..., 0].numel()), dtype=low)  # [2g, B*I*J]
        norm_gate(z.view(-1, self.dim), self.norm_in, value, gate, out=ab, mask=mask.reshape(-1),
                  out_rows_first=False)
        return ab[:width].view(width, *z.shape[:3]), ab[width:].view(width, *z.shape[:3])  # [g, B, I, J] each

    def _operands(self, z: Tensor, mask: Tensor, group: slice, chunks: list[slice], dtype: torch.dtype
                  ) -> tuple[Tensor, Tensor]:
        """a and b of one channel group, [g, B, N_i, N_j] in ``dtype``, built in row chunks of z.

        The four projections (a, b, their gates) of a chunk are one GEMM that writes them channel-first
        (W @ x^T), so no transposing copy is needed to lay a and b out for the batched product."""
        width = group.stop - group.start
        shape = (width, *z.shape[:3])
        a, b = z.new_empty(shape, dtype=dtype), z.new_empty(shape, dtype=dtype)
        other = slice(self.dim + group.start, self.dim + group.stop)
        weight = torch.cat([self.p_in.weight[group], self.p_in.weight[other],
                            self.g_in.weight[group], self.g_in.weight[other]])  # [4g, D]: a, b and their gates
        low = autocast_low_dtype(z)
        for rows in chunks:
            x = layer_norm(self.norm_in, z[:, rows])  # [B,i,J,D]
            if low is None:
                projected = torch.matmul(weight, x.reshape(-1, x.shape[-1]).t())  # [4g, B*i*J]
                gated = projected[:2 * width].mul_(projected[2 * width:].sigmoid_())  # [2g, B*i*J]
                gated.mul_(mask[:, rows].reshape(1, -1).to(gated.dtype))
            else:  # float32 GEMM output: the gate, the product and the mask in float32, rounded once
                with torch.autocast(z.device.type, enabled=False):
                    projected = widening_bmm(weight.to(low)[None], x.reshape(-1, x.shape[-1]).t().to(low)[None],
                                             torch.float32)[0]
                gated = projected.new_empty(2 * width, projected.shape[1], dtype=dtype)
                gate_product(projected[:2 * width], projected[2 * width:], "sigmoid", out=gated,
                             mask=mask[:, rows].reshape(-1))
            a[:, :, rows] = gated[:width].view(width, *x.shape[:3])  # [g, B, i, J]
            b[:, :, rows] = gated[width:].view(width, *x.shape[:3])
        return a, b

    def _contract(self, a: Tensor, b: Tensor, out: Tensor | None = None,
                  sum_dtype: torch.dtype | None = None) -> Tensor:
        """Tile of the triangle product over k for one channel group, in the operands' dtype with autocast off.

        a, b: [B, g, N_i, N_j] or [g, B, N_i, N_j] tiles of a[i, k], b[j, k] (outgoing) or a[k, i], b[k, j]
        (incoming). returns: the same leading dims and [N_i, N_j], written into ``out`` if given. sum_dtype: the
        dtype the sum over k is accumulated in before it is rounded once into ``out`` (default: out's; on a grid
        the Cannon ring's partial sums stay in it across the ring's steps).
        """
        grid = self.grid
        if self.outgoing:  # einsum "bikd,bjkd->bijd" = A @ B^T
            a, b = a.contiguous(), cp.transpose_tiles(b, grid, dims=(2, 3))
        else:  # einsum "bkid,bkjd->bijd" = A^T @ B
            a, b = cp.transpose_tiles(a, grid, dims=(2, 3)), b.contiguous()
        with torch.autocast(a.device.type, enabled=False):  # as Boltz's float32 einsum, on one rank too
            if out is None:
                return tile_matmul(a, b, grid)
            if grid.p == 1:  # the GEMM writes into ``out`` (contiguous): no result buffer of its own
                # (low-precision operands: float32 accumulation inside the GEMM, one rounding to out's dtype)
                widening_bmm(a.flatten(0, 1), b.flatten(0, 1), out.dtype, out=out.view(-1, *out.shape[-2:]))
                return out
            return out.copy_(cannon_matmul(a, b, grid, out_dtype=sum_dtype or out.dtype))

    def _gated_input(self, x: Tensor, channels: slice, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """Input gating for ``channels`` of the 2D projections: p_in(x) * sigmoid(g_in(x)) * mask, in ``dtype``."""
        projected = F.linear(x, self.p_in.weight[channels])
        gate = F.linear(x, self.g_in.weight[channels])
        if projected.requires_grad:
            return (projected * gate.sigmoid() * mask).to(dtype)
        return projected.mul_(gate.sigmoid_()).mul_(mask).to(dtype)


class TriangleMultiplicationOutgoing(_TriangleMultiplication):
    """Outgoing edges: out[i, j] = sum_k a[i, k] b[j, k] (AF3 Algorithm 12)."""

    outgoing = True


class TriangleMultiplicationIncoming(_TriangleMultiplication):
    """Incoming edges: out[i, j] = sum_k a[k, i] b[k, j] (AF3 Algorithm 13)."""

    outgoing = False
