"""Boltz-2's template module (``modules/trunkv2.TemplateV2Module``) on pair tiles.

Per template t: v_t = z_proj(z_norm(z)) + a_proj(a_t), where a_t is the tile of template pair features
(:func:`foldcp_hpc.data.features.template_pair_tile`, built from 1-D template features); v_t goes through a
PairformerNoSeq stack on the grid, is normalised, averaged over the templates present and projected back:
u = u_proj(relu(mean_t v_t)). With no template present u is exactly 0, as in Boltz, and the module is
skipped. Parameter names are Boltz's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from ..data.features import template_pair_tile
from .pairformer import PairformerNoSeqModule

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

N_RESIDUE_TYPES = 33  # Boltz's const.num_tokens


class TemplateV2Module(nn.Module):
    """Template embedding on tiles; same constructor arguments as Boltz's plus ``grid``."""

    def __init__(self, token_z: int, template_dim: int, template_blocks: int, dropout: float = 0.25,
                 pairwise_head_width: int = 32, pairwise_num_heads: int = 4, post_layer_norm: bool = False,
                 activation_checkpointing: bool = False, min_dist: float = 3.25, max_dist: float = 50.75,
                 num_bins: int = 38, *, grid: "ProcessGrid", **kwargs) -> None:
        super().__init__()
        self.grid = grid
        self.min_dist, self.max_dist, self.num_bins = min_dist, max_dist, num_bins
        self.relu = nn.ReLU()
        self.z_norm = nn.LayerNorm(token_z)
        self.v_norm = nn.LayerNorm(template_dim)
        self.z_proj = nn.Linear(token_z, template_dim, bias=False)
        self.a_proj = nn.Linear(N_RESIDUE_TYPES * 2 + num_bins + 5, template_dim, bias=False)
        self.u_proj = nn.Linear(template_dim, token_z, bias=False)
        self.pairformer = PairformerNoSeqModule(template_dim, num_blocks=template_blocks, dropout=dropout,
                                                pairwise_head_width=pairwise_head_width,
                                                pairwise_num_heads=pairwise_num_heads,
                                                post_layer_norm=post_layer_norm,
                                                activation_checkpointing=activation_checkpointing, grid=grid)

    @staticmethod
    def has_templates(template: dict[str, Tensor]) -> bool:
        """Whether any template of ``template`` is present (without one, the module's update is exactly 0)."""
        return bool(template["template_mask"].any())

    def forward(self, z: Tensor, template: dict[str, Tensor], pair_mask: Tensor,
                n_tokens: Optional[int] = None) -> Tensor:
        """z: [1, N_i, N_j, C_z] pair tile (row-block r, col-block c); template: Boltz's template features
        ``[T, N, ...]`` (one input, replicated); pair_mask: [1, N_i, N_j] tile.

        returns: [1, N_i, N_j, C_z] the template update of the tile (exactly 0 without templates).
        """
        present = template["template_mask"].any(dim=1).to(z.dtype)  # [T]
        if not bool(present.any()):
            if torch.is_grad_enabled() and z.requires_grad:  # keep Boltz's (zero) gradient path to u_proj
                return self.u_proj(self.relu(z.new_zeros(*z.shape[:-1], self.u_proj.in_features)))
            return torch.zeros_like(z)
        grid = self.grid
        n_templates = int(present.shape[0])
        a = template_pair_tile(template, grid.p, grid.row, grid.col, self.min_dist, self.max_dist, self.num_bins)
        v = self.z_proj(self.z_norm(z)) + self.a_proj(a.to(z.dtype))  # [1,I,J,D] + [T,I,J,D] -> [T,I,J,D]
        v = v + self.pairformer(v, pair_mask.expand(n_templates, -1, -1), n_tokens=n_tokens)
        v = self.v_norm(v)
        u = (v * present[:, None, None, None]).sum(dim=0, keepdim=True) / present.sum().clamp(min=1)
        return self.u_proj(self.relu(u))
