"""Boltz-2's MSA module (``modules/trunkv2.MSAModule``) with the MSA sharded over the grid.

Rank (r, c) holds MSA rows block c of token block r (features from
:meth:`foldcp_hpc.data.features.Features.msa_block`) and the pair tile (r, c). Each layer: pair-weighted
averaging (MSA <- z), MSA transition (local), outer product mean (z <- MSA), then a PairformerNoSeq layer on
the tiles. No rank holds the whole [S, N, c_m] MSA. Parameter names are Boltz's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from .common import plus
from .outer_product_mean import OuterProductMean
from .pair_averaging import PairWeightedAveraging
from .pairformer import PairformerNoSeqLayer, tri_attn_chunk_size
from .transition import Transition

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

N_RESIDUE_TYPES = 33  # Boltz's const.num_tokens


class MSALayer(nn.Module):
    """One MSA block on the grid; Boltz's constructor arguments plus ``grid``."""

    def __init__(self, msa_s: int, token_z: int, msa_dropout: float, z_dropout: float,
                 pairwise_head_width: int = 32, pairwise_num_heads: int = 4, *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.msa_dropout = msa_dropout
        self.msa_transition = Transition(dim=msa_s, hidden=msa_s * 4)
        self.pair_weighted_averaging = PairWeightedAveraging(c_m=msa_s, c_z=token_z, c_h=32, num_heads=8, grid=grid)
        self.pairformer_layer = PairformerNoSeqLayer(token_z=token_z, dropout=z_dropout,
                                                     pairwise_head_width=pairwise_head_width,
                                                     pairwise_num_heads=pairwise_num_heads, grid=grid)
        self.outer_product_mean = OuterProductMean(c_in=msa_s, c_hidden=32, c_out=token_z, grid=grid)

    def forward(self, z: Tensor, m: Tensor, token_mask: Tensor, msa_mask: Tensor, chunk_size_tri_attn: Optional[int],
                n_tokens: int, n_rows: int, owned: bool = False) -> tuple[Tensor, Tensor]:
        """z: [B, N_i, N_j, C_z] pair tile; m: [B, S_c, N_r, c_m] MSA block; token_mask: [B, N_i, N_j] pair-mask
        tile; msa_mask: [B, S_c, N_r]. returns (z, m) placed as given.

        owned: z is the caller's to overwrite (a previous layer's output); without autograd the layer then works
        in its storage. Otherwise the caller's z stays as it was."""
        if self.training and self.msa_dropout > 0:
            # Boltz draws one keep/drop per MSA row ([B, S, 1, 1]); every rank draws all S and keeps its rows
            keep = (torch.rand((m.shape[0], n_rows, 1, 1), device=m.device) >= self.msa_dropout) / (1 - self.msa_dropout)
            block = self.grid.layout(n_rows).block(self.grid.col)
            keep = torch.nn.functional.pad(keep, (0, 0, 0, 0, 0, self.grid.layout(n_rows).n_pad))[:, block].to(m.dtype)
        else:
            keep = 1.0
        m = m + keep * self.pair_weighted_averaging(m, z, token_mask, n_tokens=n_tokens)
        m = m + self.msa_transition(m)
        update = self.outer_product_mean(m, msa_mask)
        if owned and not torch.is_grad_enabled() and update.dtype == z.dtype:
            z = z.add_(update)
        else:
            z = plus(z, update)  # the caller's z stays as it was
        del update  # not held through the Pairformer layer
        z = self.pairformer_layer(z, token_mask, chunk_size_tri_attn, n_tokens=n_tokens, inplace=True)
        return z, m


class MSAModule(nn.Module):
    """The MSA module on the grid; Boltz's constructor arguments plus ``grid``."""

    def __init__(self, msa_s: int, token_z: int, token_s: int, msa_blocks: int, msa_dropout: float,
                 z_dropout: float, pairwise_head_width: int = 32, pairwise_num_heads: int = 4,
                 activation_checkpointing: bool = False, use_paired_feature: bool = True,
                 subsample_msa: bool = False, num_subsampled_msa: int = 1024, *, grid: "ProcessGrid",
                 **kwargs) -> None:
        super().__init__()
        if subsample_msa:
            raise ValueError("MSA subsampling (off in boltz predict by default) is not supported on the grid")
        self.grid = grid
        self.msa_blocks = msa_blocks
        self.use_paired_feature = use_paired_feature
        self.s_proj = nn.Linear(token_s, msa_s, bias=False)
        self.msa_proj = nn.Linear(N_RESIDUE_TYPES + 2 + int(use_paired_feature), msa_s, bias=False)
        self.layers = nn.ModuleList(
            MSALayer(msa_s, token_z, msa_dropout, z_dropout, pairwise_head_width, pairwise_num_heads, grid=grid)
            for _ in range(msa_blocks))

    def forward(self, z: Tensor, emb: Tensor, msa: dict[str, Tensor], token_mask: Tensor, n_rows: int) -> Tensor:
        """z: [B, N_i, N_j, C_z] pair tile; emb: [B, N, C_s] replicated s_inputs; msa: this rank's MSA block,
        ``msa`` (token ids), ``has_deletion``, ``deletion_value``, ``msa_paired``, ``msa_mask``, each
        [B, S_c, N_r]; token_mask: [B, N_i, N_j] pair-mask tile; n_rows: S of the whole MSA.

        returns: [B, N_i, N_j, C_z] the updated pair tile.
        """
        grid = self.grid
        n_tokens = emb.shape[1]
        features = [torch.nn.functional.one_hot(msa["msa"].long(), N_RESIDUE_TYPES),
                    msa["has_deletion"].unsqueeze(-1), msa["deletion_value"].unsqueeze(-1)]
        if self.use_paired_feature:
            features.append(msa["msa_paired"].unsqueeze(-1))
        m = self.msa_proj(torch.cat(features, dim=-1).to(self.msa_proj.weight.dtype))
        rows = grid.layout(n_tokens).block(grid.row)
        s_rows = self.s_proj(emb)
        s_rows = torch.nn.functional.pad(s_rows, (0, 0, 0, grid.layout(n_tokens).n_pad))[:, rows]  # [B, N_r, c_m]
        m = m + s_rows.unsqueeze(1)
        chunk = tri_attn_chunk_size(n_tokens, self.training)
        for index, layer in enumerate(self.layers):  # the first layer leaves the caller's z as it was
            z, m = layer(z, m, token_mask, msa["msa_mask"].to(m.dtype), chunk, n_tokens, n_rows, owned=index > 0)
        return z
