"""Boltz-2's confidence module (``modules/confidencev2.ConfidenceModule`` and ``ConfidenceHeads``) on tiles.

For each sampled structure (one at a time, as ``boltz predict`` runs it):

    z = z_norm(z_trunk) + pair features + s_inputs outer terms            pair tile (shared by the samples)
    z = z + embed(bins of |x_i - x_j| between representative atoms)        pair tile, from replicated coords
    s, z = Pairformer(s, z)                                                the 8-block stack on tiles
    pae / pde logits (intra- and inter-chain heads; pde reads z + z^T)     pair tiles
    plddt, resolved logits                                                 replicated [N]
    complex pLDDT / ipLDDT / PDE / iPDE, pTM, ipTM, ligand / protein ipTM, chain-pair ipTM
        sums over j along grid rows, maxima over i along grid columns, totals over the grid

Everything pairwise stays on its tile; the full PAE / PDE are only assembled by the output path.
Parameter names are Boltz's (``confidence_module.*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from ..distributed import autograd as cp
from ..distributed import collectives as raw
from .common import ChunkWriter, chunk_rows, row_chunks
from .pair_init import (N_BOND_TYPES, ContactConditioning, RelativePositionEncoder, _block, pair_feature_rows,
                        tile_tokens)
from .pairformer import PairformerModule

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

__all__ = ["ConfidenceModule", "ConfidenceHeads", "SampleConfidence", "aggregated_metric", "share_confidences"]

NONPOLYMER, PROTEIN = 3, 0  # boltz.data.const.chain_type_ids
LIGAND_WEIGHT, INTERFACE_WEIGHT, NON_INTERFACE_WEIGHT = 20, 10, 1
CONTACT_BINS = 20  # distogram bins (of 64) counted as contact in the PDE weights
CHUNK_BUDGET = 0.5


def aggregated_metric(logits: Tensor, end: float = 1.0) -> Tensor:
    """Expected value of a binned quantity on [0, end): softmax(logits) . bin centres (Boltz's
    ``compute_aggregated_metric``). logits: [..., bins]; returns [...]."""
    bins = logits.shape[-1]
    width = end / bins
    centres = torch.arange(start=0.5 * width, end=end, step=width, device=logits.device)
    return expected_value(logits, centres)


def expected_value(logits: Tensor, values: Tensor) -> Tensor:
    """sum_k softmax(logits)_k values_k. logits: [..., bins]; values: broadcastable to logits; returns [...].

    Pair tiles ([B, n, n, bins]) without autograd go a chunk of rows at a time, so that the probabilities never
    take a whole tile.
    """
    if logits.dim() != 4 or torch.is_grad_enabled():
        return torch.sum(nn.functional.softmax(logits, dim=-1) * values, dim=-1)
    n = logits.shape[1]
    writer = ChunkWriter(dim=1, size=n)
    for sl in row_chunks(n, chunk_rows(CHUNK_BUDGET, logits.numel(), logits[:, :1].numel(), n, logits.is_cuda)):
        writer.put(sl, torch.sum(nn.functional.softmax(logits[:, sl], dim=-1) * values, dim=-1))
    return writer.result()


@dataclass
class SampleConfidence:
    """Confidence of one sampled structure. Per token: plddt [B, N] replicated; pairs: pae, pde [B, n, n] tiles
    (row-block r, col-block c); scalars [B]; pair_chains_iptm: {asym i: {asym j: [B]}} as Boltz keys it."""

    plddt: Tensor
    pae: Tensor
    pde: Tensor
    complex_plddt: Tensor
    complex_iplddt: Tensor
    complex_pde: Tensor
    complex_ipde: Tensor
    ptm: Tensor
    iptm: Tensor
    ligand_iptm: Tensor
    protein_iptm: Tensor
    pair_chains_iptm: dict[int, dict[int, Tensor]]
    logits: dict[str, Tensor] = field(default_factory=dict)  # pae / pde tiles, plddt / resolved replicated


def _moved(value: Any, device: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _moved(item, device) for key, item in value.items()}
    return value


def share_confidences(own: list[SampleConfidence], grid: "ProcessGrid", n_samples: int) -> list[SampleConfidence]:
    """Every replica's share of the samples' confidences, to every replica, in sample order.

    own: this replica's results, for the samples ``replica_share(n_samples, dp, replica)``; their tiles are this
    rank's grid position's, as are those of the same position in every replica. Each rank gathers its position's
    results from all replicas along the replica axis (MPI, through host memory; tensors come back on this rank's
    device). returns: ``n_samples`` results; nothing when dp is 1 (``own`` is already everything).
    """
    if grid.dp == 1:
        return own
    shares = grid.axis("replica").comm.allgather([_moved(vars(result), "cpu") for result in own])
    results = [SampleConfidence(**_moved(fields, grid.device)) for share in shares for fields in share]
    if len(results) != n_samples:
        raise RuntimeError(f"replicas returned {len(results)} sample confidences, expected {n_samples}")
    return results


class ConfidenceHeads(nn.Module):
    """Boltz-2's ``ConfidenceHeads`` (token-level confidence) on tiles."""

    def __init__(self, token_s: int, token_z: int, num_plddt_bins: int = 50, num_pde_bins: int = 64,
                 num_pae_bins: int = 64, token_level_confidence: bool = True, use_separate_heads: bool = False,
                 *, grid: "ProcessGrid", **kwargs: Any) -> None:
        super().__init__()
        if not token_level_confidence:
            raise ValueError("Boltz-2 predicts confidence per token; token_level_confidence=False is not supported")
        self.grid = grid
        self.use_separate_heads = use_separate_heads
        if use_separate_heads:
            self.to_pae_intra_logits = nn.Linear(token_z, num_pae_bins, bias=False)
            self.to_pae_inter_logits = nn.Linear(token_z, num_pae_bins, bias=False)
            self.to_pde_intra_logits = nn.Linear(token_z, num_pde_bins, bias=False)
            self.to_pde_inter_logits = nn.Linear(token_z, num_pde_bins, bias=False)
        else:
            self.to_pae_logits = nn.Linear(token_z, num_pae_bins, bias=False)
            self.to_pde_logits = nn.Linear(token_z, num_pde_bins, bias=False)
        self.to_plddt_logits = nn.Linear(token_s, num_plddt_bins, bias=False)
        self.to_resolved_logits = nn.Linear(token_s, 2, bias=False)

    def forward(self, s: Tensor, z: Tensor, d: Tensor, frame_mask: Tensor, token: dict[str, Tensor],
                distogram_logits: Tensor) -> SampleConfidence:
        """s: [B, N, C_s] replicated; z: [B, n, n, C_z] pair tile; d: [B, n, n] representative-atom distances
        (tile); frame_mask: [B, N] tokens with a valid predicted frame; distogram_logits: [B, n, n, 64] tile."""
        grid = self.grid
        n_tokens = s.shape[1]
        layout = grid.layout(n_tokens)
        rows = {k: _block(token[k], layout, grid.row) for k in ("asym_id", "mol_type", "token_pad_mask")}
        cols = {k: _block(token[k], layout, grid.col) for k in ("asym_id", "mol_type", "token_pad_mask")}
        same_chain = rows["asym_id"][:, :, None] == cols["asym_id"][:, None, :]  # [B, n, n]
        dtype = z.dtype
        pae_logits, pde_logits = self._pair_logits(z, same_chain)
        resolved_logits = self.to_resolved_logits(s)
        plddt_logits = self.to_plddt_logits(s)

        pad = token["token_pad_mask"].to(dtype)  # [B, N]
        is_ligand = (token["mol_type"] == NONPOLYMER).to(dtype)
        plddt = aggregated_metric(plddt_logits)
        complex_plddt = (plddt * pad).sum(dim=-1) / pad.sum(dim=-1)
        # ipLDDT: a token is at an interface if some token of another chain lies within 8 A (ligands excluded)
        ligand_rows = (rows["mol_type"] == NONPOLYMER).to(dtype)
        contact = (d < 8).to(dtype) * (~same_chain).to(dtype) * (1 - ligand_rows)[:, :, None]
        interface_rows = raw.all_reduce(contact.amax(dim=-1), grid, "row", op="max")  # [B, n] row block r
        interface = raw.all_gather(interface_rows, grid, "col", dim=1)[:, :n_tokens]  # [B, N]
        non_interface = (1 - interface) * (1 - is_ligand)
        weight = is_ligand * LIGAND_WEIGHT + interface * INTERFACE_WEIGHT + non_interface * NON_INTERFACE_WEIGHT
        complex_iplddt = (plddt * pad * weight).sum(dim=-1) / torch.sum(pad * weight, dim=-1)

        pde = aggregated_metric(pde_logits, end=32)
        contact_bins = (torch.arange(distogram_logits.shape[-1], device=z.device) < CONTACT_BINS).to(dtype)
        prob_contact = expected_value(distogram_logits, contact_bins)  # softmax(...)[..., :CONTACT_BINS].sum(-1)
        pair_pad = rows["token_pad_mask"].to(dtype)[:, :, None] * cols["token_pad_mask"].to(dtype)[:, None, :]
        if grid.row == grid.col:  # the diagonal (i == j) is left out
            pair_pad = pair_pad * (1 - torch.eye(pair_pad.shape[-1], dtype=dtype, device=z.device))
        pair_weight = pair_pad * prob_contact
        inter = pair_weight * (~same_chain).to(dtype)
        sums = raw.all_reduce(torch.stack([(pde * pair_weight).sum(dim=(1, 2)), pair_weight.sum(dim=(1, 2)),
                                           (pde * inter).sum(dim=(1, 2)), inter.sum(dim=(1, 2))]), grid, "grid")
        complex_pde = sums[0] / sums[1]
        complex_ipde = sums[2] / (sums[3] + 1e-5)

        pae = aggregated_metric(pae_logits, end=32)
        ptms = self._ptms(pae_logits, frame_mask, rows, cols, token, n_tokens)
        return SampleConfidence(plddt=plddt, pae=pae, pde=pde, complex_plddt=complex_plddt,
                                complex_iplddt=complex_iplddt, complex_pde=complex_pde, complex_ipde=complex_ipde,
                                **ptms, logits={"pae": pae_logits, "pde": pde_logits, "plddt": plddt_logits,
                                                "resolved": resolved_logits})

    def _pair_logits(self, z: Tensor, same_chain: Tensor) -> tuple[Tensor, Tensor]:
        """The PAE logits of z and the PDE logits of z + z^T, a chunk of rows at a time (z + z^T is never a whole
        tile). z: [B, n, n, C_z] pair tile; same_chain: [B, n, n] tile. returns two [B, n, n, bins] tiles."""
        z_t = cp.transpose_tiles(z, self.grid)  # a view at p = 1, the mirror rank's tile at p > 1
        n = z.shape[1]
        pae_out, pde_out = ChunkWriter(dim=1, size=n), ChunkWriter(dim=1, size=n)
        for sl in row_chunks(n, chunk_rows(CHUNK_BUDGET, z.numel(), z[:, :1].numel(), n, z.is_cuda)):
            z_rows, z_sym = z[:, sl], z[:, sl] + z_t[:, sl]
            if self.use_separate_heads:
                same = same_chain[:, sl].to(z.dtype)[..., None]
                pae = self.to_pae_inter_logits(z_rows) * (1 - same) + self.to_pae_intra_logits(z_rows) * same
                pde = self.to_pde_inter_logits(z_sym) * (1 - same) + self.to_pde_intra_logits(z_sym) * same
            else:
                pae, pde = self.to_pae_logits(z_rows), self.to_pde_logits(z_sym)
            pae_out.put(sl, pae)
            pde_out.put(sl, pde)
        return pae_out.result(), pde_out.result()

    def _ptms(self, pae_logits: Tensor, frame_mask: Tensor, rows: dict, cols: dict, token: dict[str, Tensor],
              n_tokens: int) -> dict[str, Any]:
        """Boltz's ``compute_ptms``: masked means of the expected TM term over j (grid-row sums), then the
        maximum over i (grid-column maxima). Chain pairs use segment sums over the column chains."""
        grid = self.grid
        layout = grid.layout(n_tokens)
        dtype = pae_logits.dtype
        bins = pae_logits.shape[-1]
        width = 32.0 / bins
        pae_value = torch.arange(start=0.5 * width, end=32.0, step=width, device=pae_logits.device)[None]
        pad = token["token_pad_mask"].to(dtype)
        n_res = pad.sum(dim=-1, keepdim=True)
        d0 = 1.24 * (torch.clip(n_res, min=19) - 15) ** (1 / 3) - 1.8
        tm_value = (1 / (1 + (pae_value / d0) ** 2))[:, None, None]  # [B, 1, 1, bins]
        tm = expected_value(pae_logits, tm_value)  # [B, n, n]

        row_frame = _block(frame_mask, layout, grid.row).to(dtype)
        pad_i, pad_j = rows["token_pad_mask"].to(dtype), cols["token_pad_mask"].to(dtype)
        base = row_frame[:, :, None] * pad_j[:, None, :] * pad_i[:, :, None]  # [B, n, n]
        other_chain = (rows["asym_id"][:, :, None] != cols["asym_id"][:, None, :]).to(dtype)
        lig_i, lig_j = ((m == NONPOLYMER).to(dtype) for m in (rows["mol_type"], cols["mol_type"]))
        pro_i, pro_j = ((m == PROTEIN).to(dtype) for m in (rows["mol_type"], cols["mol_type"]))
        masks = {"ptm": base, "iptm": base * other_chain,
                 "ligand_iptm": base * other_chain * (lig_i[:, :, None] * pro_j[:, None, :]
                                                      + pro_i[:, :, None] * lig_j[:, None, :]),
                 "protein_iptm": base * other_chain * (pro_i[:, :, None] * pro_j[:, None, :])}
        names = list(masks)
        sums = raw.all_reduce(torch.stack([s for name in names for s in ((tm * masks[name]).sum(-1),
                                                                         masks[name].sum(-1))]), grid, "row")
        out = {}
        for k, name in enumerate(names):
            ratio = sums[2 * k] / (sums[2 * k + 1] + 1e-5)  # [B, n] rows of block r
            out[name] = raw.all_reduce(ratio.amax(dim=-1), grid, "col", op="max")

        # chain pairs: entry [idx1][idx2] takes columns of chain idx1 and rows of chain idx2
        chains = torch.unique(token["asym_id"])
        n_chains = len(chains)
        col_chain = torch.searchsorted(chains, cols["asym_id"].contiguous())  # [B, n] (padding: any, masked)
        row_chain = torch.searchsorted(chains, rows["asym_id"].contiguous())
        weight = base  # rows' frames and both pads
        index = col_chain[:, None, :].expand_as(tm).clamp(max=n_chains - 1)
        seg_tm = tm.new_zeros(tm.shape[:2] + (n_chains,)).scatter_add_(2, index, tm * weight)
        seg_n = tm.new_zeros(tm.shape[:2] + (n_chains,)).scatter_add_(2, index, weight)
        seg = raw.all_reduce(torch.stack([seg_tm, seg_n]), grid, "row")
        ratio = seg[0] / (seg[1] + 1e-5)  # [B, n rows, chains of the columns]
        # rows of other chains contribute zeros, as in Boltz's masked maximum
        best = ratio.new_zeros(ratio.shape[0], n_chains, n_chains)  # [B, row chain, column chain]
        valid_rows = row_chain.clamp(max=n_chains - 1)[:, :, None].expand_as(ratio)
        best = best.scatter_reduce(1, valid_rows, ratio, reduce="amax", include_self=True)
        best = raw.all_reduce(best, grid, "col", op="max")
        ids = chains.tolist()
        out["pair_chains_iptm"] = {ids[a]: {ids[b]: best[:, b, a] for b in range(n_chains)} for a in range(n_chains)}
        return out


