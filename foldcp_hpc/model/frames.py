"""Which tokens have a valid frame in a predicted structure (Boltz's ``compute_frame_pred`` at inference),
from the replicated coordinates and index maps (O(M) per rank; no atoms x tokens matrix)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["predicted_frame_mask", "collinear_mask"]

NONPOLYMER = 3  # boltz.data.const.chain_type_ids["NONPOLYMER"]


def collinear_mask(v1: Tensor, v2: Tensor) -> Tensor:
    """True where two frame edge vectors [K, 3] are neither (anti)parallel (|cos| >= 0.9063) nor degenerate."""
    norm1 = torch.norm(v1, dim=1, keepdim=True)
    norm2 = torch.norm(v2, dim=1, keepdim=True)
    cosine = torch.sum(v1 / (norm1 + 1e-6) * (v2 / (norm2 + 1e-6)), dim=1)
    return (torch.abs(cosine) < 0.9063) & (norm1.reshape(-1) > 1e-2) & (norm2.reshape(-1) > 1e-2)


def predicted_frame_mask(coords: Tensor, token: dict[str, Tensor], atom: dict[str, Tensor]) -> Tensor:
    """[B, N] 1.0 for tokens whose frame (three atoms) in ``coords`` is usable for pTM, as Boltz decides it.

    coords: [B, M, 3] one predicted structure per batch entry, replicated; token / atom: replicated 1-D
    features (``frames_idx`` [B, N, 3] atom indices of each token's frame, ``atom_to_token`` [B, M]).
    Polymer tokens keep their reference frames; a nonpolymer chain of at least 3 atoms gets, for each atom, the
    frame (nearest atom, itself, second nearest) in the predicted coordinates, as Boltz builds it.
    """
    asym = token["asym_id"]
    token_pad = token["token_pad_mask"]
    atom_pad = atom["atom_pad_mask"]
    to_token = atom["atom_to_token"].long()
    # Boltz reads asym ids through the one-hot atom_to_token: padding atoms get chain 0, masked by atom_pad
    asym_atom = torch.where(to_token >= 0, asym.gather(1, to_token.clamp(min=0)), torch.zeros_like(to_token))
    frames = atom["frames_idx"].clone().long()  # [B, N, 3]
    for b in range(coords.shape[0]):
        token_index = atom_index = 0
        for chain in torch.unique(asym[b]):
            chain_tokens = (asym[b] == chain) * token_pad[b]
            chain_atoms = ((asym_atom[b] == chain) * atom_pad[b]).bool()
            n_tokens, n_atoms = int(chain_tokens.sum().item()), int(chain_atoms.sum().item())
            if int(token["mol_type"][b, token_index]) == NONPOLYMER and n_atoms >= 3:
                points = coords[b, chain_atoms]  # [A, 3]
                distances = ((points[None, :, :] - points[:, None, :]) ** 2).sum(-1) ** 0.5  # [A, A]
                order = torch.sort(distances, dim=1).indices  # all atoms real at inference: no masking term
                nearest = torch.cat([order[:, 1:2], order[:, 0:1], order[:, 2:3]], dim=1) + atom_index
                frames[b, token_index:token_index + n_atoms] = nearest
            token_index += n_tokens
            atom_index += n_atoms
    batch = torch.arange(coords.shape[0], device=coords.device)[:, None, None]
    corners = coords[batch, frames]  # [B, N, 3 atoms, 3]
    flat = corners.reshape(-1, 3, 3)
    ok = collinear_mask(flat[:, 1] - flat[:, 0], flat[:, 1] - flat[:, 2]).reshape(frames.shape[:2])
    return ok * token_pad
