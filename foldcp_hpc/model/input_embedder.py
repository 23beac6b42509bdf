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

from ..distributed.atom_layout import AtomWindowLayout
from ..distributed.autograd import all_reduce
from .atom_transformer import AtomTransformer, key_windows

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

__all__ = ["AtomEncoder", "AtomAttentionEncoder", "InputEmbedder", "atom_layout", "atoms_of_span",
           "token_mean"]

N_ELEMENTS = 128  # boltz.data.const.num_elements
N_NAME_CHARS = 64  # ref_atom_name_chars: 4 characters, one-hot over 64
N_TOKEN_TYPES = 33  # boltz.data.const.num_tokens
N_BACKBONE = 1 + 4 + 12  # 1 + len(protein_backbone_atom_index) + len(nucleic_backbone_atom_index)
N_CHAIN_TYPES = 4
N_METHODS = 12  # boltz.data.const.num_method_types


def atom_layout(n_atoms: int, grid: "ProcessGrid", queries: int = 32, keys: int = 128) -> AtomWindowLayout:
    """The window split of ``n_atoms`` (padded) atoms over this replica's grid."""
    return AtomWindowLayout(n_atoms, grid.axis("grid").size, queries, keys)


def atoms_of_span(values: Tensor, lo: int, hi: int) -> Tensor:
    """Atoms ``[lo, hi)`` of a replicated ``[B, M, ...]`` tensor; positions outside ``[0, M)`` are zeros."""
    n_atoms = values.shape[1]
    index = torch.arange(lo, hi, device=values.device)
    inside = (index >= 0) & (index < n_atoms)
    taken = values[:, index.clamp(0, max(0, n_atoms - 1))] if n_atoms else values.new_zeros(
        (values.shape[0], hi - lo) + values.shape[2:])
    shape = (1, hi - lo) + (1,) * (values.dim() - 2)
    return torch.where(inside.view(shape), taken, torch.zeros((), dtype=values.dtype, device=values.device))


def token_mean(values: Tensor, atom_to_token: Tensor, counts: Tensor, n_tokens: int, grid: "ProcessGrid") -> Tensor:
    """Per-token mean of atom values, as Boltz's ``bmm(atom_to_token / (n_atoms(t) + 1e-6), values)``.

    values: [B, m, C] own atoms; atom_to_token: [B, m] token of each own atom (-1 on padding atoms);
    counts: [B, N] atoms per token over the whole input. returns [B, N, C] replicated.

    forward: index segment sums of the own atoms, then a sum over the grid (tokens whose atoms straddle
    ranks get their partial sums combined); backward: the same sum of the gradients, then a gather by index.
    """
    batch, _, channels = values.shape
    weight = (1.0 / (counts.to(values.dtype) + 1e-6)).gather(1, atom_to_token.clamp(min=0))  # [B, m]
    weight = weight * (atom_to_token >= 0).to(values.dtype)
    target = atom_to_token.clamp(min=0)[..., None].expand(batch, -1, channels)
    partial = values.new_zeros(batch, n_tokens, channels).scatter_add(1, target, values * weight[..., None])
    return all_reduce(partial, grid, "grid")