class ConfidenceModule(nn.Module):
    """Boltz-2's ``ConfidenceModule`` on tiles; same constructor arguments plus ``grid``."""

    def __init__(self, token_s: int, token_z: int, pairformer_args: dict, num_dist_bins: int = 64,
                 token_level_confidence: bool = True, max_dist: float = 22, add_s_to_z_prod: bool = False,
                 add_s_input_to_s: bool = False, add_z_input_to_z: bool = False, maximum_bond_distance: int = 0,
                 bond_type_feature: bool = False, confidence_args: Optional[dict] = None,
                 compile_pairformer: bool = False, fix_sym_check: bool = False, cyclic_pos_enc: bool = False,
                 return_latent_feats: bool = False, conditioning_cutoff_min: Optional[float] = None,
                 conditioning_cutoff_max: Optional[float] = None, *, grid: "ProcessGrid", **kwargs: Any) -> None:
        super().__init__()
        if maximum_bond_distance != 0:
            raise ValueError(f"maximum_bond_distance={maximum_bond_distance}: Boltz-2 uses 0 (bond flags only)")
        self.grid = grid
        self.no_update_s = pairformer_args.get("no_update_s", False)
        self.register_buffer("boundaries", torch.linspace(2, max_dist, num_dist_bins - 1))
        self.dist_bin_pairwise_embed = nn.Embedding(num_dist_bins, token_z)
        self.s_to_z = nn.Linear(token_s, token_z, bias=False)
        self.s_to_z_transpose = nn.Linear(token_s, token_z, bias=False)
        self.add_s_to_z_prod = add_s_to_z_prod
        if add_s_to_z_prod:
            self.s_to_z_prod_in1 = nn.Linear(token_s, token_z, bias=False)
            self.s_to_z_prod_in2 = nn.Linear(token_s, token_z, bias=False)
            self.s_to_z_prod_out = nn.Linear(token_z, token_z, bias=False)
        self.s_inputs_norm = nn.LayerNorm(token_s)
        if not self.no_update_s:
            self.s_norm = nn.LayerNorm(token_s)
        self.z_norm = nn.LayerNorm(token_z)
        self.add_s_input_to_s = add_s_input_to_s
        if add_s_input_to_s:
            self.s_input_to_s = nn.Linear(token_s, token_s, bias=False)
        self.add_z_input_to_z = add_z_input_to_z
        self.bond_type_feature = bond_type_feature
        if add_z_input_to_z:
            self.rel_pos = RelativePositionEncoder(token_z, fix_sym_check=fix_sym_check, cyclic_pos_enc=cyclic_pos_enc)
            self.token_bonds = nn.Linear(1, token_z, bias=False)
            if bond_type_feature:
                self.token_bonds_type = nn.Embedding(N_BOND_TYPES + 1, token_z)
            self.contact_conditioning = ContactConditioning(token_z, conditioning_cutoff_min, conditioning_cutoff_max)
        args = {**pairformer_args, "v2": True}
        self.pairformer_stack = PairformerModule(token_s, token_z, **args, grid=grid)
        self.confidence_heads = ConfidenceHeads(token_s, token_z, token_level_confidence=token_level_confidence,
                                                **(confidence_args or {}), grid=grid)

    def pair_base(self, s_inputs: Tensor, z: Tensor, token: dict[str, Tensor], pair: dict[str, Tensor]) -> Tensor:
        """The samples' common pair input: z_norm(z) + pair features + s_inputs terms. [B, n, n, C_z] tile."""
        grid = self.grid
        n_tokens = s_inputs.shape[1]
        layout = grid.layout(n_tokens)
        s_inputs = self.s_inputs_norm(s_inputs)
        rows, cols, any_cyclic = tile_tokens(token, grid, n_tokens)
        row_terms = _block(self.s_to_z(s_inputs), layout, grid.row)  # [B, n, C_z]
        col_terms = _block(self.s_to_z_transpose(s_inputs), layout, grid.col)
        if self.add_s_to_z_prod:
            prod_rows = _block(self.s_to_z_prod_in1(s_inputs), layout, grid.row)
            prod_cols = _block(self.s_to_z_prod_in2(s_inputs), layout, grid.col)
        n = z.shape[1]
        per_row = z.shape[0] * n * (z.shape[-1] + 4 * 33 + 7)
        writer = ChunkWriter(dim=1, size=n)
        for sl in row_chunks(n, chunk_rows(CHUNK_BUDGET, z.numel(), per_row, n, z.is_cuda)):
            out = self.z_norm(z[:, sl])
            if self.add_z_input_to_z:
                out = out + pair_feature_rows(self, rows, cols, any_cyclic, pair, sl, out.dtype)[0]
            out = out + row_terms[:, sl, None, :] + col_terms[:, None, :, :]
            if self.add_s_to_z_prod:
                out = out + self.s_to_z_prod_out(prod_rows[:, sl, None, :] * prod_cols[:, None, :, :])
            writer.put(sl, out)
        return writer.result()

    def forward(self, s_inputs: Tensor, s: Tensor, z: Tensor, coords: Tensor, token: dict[str, Tensor],
                atom: dict[str, Tensor], pair: dict[str, Tensor], distogram_logits: Tensor,
                z_base: Optional[Tensor] = None, consume_base: bool = False) -> SampleConfidence:
        """One sample. s_inputs, s: [B, N, C_s] replicated; z: [B, n, n, C_z] trunk pair tile; coords: [B, M, 3]
        replicated predicted atom coordinates; pair: this rank's pair-feature tile; distogram_logits: [B, n, n,
        64] tile; z_base: :meth:`pair_base` when already computed for another sample; consume_base: z_base is not
        needed again (the last sample): without autograd this sample's pair input is built in its storage."""
        from .frames import predicted_frame_mask

        grid = self.grid
        n_tokens = s.shape[1]
        layout = grid.layout(n_tokens)
        if z_base is None:
            z_base, consume_base = self.pair_base(s_inputs, z, token, pair), True
        s_inputs_n = self.s_inputs_norm(s_inputs)
        if not self.no_update_s:
            s = self.s_norm(s)
        if self.add_s_input_to_s:
            s = s + self.s_input_to_s(s_inputs_n)

        rep = atom["token_to_rep_atom"].long()  # [B, N]
        x_rep = coords.gather(1, rep[..., None].expand(-1, -1, 3))  # [B, N, 3]
        mode = "use_mm_for_euclid_dist" if n_tokens > 25 else "donot_use_mm_for_euclid_dist"  # Boltz's choice
        d = torch.cdist(_block(x_rep, layout, grid.row), _block(x_rep, layout, grid.col), compute_mode=mode)
        bins = (d.unsqueeze(-1) > self.boundaries).sum(dim=-1).long()
        if torch.is_grad_enabled():
            z = z_base + self.dist_bin_pairwise_embed(bins)
        else:  # into the last sample's z_base (given up) or a copy, a chunk of rows at a time
            z = z_base if consume_base else z_base.clone()
            for rows in row_chunks(z.shape[1], chunk_rows(1.0, z.numel(), z[:, :1].numel(), z.shape[1], z.is_cuda)):
                z[:, rows] += self.dist_bin_pairwise_embed(bins[:, rows])

        mask = token["token_pad_mask"].to(z.dtype)
        padded = nn.functional.pad(mask, (0, layout.n_pad))
        pair_mask = padded[:, layout.block(grid.row), None] * padded[:, None, layout.block(grid.col)]
        s, z = self.pairformer_stack(s, z, mask=mask, pair_mask=pair_mask, inplace=True)
        frame_mask = predicted_frame_mask(coords, token, atom)
        return self.confidence_heads(s, z, d, frame_mask, token, distogram_logits)
