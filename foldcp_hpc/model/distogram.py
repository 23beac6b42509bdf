"""Distogram head on tiles (Boltz-2's ``modules/trunkv2.DistogramModule``): logits of z + z^T.

The transposed tile comes from the mirror rank (one tile exchange); parameters are named as Boltz's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..distributed import autograd as cp

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid


class DistogramModule(nn.Module):
    """Linear head on the symmetrised pair representation."""

    def __init__(self, token_z: int, num_bins: int, num_distograms: int = 1, *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.distogram = nn.Linear(token_z, num_distograms * num_bins)
        self.num_distograms = num_distograms
        self.num_bins = num_bins

    def forward(self, z: Tensor) -> Tensor:
        """z: [B, N_i, N_j, C_z] pair tile (row-block r, col-block c).

        returns: [B, N_i, N_j, num_distograms, num_bins] logits of the same tile.
        """
        z = z + cp.transpose_tiles(z, self.grid)  # z[i, j] + z[j, i]
        return self.distogram(z).reshape(z.shape[0], z.shape[1], z.shape[2], self.num_distograms, self.num_bins)
