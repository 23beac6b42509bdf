"""Boltz-2's affinity module (``modules/affinity.AffinityModule`` and ``AffinityHeadsTransformer``) on tiles.

Run after the confidence module, on the structure sampled with the best ipTM, for the input cropped around the
ligand (at most 256 tokens, :mod:`foldcp_hpc.data.affinity`):

    cross[i, j] = ligand(i) receptor(j) + receptor(i) ligand(j) + ligand(i) ligand(j)     pair tile
    z = z_linear(z_norm(z_trunk * cross)) + in1(s_inputs)_i + in2(s_inputs)_j              pair tile
    z = z + PairwiseConditioning(z, embed(bins of |x_i - x_j|))                            pair tile
    z = PairformerNoSeq(z, pair_mask = cross)                                              pair tiles, rings
    g = sum_ij z * cross * (i != j) / (sum_ij cross * (i != j) + 1e-7)                     tile sums, one grid sum
    affinity value, binder logit = MLPs(g)                                                 replicated

Nothing pairwise leaves its tile; the pooled vector ``g`` [B, C_z] is the only reduction. Parameter names are
Boltz's (``affinity_module.*`` or ``affinity_module1.*`` / ``affinity_module2.*`` for the ensemble).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..distributed import collectives as raw
from .diffusion_conditioning import PairwiseConditioning
from .pair_init import _block
from .pairformer import PairformerNoSeqModule

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

__all__ = ["AffinityModule", "AffinityHeads", "cross_pair_mask", "affinity_outputs"]

PROTEIN = 0  # boltz.data.const.chain_type_ids["PROTEIN"]
#: boltz's molecular-weight correction of the ensemble's affinity value (``Boltz2.forward``)
MW_MODEL_COEF, MW_COEF, MW_BIAS = 1.03525938, -0.59992683, 2.83288489


def cross_pair_mask(token: dict[str, Tensor], grid: "ProcessGrid", n_tokens: int, dtype: torch.dtype) -> Tensor:
    """The receptor-ligand and ligand-ligand pairs of this rank's tile: [B, n, n] (0 on padding).

    token: ``token_pad_mask``, ``mol_type``, ``affinity_token_mask`` [B, N] replicated.
    """
    layout = grid.layout(n_tokens)
    pad = token["token_pad_mask"].to(dtype)
    receptor = (token["mol_type"] == PROTEIN).to(dtype) * pad
    ligand = token["affinity_token_mask"].to(torch.bool).to(dtype) * pad
    rec_r, rec_c = _block(receptor, layout, grid.row), _block(receptor, layout, grid.col)
    lig_r, lig_c = _block(ligand, layout, grid.row), _block(ligand, layout, grid.col)
    return (lig_r[:, :, None] * rec_c[:, None, :] + rec_r[:, :, None] * lig_c[:, None, :]
            + lig_r[:, :, None] * lig_c[:, None, :])


class AffinityHeads(nn.Module):
    """Boltz-2's ``AffinityHeadsTransformer``: masked mean of z over cross pairs (i != j), then MLPs."""

    def __init__(self, token_z: int, input_token_s: int, *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.affinity_out_mlp = nn.Sequential(nn.Linear(token_z, token_z), nn.ReLU(),
                                              nn.Linear(token_z, input_token_s), nn.ReLU())
        self.to_affinity_pred_value = nn.Sequential(
            nn.Linear(input_token_s, input_token_s), nn.ReLU(), nn.Linear(input_token_s, input_token_s), nn.ReLU(),
            nn.Linear(input_token_s, 1))
        self.to_affinity_pred_score = nn.Sequential(
            nn.Linear(input_token_s, input_token_s), nn.ReLU(), nn.Linear(input_token_s, input_token_s), nn.ReLU(),
            nn.Linear(input_token_s, 1))
        self.to_affinity_logits_binary = nn.Linear(1, 1)

    def forward(self, z: Tensor, cross: Tensor) -> dict[str, Tensor]:
        """z: [B, n, n, C_z] pair tile; cross: [B, n, n] :func:`cross_pair_mask` of the same tile.

        returns ``affinity_pred_value`` and ``affinity_logits_binary``, each [B, 1] replicated.
        """
        grid = self.grid
        if grid.row == grid.col:  # the diagonal i == j lies in diagonal tiles only
            eye = torch.eye(cross.shape[1], dtype=cross.dtype, device=cross.device)
            cross = cross * (1 - eye)
        sums = torch.cat([torch.einsum("bijc,bij->bc", z, cross), cross.sum(dim=(1, 2))[:, None]], dim=-1)
        sums = raw.all_reduce(sums, grid, "grid")  # [B, C_z + 1]
        g = sums[:, :-1] / (sums[:, -1:] + 1e-7)
        g = self.affinity_out_mlp(g)
        score = self.to_affinity_pred_score(g).reshape(-1, 1)
        return {"affinity_pred_value": self.to_affinity_pred_value(g).reshape(-1, 1),
                "affinity_logits_binary": self.to_affinity_logits_binary(score).reshape(-1, 1)}


class AffinityModule(nn.Module):
    """Boltz-2's ``AffinityModule`` (Boltz-2 paper, affinity module) on tiles; Boltz's constructor arguments."""

    def __init__(self, token_s: int, token_z: int, pairformer_args: dict, transformer_args: dict,
                 num_dist_bins: int = 64, max_dist: float = 22, use_cross_transformer: bool = False,
                 groups: dict | None = None, *, grid: "ProcessGrid") -> None:
        super().__init__()
        if use_cross_transformer:
            raise ValueError("use_cross_transformer=True: boltz 2.2.1's affinity heads never use it")
        self.grid = grid
        self.register_buffer("boundaries", torch.linspace(2, max_dist, num_dist_bins - 1))
        self.dist_bin_pairwise_embed = nn.Embedding(num_dist_bins, token_z)
        self.s_to_z_prod_in1 = nn.Linear(token_s, token_z, bias=False)
        self.s_to_z_prod_in2 = nn.Linear(token_s, token_z, bias=False)
        self.z_norm = nn.LayerNorm(token_z)
        self.z_linear = nn.Linear(token_z, token_z, bias=False)
        self.pairwise_conditioner = PairwiseConditioning(token_z, dim_token_rel_pos_feats=token_z, num_transitions=2)
        self.pairformer_stack = PairformerNoSeqModule(token_z, **pairformer_args, grid=grid)
        self.affinity_heads = AffinityHeads(token_z, transformer_args["token_s"], grid=grid)

    def forward(self, s_inputs: Tensor, z: Tensor, coords: Tensor, token: dict[str, Tensor],
                atom: dict[str, Tensor], cross: Tensor) -> dict[str, Tensor]:
        """s_inputs: [B, N, C_s] replicated (the embedder's affinity variant); z: [B, n, n, C_z] trunk pair tile
        already multiplied by ``cross``; coords: [B, M, 3] replicated (the chosen sample); atom:
        ``token_to_rep_atom`` [B, N]; cross: [B, n, n] :func:`cross_pair_mask`.

        returns ``affinity_pred_value`` and ``affinity_logits_binary``, each [B, 1] replicated.
        """
        grid = self.grid
        n_tokens = s_inputs.shape[1]
        layout = grid.layout(n_tokens)
        z = self.z_linear(self.z_norm(z))
        z = (z + _block(self.s_to_z_prod_in1(s_inputs), layout, grid.row)[:, :, None, :]
             + _block(self.s_to_z_prod_in2(s_inputs), layout, grid.col)[:, None, :, :])

        rep = atom["token_to_rep_atom"].long()  # [B, N]
        x_rep = coords.gather(1, rep[..., None].expand(-1, -1, 3)).to(z.dtype)  # [B, N, 3]
        mode = "use_mm_for_euclid_dist" if n_tokens > 25 else "donot_use_mm_for_euclid_dist"  # torch.cdist's choice
        d = torch.cdist(_block(x_rep, layout, grid.row), _block(x_rep, layout, grid.col), compute_mode=mode)
        bins = self.dist_bin_pairwise_embed((d.unsqueeze(-1) > self.boundaries).sum(dim=-1).long())
        z = z + self.pairwise_conditioner(z, bins)
        z = self.pairformer_stack(z, pair_mask=cross, n_tokens=n_tokens, inplace=True)
        return self.affinity_heads(z, cross)


def affinity_outputs(results: list[dict[str, Tensor]], affinity_mw: float | None, mw_correction: bool
                     ) -> dict[str, Tensor]:
    """Boltz-2's affinity outputs from one module (``affinity_pred_value``, ``affinity_probability_binary``) or
    the two-model ensemble (their means, with the molecular-weight correction when asked, plus each model's
    values suffixed 1 and 2), as ``Boltz2.forward`` assembles them."""
    probabilities = [torch.sigmoid(r["affinity_logits_binary"]) for r in results]
    if len(results) == 1:
        return {"affinity_pred_value": results[0]["affinity_pred_value"],
                "affinity_probability_binary": probabilities[0]}
    value = (results[0]["affinity_pred_value"] + results[1]["affinity_pred_value"]) / 2
    if mw_correction:
        if affinity_mw is None:
            raise ValueError("the affinity molecular-weight correction needs the ligand's molecular weight")
        value = MW_MODEL_COEF * value + MW_COEF * affinity_mw ** 0.3 + MW_BIAS
    out: dict[str, Any] = {"affinity_pred_value": value,
                           "affinity_probability_binary": (probabilities[0] + probabilities[1]) / 2}
    for k, (result, probability) in enumerate(zip(results, probabilities), start=1):
        out[f"affinity_pred_value{k}"] = result["affinity_pred_value"]
        out[f"affinity_probability_binary{k}"] = probability
    return out