class AtomEncoder(nn.Module):
    """Boltz-2's ``AtomEncoder`` (structure_prediction=False: the trunk's atom features and window pair
    features), on this rank's windows."""

    def __init__(self, atom_s: int, atom_z: int, token_s: int, token_z: int, atoms_per_window_queries: int,
                 atoms_per_window_keys: int, atom_feature_dim: int, structure_prediction: bool = False,
                 use_no_atom_char: bool = False, use_atom_backbone_feat: bool = False,
                 use_residue_feats_atoms: bool = False) -> None:
        super().__init__()
        if structure_prediction:
            raise ValueError("the trunk's AtomEncoder has structure_prediction=False; the diffusion module's "
                             "encoder is foldcp_hpc.model.diffusion's")
        self.embed_atom_features = nn.Linear(atom_feature_dim, atom_s)
        self.embed_atompair_ref_pos = nn.Linear(3, atom_z, bias=False)
        self.embed_atompair_ref_dist = nn.Linear(1, atom_z, bias=False)
        self.embed_atompair_mask = nn.Linear(1, atom_z, bias=False)
        self.atoms_per_window_queries, self.atoms_per_window_keys = atoms_per_window_queries, atoms_per_window_keys
        self.use_no_atom_char = use_no_atom_char
        self.use_atom_backbone_feat = use_atom_backbone_feat
        self.use_residue_feats_atoms = use_residue_feats_atoms
        self.c_to_p_trans_k = nn.Sequential(nn.ReLU(), nn.Linear(atom_s, atom_z, bias=False))
        self.c_to_p_trans_q = nn.Sequential(nn.ReLU(), nn.Linear(atom_s, atom_z, bias=False))
        self.p_mlp = nn.Sequential(nn.ReLU(), nn.Linear(atom_z, atom_z, bias=False), nn.ReLU(),
                                   nn.Linear(atom_z, atom_z, bias=False), nn.ReLU(),
                                   nn.Linear(atom_z, atom_z, bias=False))

    def _features(self, atom: dict[str, Tensor], token: dict[str, Tensor], lo: int, hi: int) -> Tensor:
        """The per-atom input features of atoms ``[lo, hi)`` ([B, hi - lo, atom_feature_dim]), zeros outside."""
        dtype = self.embed_atom_features.weight.dtype
        one_hot = nn.functional.one_hot
        span = lambda key: atoms_of_span(atom[key], lo, hi)  # noqa: E731
        # one-hot rows of padding atoms are all zeros in Boltz's dense features (index 0 here)
        real = span("atom_pad_mask").to(dtype)[..., None]
        parts = [span("ref_pos").to(dtype), span("ref_charge").to(dtype)[..., None],
                 one_hot(span("ref_element").long(), N_ELEMENTS).to(dtype) * real]
        if not self.use_no_atom_char:
            chars = one_hot(span("ref_atom_name_chars").long(), N_NAME_CHARS).to(dtype) * real[..., None]
            parts.append(chars.flatten(-2))  # [B,m,4,64] -> [B,m,256]
        if self.use_atom_backbone_feat:
            parts.append(one_hot(span("atom_backbone_feat").long(), N_BACKBONE).to(dtype) * real)
        if self.use_residue_feats_atoms:
            res = torch.cat([token["res_type"].to(dtype), token["modified"].to(dtype)[..., None],
                             one_hot(token["mol_type"].long(), N_CHAIN_TYPES).to(dtype)], dim=-1)  # [B, N, 38]
            to_token = span("atom_to_token").long()  # -1 on padding atoms
            picked = res.gather(1, to_token.clamp(min=0)[..., None].expand(-1, -1, res.shape[-1]))
            parts.append(picked * (to_token >= 0)[..., None].to(dtype))
        return torch.cat(parts, dim=-1)

    def forward(self, atom: dict[str, Tensor], token: dict[str, Tensor], layout: AtomWindowLayout,
                rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """atom: 1-D atom features [B, M, ...] replicated, index form; token: 1-D token features [B, N, ...].

        returns q, c [B, m, atom_s] own atoms; p [B, w, Q, K, atom_z] own windows; key_mask [B, w, K].
        """
        a0, a1 = layout.atoms(rank)
        lo, hi = a0 - layout.halo, a1 + layout.halo
        batch, n_win, n_q = atom["ref_pos"].shape[0], (a1 - a0) // layout.queries, layout.queries
        dtype = self.embed_atom_features.weight.dtype
        inside = atoms_of_span(torch.ones_like(atom["atom_pad_mask"]), lo, hi)[..., None].to(dtype)
        # halo rows outside [0, M) must be zeros (as Boltz's key windows are), not embed(0) = bias
        c_span = self.embed_atom_features(self._features(atom, token, lo, hi)) * inside  # [B, m + 2 halo, C]
        c = c_span[:, layout.halo:layout.halo + a1 - a0]

        pos = atoms_of_span(atom["ref_pos"], lo, hi).to(dtype)
        mask = atoms_of_span(atom["atom_pad_mask"], lo, hi).bool()
        uid = atoms_of_span(atom["ref_space_uid"], lo, hi).long()
        own = slice(layout.halo, layout.halo + a1 - a0)
        pos_q = pos[:, own].view(batch, n_win, n_q, 1, 3)
        pos_k = key_windows(pos, layout).view(batch, n_win, 1, layout.keys, 3)
        d = pos_k - pos_q  # [B, w, Q, K, 3]
        d_norm = 1 / (1 + torch.sum(d * d, dim=-1, keepdim=True))
        mask_k = key_windows(mask, layout)  # [B, w, K]
        same = (mask[:, own].view(batch, n_win, n_q, 1) & mask_k[:, :, None, :]
                & (uid[:, own].view(batch, n_win, n_q, 1) == key_windows(uid, layout)[:, :, None, :]))
        v = same.to(dtype)[..., None]  # [B, w, Q, K, 1]
        p = self.embed_atompair_ref_pos(d) * v
        p = p + self.embed_atompair_ref_dist(d_norm) * v
        p = p + self.embed_atompair_mask(v) * v
        p = p + self.c_to_p_trans_q(c.view(batch, n_win, n_q, 1, -1))
        p = p + self.c_to_p_trans_k(key_windows(c_span, layout).view(batch, n_win, 1, layout.keys, -1))
        p = p + self.p_mlp(p)
        return c, c, p, mask_k.to(dtype)


class AtomAttentionEncoder(nn.Module):
    """Boltz-2's ``AtomAttentionEncoder`` for the trunk (structure_prediction=False): the atom transformer on
    this rank's windows, then the per-token mean of relu(W q)."""

    def __init__(self, atom_s: int, token_s: int, atoms_per_window_queries: int, atoms_per_window_keys: int,
                 atom_encoder_depth: int = 3, atom_encoder_heads: int = 4, structure_prediction: bool = False,
                 activation_checkpointing: bool = False, transformer_post_layer_norm: bool = False) -> None:
        super().__init__()
        if structure_prediction:
            raise ValueError("the trunk's AtomAttentionEncoder has structure_prediction=False")
        self.atom_encoder = AtomTransformer(atoms_per_window_queries, atoms_per_window_keys,
                                            depth=atom_encoder_depth, heads=atom_encoder_heads, dim=atom_s,
                                            dim_single_cond=atom_s, post_layer_norm=transformer_post_layer_norm)
        self.atom_to_token_trans = nn.Sequential(nn.Linear(atom_s, token_s, bias=False), nn.ReLU())

    def forward(self, q: Tensor, c: Tensor, bias: Tensor, key_mask: Tensor, atom_to_token: Tensor,
                counts: Tensor, n_tokens: int, grid: "ProcessGrid", layout: AtomWindowLayout) -> Tensor:
        """q, c: [B, m, atom_s] own atoms; bias: [B, w, Q, K, depth * heads]; key_mask: [B, w, K];
        atom_to_token: [B, m] own atoms' tokens (-1 on padding); counts: [B, N] atoms per token.

        returns a: [B, N, token_s] replicated.
        """
        q = self.atom_encoder(q, c, bias, key_mask, grid, layout)
        return token_mean(self.atom_to_token_trans(q), atom_to_token, counts, n_tokens, grid)


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

    def forward(self, token: dict[str, Tensor], atom: dict[str, Tensor]) -> Tensor:
        """token: 1-D token features [B, N, ...] (``res_type`` one-hot, ``profile``, ``deletion_mean``, ...);
        atom: 1-D atom features [B, M, ...] in index form (``atom_to_token`` [B, M], -1 on padding atoms).

        returns s_inputs: [B, N, token_s] replicated.
        """
        grid = self.grid
        n_tokens, n_atoms = token["res_type"].shape[1], atom["ref_pos"].shape[1]
        layout = atom_layout(n_atoms, grid, self.queries, self.keys)
        rank = grid.axis("grid").index
        q, c, p, key_mask = self.atom_encoder(atom, token, layout, rank)
        bias = self.atom_enc_proj_z(p)  # [B, w, Q, K, depth * heads]
        a0, a1 = layout.atoms(rank)
        to_token = atom["atom_to_token"].long()
        counts = torch.zeros(to_token.shape[0], n_tokens, dtype=torch.long, device=to_token.device)
        counts.scatter_add_(1, to_token.clamp(min=0), (to_token >= 0).long())
        a = self.atom_attention_encoder(q, c, bias, key_mask, to_token[:, a0:a1], counts, n_tokens, grid, layout)

        dtype = self.res_type_encoding.weight.dtype
        s = a + self.res_type_encoding(token["res_type"].to(dtype))
        s = s + self.msa_profile_encoding(torch.cat([token["profile"].to(dtype),
                                                     token["deletion_mean"].to(dtype)[..., None]], dim=-1))
        if self.add_method_conditioning:
            s = s + self.method_conditioning_init(token["method_feature"].long())
        if self.add_modified_flag:
            s = s + self.modified_conditioning_init(token["modified"].long())
        if self.add_cyclic_flag:
            s = s + self.cyclic_conditioning_init(token["cyclic_period"].clamp(max=1.0).to(dtype)[..., None])
        if self.add_mol_type_feat:
            s = s + self.mol_type_conditioning_init(token["mol_type"].long())
        return s
