"""Boltz-2's atom encoders and decoder (``encodersv2.AtomEncoder``, ``AtomAttentionEncoder``,
``AtomAttentionDecoder``) on the atom windows this rank owns.

The 1-D atom features are small (O(M)) and every rank has them whole (index form); each rank embeds only its
own atoms and the 48-atom halos its windows read. Atom-to-token maps are index vectors: per-atom token values
are gathers, per-token atom means are index segment sums plus a grid sum, and the diffusion conditioning's
pair term reads only the (query token, key token) entries its windows touch from the z tiles that hold them
(:func:`~foldcp_hpc.distributed.autograd.gather_pair_entries`). Nothing atoms x atoms or atoms x tokens is
ever built. Parameter names are Boltz's.

Letters: B batch (times samples), M atoms (own: m), W windows (own: w), Q queries per window, K keys per
window, N tokens, C channels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from ..distributed.atom_layout import AtomWindowLayout
from ..distributed.autograd import all_reduce, gather_pair_entries
from .atom_transformer import AtomTransformer, key_windows
from .common import repeat_samples

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

__all__ = ["AtomEncoder", "AtomAttentionEncoder", "AtomAttentionDecoder", "atom_layout", "atoms_of_span",
           "token_mean", "per_atom"]

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


def per_atom(values: Tensor, atom_to_token: Tensor) -> Tensor:
    """Each atom's token value, as Boltz's ``bmm(atom_to_token, values)``: zeros on padding atoms.

    values: [B, N, C] replicated; atom_to_token: [B, m] (-1 on padding atoms). returns [B, m, C].
    """
    index = atom_to_token.clamp(min=0)[..., None].expand(-1, -1, values.shape[-1])
    return values.gather(1, index) * (atom_to_token >= 0)[..., None].to(values.dtype)


def atom_counts(atom_to_token: Tensor, n_tokens: int) -> Tensor:
    """[B, N] atoms per token (padding atoms, -1, not counted)."""
    counts = torch.zeros(atom_to_token.shape[0], n_tokens, dtype=torch.long, device=atom_to_token.device)
    return counts.scatter_add_(1, atom_to_token.clamp(min=0), (atom_to_token >= 0).long())


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
    """Boltz-2's ``AtomEncoder`` on this rank's windows: atom features c and window pair features p.

    With ``structure_prediction`` (the diffusion conditioning's encoder) c is also conditioned on the trunk's
    s (a gather by atom_to_token) and p on the conditioned z at (query token, key token), read by index from
    the tiles that hold those entries.
    """

    def __init__(self, atom_s: int, atom_z: int, token_s: int, token_z: int, atoms_per_window_queries: int,
                 atoms_per_window_keys: int, atom_feature_dim: int, structure_prediction: bool = False,
                 use_no_atom_char: bool = False, use_atom_backbone_feat: bool = False,
                 use_residue_feats_atoms: bool = False) -> None:
        super().__init__()
        self.embed_atom_features = nn.Linear(atom_feature_dim, atom_s)
        self.embed_atompair_ref_pos = nn.Linear(3, atom_z, bias=False)
        self.embed_atompair_ref_dist = nn.Linear(1, atom_z, bias=False)
        self.embed_atompair_mask = nn.Linear(1, atom_z, bias=False)
        self.atoms_per_window_queries, self.atoms_per_window_keys = atoms_per_window_queries, atoms_per_window_keys
        self.use_no_atom_char = use_no_atom_char
        self.use_atom_backbone_feat = use_atom_backbone_feat
        self.use_residue_feats_atoms = use_residue_feats_atoms
        self.structure_prediction = structure_prediction
        if structure_prediction:
            self.s_to_c_trans = nn.Sequential(nn.LayerNorm(token_s), nn.Linear(token_s, atom_s, bias=False))
            self.z_to_p_trans = nn.Sequential(nn.LayerNorm(token_z), nn.Linear(token_z, atom_z, bias=False))
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
            parts.append(per_atom(res, span("atom_to_token").long()))
        return torch.cat(parts, dim=-1)

    def forward(self, atom: dict[str, Tensor], token: dict[str, Tensor], layout: AtomWindowLayout, rank: int,
                s_trunk: Optional[Tensor] = None, z: Optional[Tensor] = None,
                grid: Optional["ProcessGrid"] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """atom: 1-D atom features [B, M, ...] replicated, index form; token: 1-D token features [B, N, ...];
        with ``structure_prediction``: s_trunk [B, N, C_s] replicated and z [B, n, n, C_z] pair tile (row-block
        r, col-block c) of the conditioned pair representation, and the grid.

        returns q [B, m, atom_s] (the embedding), c [B, m, atom_s] (conditioned on s when structure_prediction)
        own atoms; p [B, w, Q, K, atom_z] own windows; key_mask [B, w, K].
        """
        a0, a1 = layout.atoms(rank)
        halo = layout.halo
        lo, hi = a0 - halo, a1 + halo
        batch, n_win, n_q = atom["ref_pos"].shape[0], (a1 - a0) // layout.queries, layout.queries
        dtype = self.embed_atom_features.weight.dtype
        inside = atoms_of_span(torch.ones_like(atom["atom_pad_mask"]), lo, hi)[..., None].to(dtype)
        # halo rows outside [0, M) must be zeros (as Boltz's key windows are), not embed(0) = bias
        q_span = self.embed_atom_features(self._features(atom, token, lo, hi)) * inside  # [B, m + 2 halo, C]
        to_token = atoms_of_span(atom["atom_to_token"].long() + 1, lo, hi) - 1  # -1 on padding and outside
        c_span = q_span
        if self.structure_prediction:
            c_span = q_span + per_atom(self.s_to_c_trans(s_trunk), to_token).to(q_span.dtype)
        own = slice(halo, halo + a1 - a0)

        pos = atoms_of_span(atom["ref_pos"], lo, hi).to(dtype)
        mask = atoms_of_span(atom["atom_pad_mask"], lo, hi).bool()
        uid = atoms_of_span(atom["ref_space_uid"], lo, hi).long()
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
        if self.structure_prediction:
            p = p + self._pair_term(z, to_token, own, layout, grid, s_trunk.shape[1]).to(p.dtype)
        c = c_span[:, own]
        width = c.shape[-1]  # explicit sizes: a rank with no window has zero-size tensors
        p = p + self.c_to_p_trans_q(c.view(batch, n_win, n_q, 1, width))
        p = p + self.c_to_p_trans_k(key_windows(c_span, layout).view(batch, n_win, 1, layout.keys, width))
        p = p + self.p_mlp(p)
        return q_span[:, own], c, p, mask_k.to(dtype)

    def _pair_term(self, z: Tensor, to_token: Tensor, own: slice, layout: AtomWindowLayout, grid: "ProcessGrid",
                   n_tokens: int) -> Tensor:
        """z_to_p(z)[token(query atom), token(key atom)] for every pair of the own windows, zeros where either
        atom is padding: Boltz's ``einsum("bijd,bwki,bwlj->bwkld", z_to_p(z), a2t_q, a2t_k)``, by index.

        The distinct (query token, key token) entries are read from the tiles holding them; the LayerNorm and
        projection are per entry, so they run after the read, on K entries instead of a tile.
        """
        batch = to_token.shape[0]
        tq = to_token[:, own].reshape(batch, (own.stop - own.start) // layout.queries, layout.queries)  # [B, w, Q]
        tk = key_windows(to_token, layout)  # [B, w, K]
        if batch != 1:
            raise ValueError(f"the diffusion conditioning takes one input at a time, got a batch of {batch}")
        valid = (tq[0][:, :, None] >= 0) & (tk[0][:, None, :] >= 0)  # [w, Q, K]
        keys = (tq[0][:, :, None].clamp(min=0) * n_tokens + tk[0][:, None, :].clamp(min=0))  # [w, Q, K]
        distinct, inverse = torch.unique(keys, return_inverse=True)
        entries = gather_pair_entries(z, grid, n_tokens, distinct // n_tokens, distinct % n_tokens)  # [1, E, C_z]
        projected = self.z_to_p_trans(entries)  # [1, E, atom_z]
        return projected[:, inverse] * valid[None, ..., None].to(projected.dtype)  # [1, w, Q, K, atom_z]


class AtomAttentionEncoder(nn.Module):
    """Boltz-2's ``AtomAttentionEncoder`` on this rank's windows: the atom transformer, then the per-token mean
    of relu(W q). With ``structure_prediction`` (the score model's) the queries also get the noisy coordinates
    r and the means are 2 C_s wide."""

    def __init__(self, atom_s: int, token_s: int, atoms_per_window_queries: int, atoms_per_window_keys: int,
                 atom_encoder_depth: int = 3, atom_encoder_heads: int = 4, structure_prediction: bool = False,
                 activation_checkpointing: bool = False, transformer_post_layer_norm: bool = False) -> None:
        super().__init__()
        self.structure_prediction = structure_prediction
        if structure_prediction:
            self.r_to_q_trans = nn.Linear(3, atom_s, bias=False)
        self.atom_encoder = AtomTransformer(atoms_per_window_queries, atoms_per_window_keys,
                                            depth=atom_encoder_depth, heads=atom_encoder_heads, dim=atom_s,
                                            dim_single_cond=atom_s, post_layer_norm=transformer_post_layer_norm)
        self.atom_to_token_trans = nn.Sequential(
            nn.Linear(atom_s, 2 * token_s if structure_prediction else token_s, bias=False), nn.ReLU())

    def forward(self, q: Tensor, c: Tensor, bias: Tensor, key_mask: Tensor, atom: dict[str, Tensor],
                n_tokens: int, grid: "ProcessGrid", layout: AtomWindowLayout, r: Optional[Tensor] = None,
                multiplicity: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """q, c: [B, m, atom_s] own atoms; bias: [B, w, Q, K, depth * heads]; key_mask: [B, w, K]; atom: the
        replicated 1-D atom features (``atom_to_token``); r: [B * mult, m, 3] own atoms' (scaled) noisy
        coordinates when ``structure_prediction``.

        returns (a [B * mult, N, C] replicated, q [B * mult, m, atom_s], c [B * mult, m, atom_s]) own atoms.
        """
        a0, a1 = layout.atoms(grid.axis("grid").index)
        if self.structure_prediction:
            q = repeat_samples(q, multiplicity) + self.r_to_q_trans(r)
        c = repeat_samples(c, multiplicity)
        q = self.atom_encoder(q, c, repeat_samples(bias, multiplicity), repeat_samples(key_mask, multiplicity), grid,
                              layout)
        to_token = atom["atom_to_token"].long()
        counts = repeat_samples(atom_counts(to_token, n_tokens), multiplicity)
        a = token_mean(self.atom_to_token_trans(q), repeat_samples(to_token[:, a0:a1], multiplicity), counts,
                       n_tokens, grid)
        return a, q, c


class AtomAttentionDecoder(nn.Module):
    """Boltz-2's ``AtomAttentionDecoder`` (AF3 Algorithm 6) on this rank's windows: token activations broadcast
    to their atoms by index, the atom transformer, then per-atom coordinate updates."""

    def __init__(self, atom_s: int, token_s: int, attn_window_queries: int, attn_window_keys: int,
                 atom_decoder_depth: int = 3, atom_decoder_heads: int = 4, activation_checkpointing: bool = False,
                 transformer_post_layer_norm: bool = False) -> None:
        super().__init__()
        self.a_to_q_trans = nn.Linear(2 * token_s, atom_s, bias=False)
        self.atom_decoder = AtomTransformer(attn_window_queries, attn_window_keys, depth=atom_decoder_depth,
                                            heads=atom_decoder_heads, dim=atom_s, dim_single_cond=atom_s,
                                            post_layer_norm=transformer_post_layer_norm)
        if transformer_post_layer_norm:
            self.atom_feat_to_atom_pos_update = nn.Linear(atom_s, 3, bias=False)
        else:
            self.atom_feat_to_atom_pos_update = nn.Sequential(nn.LayerNorm(atom_s), nn.Linear(atom_s, 3, bias=False))

    def forward(self, a: Tensor, q: Tensor, c: Tensor, bias: Tensor, key_mask: Tensor, atom: dict[str, Tensor],
                grid: "ProcessGrid", layout: AtomWindowLayout, multiplicity: int = 1) -> Tensor:
        """a: [B * mult, N, 2 C_s] replicated; q, c: [B * mult, m, atom_s] own atoms; bias: [B, w, Q, K,
        depth * heads]; key_mask: [B, w, K]. returns r_update [B * mult, m, 3] own atoms."""
        a0, a1 = layout.atoms(grid.axis("grid").index)
        to_token = repeat_samples(atom["atom_to_token"].long()[:, a0:a1], multiplicity)
        q = q + per_atom(self.a_to_q_trans(a), to_token).to(q.dtype)
        q = self.atom_decoder(q, c, repeat_samples(bias, multiplicity), repeat_samples(key_mask, multiplicity), grid,
                              layout)
        return self.atom_feat_to_atom_pos_update(q)
