"""Pair initialisation on tiles: Boltz-2's z_init (``models/boltz2.py`` forward, before recycling).

    z_init[i, j] = z_init_1(s_inputs)[i] + z_init_2(s_inputs)[j] + rel_pos(i, j) + token_bonds(bonds[i, j])
                   + token_bonds_type(type[i, j]) + contact_conditioning(class[i, j], threshold[i, j])

Every term is a function of the row token's and the column token's 1-D features (and of the per-tile pair
features from :meth:`foldcp_hpc.data.features.Features.pair_tile`), so rank (r, c) builds its tile alone, in
row chunks. Submodule and parameter names are Boltz-2's top-level ones, so the matching slice of a Boltz-2
state dict loads strictly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from ..distributed.layout import TileLayout
from .common import ChunkWriter, chunk_rows, row_chunks

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

N_CONTACT_CLASSES = 5  # Boltz's contact_conditioning_info: UNSPECIFIED, UNSELECTED, POCKET>BINDER, BINDER>POCKET, CONTACT
N_BOND_TYPES = 6  # Boltz's const.bond_types
# rows per chunk: the widest per-pair intermediate (one-hot relative positions, 139 wide) stays within this
# fraction of the tile
CHUNK_BUDGET = 0.5

__all__ = ["PairInitializer", "RelativePositionEncoder", "ContactConditioning", "FourierEmbedding"]


def _block(values: Tensor, layout: TileLayout, index: int, dim: int = 1) -> Tensor:
    """Token block ``index`` of a replicated ``[B, N, ...]`` tensor, zero-padded to ``n_local``."""
    block = layout.block(index)
    out = values.narrow(dim, min(block.start, values.shape[dim]), max(0, min(block.stop, values.shape[dim]) - block.start))
    missing = layout.n_local - out.shape[dim]
    if missing:
        shape = list(out.shape)
        shape[dim] = missing
        out = torch.cat([out, out.new_zeros(shape)], dim=dim)
    return out


RELPOS_KEYS = ("asym_id", "residue_index", "entity_id", "token_index", "sym_id", "cyclic_period")


def tile_tokens(token: dict[str, Tensor], grid: "ProcessGrid", n_tokens: int) -> tuple[dict, dict, bool]:
    """The 1-D token features the relative positions read, for this tile's rows and columns, and whether any
    token of the input is cyclic (a global switch in Boltz)."""
    layout = grid.layout(n_tokens)
    rows = {k: _block(token[k], layout, grid.row) for k in RELPOS_KEYS}
    cols = {k: _block(token[k], layout, grid.col) for k in RELPOS_KEYS}
    return rows, cols, bool(torch.any(token["cyclic_period"] > 0))


def pair_feature_rows(module: nn.Module, rows: dict, cols: dict, any_cyclic: bool, pair: dict[str, Tensor],
                      sl: slice, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rows ``sl`` of the tile's pair-feature terms: relative positions + bonds (+ bond types) + contact
    conditioning, with ``module``'s Boltz-named submodules (``rel_pos``, ``token_bonds``, ``token_bonds_type``
    when ``module.bond_type_feature``, ``contact_conditioning``). returns (sum [B, rows, n, C_z], rel part)."""
    rel = module.rel_pos({k: v[:, sl] for k, v in rows.items()}, cols, any_cyclic)
    terms = rel + module.token_bonds(pair["token_bonds"][:, sl, :, None].to(dtype))
    if module.bond_type_feature:
        terms = terms + module.token_bonds_type(pair["type_bonds"][:, sl].long())
    terms = terms + module.contact_conditioning(pair["contact_class"][:, sl], pair["contact_threshold"][:, sl])
    return terms, rel


