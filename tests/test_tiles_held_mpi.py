"""How many pair tiles the inference path holds, measured on the CPU (one rank, 128 x 128 tiles, float32).

* The trunk holds one tile of z: z_init is rebuilt a chunk of rows at a time for every recycle, never kept.
* The MSA module's later layers work in the tile of the layer before (only the first leaves the caller's z as it
  was): a second MSA block adds no tile.

The planner (:mod:`foldcp_hpc.plan.model`), calibrated on one-block runs, counts one tile held in the trunk and
the MSA module's one-block transient; a run with two MSA blocks must stay within a quarter tile of both. Keeping
z_init, or a layer's tile beside the next one's, adds a whole tile.
"""

from __future__ import annotations

import pytest
import torch

from conftest import everywhere
from foldcp_hpc.bench.stages import measure_stages, mmap_every_buffer
from foldcp_hpc.data.boltz2_hparams import reduced_boltz2_hparams
from foldcp_hpc.plan import Architecture, Problem, stage_transients

pytestmark = [pytest.mark.mpi, pytest.mark.heap_readings]

N_TOKENS = 128
MSA_ROWS = 8
STAGES = ("msa_module", "trunk")


def test_trunk_holds_one_tile_and_msa_layers_share_theirs(grid):
    from test_plan_mpi import synthetic_features

    if grid.world_size > 1:
        pytest.skip("one rank: the tiles are the whole pair tensor (the per-rank logic is the same on a grid)")
    hp = reduced_boltz2_hparams(pairformer_blocks=1, msa_blocks=2, token_transformer_depth=4, confidence_blocks=1,
                                atom_depth=1)
    with mmap_every_buffer():
        features = synthetic_features(grid, N_TOKENS, MSA_ROWS)
        measured = measure_stages(grid, features, hp, torch.float32, STAGES, warm_up=True)
    tile = N_TOKENS * N_TOKENS * 128 * 4
    problem = Problem(features.n_tokens, features.n_atoms, msa_rows=features.msa.n_rows)
    planned = stage_transients(problem, 1, 4, Architecture.from_hparams(hp, n_parameters=0))
    mib = {f"{stage} {kind}": round(value / 2**20, 2) for stage in STAGES
           for kind, value in (("planned", planned[stage].bytes), ("measured", measured[stage]))}
    ok = all(measured[stage] <= planned[stage].bytes + tile / 4 for stage in STAGES)
    assert everywhere(grid, ok), {**mib, "tile": tile / 2**20}
