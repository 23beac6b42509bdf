"""Boltz-2's diffusion conditioning (``modules/diffusion_conditioning.DiffusionConditioning``) on the grid.

Computed once per input, before sampling, and kept for the whole sampling run:

    z_cond = PairwiseConditioning(z_trunk, relative positions)          pair tile, row chunks
    q, c, p = AtomEncoder(structure_prediction)(atoms, s_trunk, z_cond)  own windows (z_cond read by index)
    atom_enc_bias, atom_dec_bias = per-layer LayerNorm + Linear of p    own windows
    token_trans_bias = per-layer LayerNorm + Linear of z_cond            pair tile [B, n, n, depth x heads]

Parameter names are Boltz's (``diffusion_conditioning.*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

import torch
from torch import Tensor, nn

from ..distributed.atom_layout import AtomWindowLayout
from .atom_encoder import AtomEncoder, atom_layout
from .common import ChunkWriter, chunk_rows, row_chunks
from .transition import Transition

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

__all__ = ["PairwiseConditioning", "DiffusionConditioning", "Conditioning"]

CHUNK_BUDGET = 0.5  # row chunks keep the widest per-pair intermediate within this fraction of the tile

RelativePositions = Union[Tensor, Callable[[slice], Tensor]]


def _rows(rel: RelativePositions, sl: slice) -> Tensor:
    return rel(sl) if callable(rel) else rel[:, sl]


class PairwiseConditioning(nn.Module):
    """AF3 Algorithm 21 (pair part): LayerNorm + Linear of [z, relative positions], then residual transitions."""

    def __init__(self, token_z: int, dim_token_rel_pos_feats: int, num_transitions: int = 2,
                 transition_expansion_factor: int = 2) -> None:
        super().__init__()
        width = token_z + dim_token_rel_pos_feats
        self.dim_pairwise_init_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, token_z, bias=False))
        self.transitions = nn.ModuleList(
            [Transition(dim=token_z, hidden=transition_expansion_factor * token_z) for _ in range(num_transitions)])

    def forward(self, z: Tensor, rel: RelativePositions) -> Tensor:
        """z: [B, n, n, C_z] pair tile; rel: the relative-position encoding of the same tile [B, n, n, C_r], or
        a function giving its rows ``sl`` (so that it need not be held whole). returns [B, n, n, C_z]."""
        n = z.shape[1]
        rows = chunk_rows(CHUNK_BUDGET, z.numel(), 2 * z[:, :1].numel(), n, z.is_cuda)
        writer = ChunkWriter(dim=1, size=n)
        for sl in row_chunks(n, rows):
            writer.put(sl, self.dim_pairwise_init_proj(torch.cat([z[:, sl], _rows(rel, sl).to(z.dtype)], dim=-1)))
        z = writer.result()
        for transition in self.transitions:
            update = transition(z)
            z = z + update if (z.requires_grad or update.requires_grad) else z.add_(update)
        return z


@dataclass
class Conditioning:
    """What the score model reads at every sampler step.

    q, c: [B, m, atom_s] own atoms; atom_enc_bias / atom_dec_bias: [B, w, Q, K, depth x heads] own windows;
    key_mask: [B, w, K]; token_trans_bias: [B, n, n, depth x heads] pair tile; layout: the atom windows.
    """

    q: Tensor
    c: Tensor
    atom_enc_bias: Tensor
    atom_dec_bias: Tensor
    key_mask: Tensor
    token_trans_bias: Tensor
    layout: AtomWindowLayout


class DiffusionConditioning(nn.Module):
    """Boltz-2's ``DiffusionConditioning`` on tiles and atom windows (same constructor arguments plus ``grid``)."""

    def __init__(self, token_s: int, token_z: int, atom_s: int, atom_z: int, atoms_per_window_queries: int = 32,
                 atoms_per_window_keys: int = 128, atom_encoder_depth: int = 3, atom_encoder_heads: int = 4,
                 token_transformer_depth: int = 24, token_transformer_heads: int = 8, atom_decoder_depth: int = 3,
                 atom_decoder_heads: int = 4, atom_feature_dim: int = 128, conditioning_transition_layers: int = 2,
                 use_no_atom_char: bool = False, use_atom_backbone_feat: bool = False,
                 use_residue_feats_atoms: bool = False, *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.queries, self.keys = atoms_per_window_queries, atoms_per_window_keys
        self.pairwise_conditioner = PairwiseConditioning(token_z, token_z, conditioning_transition_layers)
        self.atom_encoder = AtomEncoder(atom_s, atom_z, token_s, token_z, atoms_per_window_queries,
                                        atoms_per_window_keys, atom_feature_dim, structure_prediction=True,
                                        use_no_atom_char=use_no_atom_char,
                                        use_atom_backbone_feat=use_atom_backbone_feat,
                                        use_residue_feats_atoms=use_residue_feats_atoms)

        def projections(depth: int, width: int, heads: int) -> nn.ModuleList:
            return nn.ModuleList([nn.Sequential(nn.LayerNorm(width), nn.Linear(width, heads, bias=False))
                                  for _ in range(depth)])

        self.atom_enc_proj_z = projections(atom_encoder_depth, atom_z, atom_encoder_heads)
        self.atom_dec_proj_z = projections(atom_decoder_depth, atom_z, atom_decoder_heads)
        self.token_trans_proj_z = projections(token_transformer_depth, token_z, token_transformer_heads)

    def forward(self, s_trunk: Tensor, z_trunk: Tensor, rel: RelativePositions, token: dict[str, Tensor],
                atom: dict[str, Tensor]) -> Conditioning:
        """s_trunk: [B, N, C_s] replicated; z_trunk: [B, n, n, C_z] pair tile; rel: the relative-position
        encoding of the same tile (or a function of the rows, see :class:`PairwiseConditioning`); token / atom:
        the replicated 1-D features (atoms in index form)."""
        grid = self.grid
        z = self.pairwise_conditioner(z_trunk, rel)
        layout = atom_layout(atom["ref_pos"].shape[1], grid, self.queries, self.keys)
        q, c, p, key_mask = self.atom_encoder(atom, token, layout, grid.axis("grid").index, s_trunk=s_trunk,
                                              z=z, grid=grid)
        atom_enc_bias = torch.cat([proj(p) for proj in self.atom_enc_proj_z], dim=-1)
        atom_dec_bias = torch.cat([proj(p) for proj in self.atom_dec_proj_z], dim=-1)
        return Conditioning(q, c, atom_enc_bias, atom_dec_bias, key_mask, self._token_bias(z), layout)

    def _token_bias(self, z: Tensor) -> Tensor:
        """[B, n, n, depth x heads]: layer l's heads at channels [l heads, (l + 1) heads), as Boltz concatenates.
        Without autograd a heads-first tensor viewed channel-last (strides [W n n, n, 1, n n])."""
        n = z.shape[1]
        heads = self.token_trans_proj_z[0][1].out_features
        width = heads * len(self.token_trans_proj_z)
        rows = chunk_rows(CHUNK_BUDGET, z.numel(), z[:, :1].numel() + z.shape[0] * n * width, n,
                          z.is_cuda)
        parts, out = [], None
        for sl in row_chunks(n, rows):
            chunk = torch.cat([proj(z[:, sl]) for proj in self.token_trans_proj_z], dim=-1)  # [B, rows, n, L H]
            if chunk.requires_grad:
                parts.append(chunk)
                continue
            if out is None:
                # stored heads-first, viewed channel-last: each layer's [B, H, n, n] bias is one dense block that
                # the token transformer's attention reads in place, every sampler step
                out = chunk.new_empty(z.shape[0], width, n, n).permute(0, 2, 3, 1)  # [B,W,I,J] -> [B,I,J,W]
            out[:, sl] = chunk
        return torch.cat(parts, dim=1) if out is None else out