class FourierEmbedding(nn.Module):
    """cos(2 pi (w t + b)) with fixed random w, b (AF3 Algorithm 22); Boltz's parameter names."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(1, dim)
        self.proj.requires_grad_(False)

    def forward(self, times: Tensor) -> Tensor:
        """times: [K]; returns [K, dim]."""
        return torch.cos(2 * math.pi * self.proj(times[:, None]))


class RelativePositionEncoder(nn.Module):
    """AF3 Algorithm 3 with Boltz-2's options (symmetric-copy fix, cyclic chains), tile by tile."""

    def __init__(self, token_z: int, r_max: int = 32, s_max: int = 2, fix_sym_check: bool = False,
                 cyclic_pos_enc: bool = False) -> None:
        super().__init__()
        self.r_max, self.s_max = r_max, s_max
        self.linear_layer = nn.Linear(4 * (r_max + 1) + 2 * (s_max + 1) + 1, token_z, bias=False)
        self.fix_sym_check = fix_sym_check
        self.cyclic_pos_enc = cyclic_pos_enc

    def forward(self, rows: dict[str, Tensor], cols: dict[str, Tensor], any_cyclic: bool) -> Tensor:
        """rows / cols: 1-D token features ``[B, n_i]`` / ``[B, n_j]`` of the tile's rows and columns.

        any_cyclic: whether any token of the whole input has a cyclic period (a global switch in Boltz).
        returns: [B, n_i, n_j, token_z].
        """
        r_max, s_max = self.r_max, self.s_max
        same_chain = rows["asym_id"][:, :, None] == cols["asym_id"][:, None, :]
        same_residue = rows["residue_index"][:, :, None] == cols["residue_index"][:, None, :]
        same_entity = rows["entity_id"][:, :, None] == cols["entity_id"][:, None, :]
        d_residue = rows["residue_index"][:, :, None] - cols["residue_index"][:, None, :]
        if self.cyclic_pos_enc and any_cyclic:
            period = cols["cyclic_period"][:, None, :]  # the column token's period, as Boltz broadcasts it
            period = torch.where(period > 0, period, torch.zeros_like(period) + 10000)
            d_residue = (d_residue - period * torch.round(d_residue / period)).long()
        d_residue = torch.clip(d_residue + r_max, 0, 2 * r_max)
        d_residue = torch.where(same_chain, d_residue, torch.zeros_like(d_residue) + 2 * r_max + 1)
        d_token = torch.clip(rows["token_index"][:, :, None] - cols["token_index"][:, None, :] + r_max, 0, 2 * r_max)
        d_token = torch.where(same_chain & same_residue, d_token, torch.zeros_like(d_token) + 2 * r_max + 1)
        d_chain = torch.clip(rows["sym_id"][:, :, None] - cols["sym_id"][:, None, :] + s_max, 0, 2 * s_max)
        d_chain = torch.where((~same_entity) if self.fix_sym_check else same_chain,
                              torch.zeros_like(d_chain) + 2 * s_max + 1, d_chain)
        one_hot = nn.functional.one_hot
        weight = self.linear_layer.weight
        features = torch.cat([one_hot(d_residue, 2 * r_max + 2).to(weight.dtype),
                              one_hot(d_token, 2 * r_max + 2).to(weight.dtype),
                              same_entity.unsqueeze(-1).to(weight.dtype),
                              one_hot(d_chain, 2 * s_max + 2).to(weight.dtype)], dim=-1)
        return self.linear_layer(features)


class ContactConditioning(nn.Module):
    """Boltz-2's pocket / contact conditioning of the pair representation, from per-tile classes and thresholds."""

    def __init__(self, token_z: int, cutoff_min: float, cutoff_max: float) -> None:
        super().__init__()
        self.fourier_embedding = FourierEmbedding(token_z)
        self.encoder = nn.Linear(token_z + N_CONTACT_CLASSES - 1, token_z)
        self.encoding_unspecified = nn.Parameter(torch.zeros(token_z))
        self.encoding_unselected = nn.Parameter(torch.zeros(token_z))
        self.cutoff_min, self.cutoff_max = cutoff_min, cutoff_max

    def forward(self, contact_class: Tensor, threshold: Tensor) -> Tensor:
        """contact_class: [B, n_i, n_j] class indices; threshold: [B, n_i, n_j]. returns [B, n_i, n_j, token_z]."""
        dtype = self.encoder.weight.dtype
        one_hot = nn.functional.one_hot(contact_class.long(), N_CONTACT_CLASSES).to(dtype)
        normalized = ((threshold - self.cutoff_min) / (self.cutoff_max - self.cutoff_min)).to(dtype)
        fourier = self.fourier_embedding(normalized.flatten()).reshape(normalized.shape + (-1,))
        encoded = self.encoder(torch.cat([one_hot[..., 2:], normalized.unsqueeze(-1), fourier], dim=-1))
        return (encoded * (1 - one_hot[..., 0:2].sum(dim=-1, keepdim=True))
                + self.encoding_unspecified * one_hot[..., 0:1] + self.encoding_unselected * one_hot[..., 1:2])


