"""How many pair tiles the inference path holds, measured on the CPU (one rank, 160 x 160 tiles, float32).

* The trunk holds one tile of z: z_init is rebuilt a chunk of rows at a time for every recycle, never kept. The
  measured trunk peak must stay within a quarter tile of the planner's (which counts one tile held); keeping
  z_init would add a whole tile.
* The MSA module's later layers work in the tile of the layer before (the caller's z is left as it was by the
  first layer only): a second MSA block must not add a tile to the module's or the trunk's peak.
"""

from __future__ import annotations

import pytest
import torch

from conftest import everywhere
from foldcp_hpc.bench.stages import measure_stages, mmap_every_buffer
from foldcp_hpc.data.boltz2_hparams import reduced_boltz2_hparams
from foldcp_hpc.plan import Architecture, Problem, stage_transients

pytestmark = pytest.mark.mpi

N_TOKENS = 160
MSA_ROWS = 8


def _hparams(msa_blocks: int) -> dict:
    return reduced_boltz2_hparams(pairformer_blocks=1, msa_blocks=msa_blocks, token_transformer_depth=4,
                                  confidence_blocks=1, atom_depth=1)


def test_trunk_holds_one_tile_and_msa_layers_share_theirs(grid):
    from test_plan_mpi import synthetic_features

    if grid.world_size > 1:
        pytest.skip("one rank: the tiles are the whole pair tensor (the per-rank logic is the same on a grid)")
    with mmap_every_buffer():
        features = synthetic_features(grid, N_TOKENS, MSA_ROWS)
        one, two = (measure_stages(grid, features, _hparams(blocks), torch.float32, ("msa_module", "trunk"),
                                   warm_up=True) for blocks in (1, 2))
    tile = N_TOKENS * N_TOKENS * 128 * 4
    problem = Problem(features.n_tokens, features.n_atoms, msa_rows=features.msa.n_rows)
    planned = stage_transients(problem, 1, 4, Architecture.from_hparams(_hparams(1), n_parameters=0))["trunk"].bytes
    mib = {name: round(value / 2**20, 1) for name, value in
           {"planned trunk": planned, "trunk": one["trunk"], "trunk, 2 MSA blocks": two["trunk"],
            "MSA module": one["msa_module"], "MSA module, 2 blocks": two["msa_module"], "tile": tile}.items()}
    ok = (one["trunk"] <= planned + tile / 4 and two["msa_module"] - one["msa_module"] < tile / 4
          and two["trunk"] - one["trunk"] < tile / 4)
    assert everywhere(grid, ok), mib
