"""Boltz-2's input embedder (``trunkv2.InputEmbedder``) with the atoms split by windows over the grid.

    c = embed(atom features)                         own atoms, plus the halo atoms' (from replicated features)
    p[w, q, k] = pair features of (query atom, key atom) within each window       own windows
    q = atom transformer(c, bias = proj(p))                 own atoms; halo exchange per layer
    a[t] = sum over t's atoms of relu(W q) / (n_atoms(t) + 1e-6)   index segment sums, then a sum over the grid
    s_inputs = a + res_type + profile terms + conditioning          replicated [B, N, C_s]

The 1-D atom features are small (O(M)) and every rank has them whole (:class:`~foldcp_hpc.data.features.
Features` ``atom``, index form); each rank embeds only its own atoms and the 48-atom halos its windows read,
so nothing atoms x atoms or atoms x tokens exists anywhere: atom-to-token maps are index vectors.
Parameter names are Boltz's, so ``input_embedder.*`` of a Boltz-2 checkpoint loads strictly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .atom_encoder import N_CHAIN_TYPES, N_METHODS, N_TOKEN_TYPES, AtomAttentionEncoder, AtomEncoder, atom_layout

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

__all__ = ["InputEmbedder"]


class InputEmbedder(nn.Module):
    """Boltz-2's ``InputEmbedder`` on the grid: s_inputs [B, N, token_s], replicated on every rank."""

    def __init__(self, atom_s: int, atom_z: int, token_s: int, token_z: int, atoms_per_window_queries: int,
                 atoms_per_window_keys: int, atom_feature_dim: int, atom_encoder_depth: int,
                 atom_encoder_heads: int, activation_checkpointing: bool = False,
                 add_method_conditioning: bool = False, add_modified_flag: bool = False,
                 add_cyclic_flag: bool = False, add_mol_type_feat: bool = False, use_no_atom_char: bool = False,
                 use_atom_backbone_feat: bool = False, use_residue_feats_atoms: bool = False, *,
                 grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.token_s = token_s
        self.add_method_conditioning, self.add_modified_flag = add_method_conditioning, add_modified_flag
        self.add_cyclic_flag, self.add_mol_type_feat = add_cyclic_flag, add_mol_type_feat
        self.queries, self.keys = atoms_per_window_queries, atoms_per_window_keys
        self.atom_encoder = AtomEncoder(atom_s, atom_z, token_s, token_z, atoms_per_window_queries,
                                        atoms_per_window_keys, atom_feature_dim, use_no_atom_char=use_no_atom_char,
                                        use_atom_backbone_feat=use_atom_backbone_feat,
                                        use_residue_feats_atoms=use_residue_feats_atoms)
        self.atom_enc_proj_z = nn.Sequential(nn.LayerNorm(atom_z),
                                             nn.Linear(atom_z, atom_encoder_depth * atom_encoder_heads, bias=False))
        self.atom_attention_encoder = AtomAttentionEncoder(atom_s, token_s, atoms_per_window_queries,
                                                           atoms_per_window_keys, atom_encoder_depth,
                                                           atom_encoder_heads)
        self.res_type_encoding = nn.Linear(N_TOKEN_TYPES, token_s, bias=False)
        self.msa_profile_encoding = nn.Linear(N_TOKEN_TYPES + 1, token_s, bias=False)
        if add_method_conditioning:
            self.method_conditioning_init = nn.Embedding(N_METHODS, token_s)
            nn.init.zeros_(self.method_conditioning_init.weight)
        if add_modified_flag:
            self.modified_conditioning_init = nn.Embedding(2, token_s)
            nn.init.zeros_(self.modified_conditioning_init.weight)
        if add_cyclic_flag:
            self.cyclic_conditioning_init = nn.Linear(1, token_s, bias=False)
            nn.init.zeros_(self.cyclic_conditioning_init.weight)
        if add_mol_type_feat:
            self.mol_type_conditioning_init = nn.Embedding(N_CHAIN_TYPES, token_s)
            nn.init.zeros_(self.mol_type_conditioning_init.weight)

    def forward(self, token: dict[str, Tensor], atom: dict[str, Tensor], affinity: bool = False) -> Tensor:
        """token: 1-D token features [B, N, ...] (``res_type`` one-hot, ``profile``, ``deletion_mean``, ...);
        atom: 1-D atom features [B, M, ...] in index form (``atom_to_token`` [B, M], -1 on padding atoms);
        affinity: read ``profile_affinity`` / ``deletion_mean_affinity`` (the query sequence only), as Boltz's
        embedder does for the affinity module.

        returns s_inputs: [B, N, token_s] replicated.
        """
        grid = self.grid
        n_tokens, n_atoms = token["res_type"].shape[1], atom["ref_pos"].shape[1]
        layout = atom_layout(n_atoms, grid, self.queries, self.keys)
        rank = grid.axis("grid").index
        q, c, p, key_mask = self.atom_encoder(atom, token, layout, rank)
        bias = self.atom_enc_proj_z(p)  # [B, w, Q, K, depth * heads]
        a, _, _ = self.atom_attention_encoder(q, c, bias, key_mask, atom, n_tokens, grid, layout)

        dtype = self.res_type_encoding.weight.dtype
        s = a + self.res_type_encoding(token["res_type"].to(dtype))
        suffix = "_affinity" if affinity else ""
        s = s + self.msa_profile_encoding(torch.cat([token["profile" + suffix].to(dtype),
                                                     token["deletion_mean" + suffix].to(dtype)[..., None]], dim=-1))
        if self.add_method_conditioning:
            s = s + self.method_conditioning_init(token["method_feature"].long())
        if self.add_modified_flag:
            s = s + self.modified_conditioning_init(token["modified"].long())
        if self.add_cyclic_flag:
            s = s + self.cyclic_conditioning_init(token["cyclic_period"].clamp(max=1.0).to(dtype)[..., None])
        if self.add_mol_type_feat:
            s = s + self.mol_type_conditioning_init(token["mol_type"].long())
        return s