class PairInitializer(nn.Module):
    """z_init on tiles; parameters named as Boltz-2's top level (``z_init_1``, ``rel_pos``, ...).

    Args mirror ``Boltz2``'s: token_s, token_z, fix_sym_check, cyclic_pos_enc, bond_type_feature,
    conditioning_cutoff_min / max.
    """

    PREFIXES = ("z_init_1.", "z_init_2.", "rel_pos.", "token_bonds.", "token_bonds_type.", "contact_conditioning.")

    def __init__(self, token_s: int, token_z: int, *, grid: "ProcessGrid", fix_sym_check: bool = False,
                 cyclic_pos_enc: bool = False, bond_type_feature: bool = False, conditioning_cutoff_min: float = 4.0,
                 conditioning_cutoff_max: float = 20.0) -> None:
        super().__init__()
        self.grid = grid
        self.token_z = token_z
        self.z_init_1 = nn.Linear(token_s, token_z, bias=False)
        self.z_init_2 = nn.Linear(token_s, token_z, bias=False)
        self.rel_pos = RelativePositionEncoder(token_z, fix_sym_check=fix_sym_check, cyclic_pos_enc=cyclic_pos_enc)
        self.token_bonds = nn.Linear(1, token_z, bias=False)
        self.bond_type_feature = bond_type_feature
        if bond_type_feature:
            self.token_bonds_type = nn.Embedding(N_BOND_TYPES + 1, token_z)
        self.contact_conditioning = ContactConditioning(token_z, conditioning_cutoff_min, conditioning_cutoff_max)

    @classmethod
    def state_from_boltz(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The entries of a Boltz-2 state dict that belong here."""
        return {k: v for k, v in state.items() if k.startswith(cls.PREFIXES)}

    def relative_positions(self, token: dict[str, Tensor], n_tokens: int) -> "Callable[[slice], Tensor]":
        """The relative-position encoding of this rank's tile, as a function of the tile's rows ``sl``
        ([B, rows, n, C_z]): the diffusion conditioning reads it in row chunks, so it is never held whole."""
        rows, cols, any_cyclic = tile_tokens(token, self.grid, n_tokens)
        return lambda sl: self.rel_pos({k: v[:, sl] for k, v in rows.items()}, cols, any_cyclic)

    def forward(self, s_inputs: Tensor, token: dict[str, Tensor], pair: dict[str, Tensor],
                with_relative: bool = True) -> tuple[Tensor, Tensor | None]:
        """s_inputs: [B, N, C_s] replicated; token: 1-D token features ``[B, N]`` (``asym_id``, ``residue_index``,
        ``entity_id``, ``token_index``, ``sym_id``, ``cyclic_period``) replicated; pair: this rank's tile of the
        pair features ``[B, n, n]`` (``token_bonds``, ``type_bonds``, ``contact_class``, ``contact_threshold``).

        returns: (z_init [B, n, n, C_z] pair tile (row-block r, col-block c), relative position encoding of the
        same tile, which the diffusion conditioning reuses; None when ``with_relative`` is False).
        """
        init_rows, rows_per_chunk = self.row_maker(s_inputs, token, pair)
        n = self.grid.layout(s_inputs.shape[1]).n_local
        z_out, rel_out = ChunkWriter(dim=1, size=n), ChunkWriter(dim=1, size=n)
        for sl in row_chunks(n, rows_per_chunk):
            z, rel = init_rows(sl)
            z_out.put(sl, z)
            if with_relative:
                rel_out.put(sl, rel)
        return z_out.result(), (rel_out.result() if with_relative else None)

    def row_maker(self, s_inputs: Tensor, token: dict[str, Tensor], pair: dict[str, Tensor]
                  ) -> tuple[Callable[[slice], tuple[Tensor, Tensor]], int]:
        """z_init of this rank's tile as a function of the tile's rows, so that a caller can rebuild it a chunk
        at a time instead of holding the tile (the trunk does, once per recycle); arguments as :meth:`forward`.

        returns: (rows(sl) -> (z_init rows [B, rows, n, C_z], their relative-position encoding), the rows per
        chunk that keep the widest intermediate within :data:`CHUNK_BUDGET` of the tile).
        """
        grid = self.grid
        layout = grid.layout(s_inputs.shape[1])
        n = layout.n_local
        rows, cols, any_cyclic = tile_tokens(token, grid, s_inputs.shape[1])
        z_rows = _block(self.z_init_1(s_inputs), layout, grid.row)  # [B, n, C_z]
        z_cols = _block(self.z_init_2(s_inputs), layout, grid.col)

        def init_rows(sl: slice) -> tuple[Tensor, Tensor]:
            z = z_rows[:, sl, None] + z_cols[:, None, :]
            terms, rel = pair_feature_rows(self, rows, cols, any_cyclic, pair, sl, z.dtype)
            return z + terms, rel

        batch = s_inputs.shape[0]
        width = 4 * (self.rel_pos.r_max + 1) + 2 * (self.rel_pos.s_max + 1) + 1
        return init_rows, chunk_rows(CHUNK_BUDGET, batch * n * n * self.token_z, batch * n * width, n,
                                     s_inputs.is_cuda)
