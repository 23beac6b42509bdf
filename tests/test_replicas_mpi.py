"""dp replicas split the diffusion samples: :func:`replica_share` (serial, many sizes) and the whole model on
dp = P replicas of a 1 x 1 grid against the same model on the p x p grid of the same P ranks (MPI part, float64):
every sample's coordinates and confidence agree, whichever replica computed it."""

from __future__ import annotations

import pytest
import torch

from conftest import everywhere
from foldcp_hpc.distributed.layout import replica_share


@pytest.mark.parametrize("dp", [1, 2, 3, 4, 7, 9, 64])
@pytest.mark.parametrize("n_samples", [0, 1, 2, 3, 5, 8, 25])
def test_replica_shares_partition_the_samples_evenly(n_samples, dp):
    shares = [replica_share(n_samples, dp, k) for k in range(dp)]
    assert [i for share in shares for i in share] == list(range(n_samples))  # contiguous, in replica order
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_replica_share_refuses_a_replica_outside_the_grid():
    with pytest.raises(ValueError, match="replica 2 of 2 cannot share 5 samples"):
        replica_share(5, 2, 2)


@pytest.mark.mpi
def test_samples_split_over_replicas_equal_one_grid(grid):
    from boltz_reference import narrow_boltz2_hparams, perturb_
    from foldcp_hpc.distributed.grid import ProcessGrid
    from foldcp_hpc.model.boltz2 import FoldModel
    from test_plan_mpi import synthetic_features

    if grid.p == 3:  # not a boltz parity test: 9 replicas add nothing to 4 (the model on 3 x 3: test_model_mpi)
        pytest.skip("checked at 4 ranks: 4 replicas for 3 samples already leave one replica without a sample")
    samples = 3  # 4 replicas: one has no sample
    features = synthetic_features(grid, 23, 4)
    hp = narrow_boltz2_hparams(pairformer_blocks=1, msa_blocks=1, token_transformer_depth=2, confidence_blocks=1,
                                atom_depth=1)

    def predict(on):
        torch.manual_seed(0)
        model = perturb_(FoldModel(hp, grid=on).double().eval(), seed=11)
        return model.predict(features, recycling_steps=0, sampling_steps=2, diffusion_samples=samples,
                             max_parallel_samples=1, generator=torch.Generator().manual_seed(7), dtype=torch.float64,
                             gather_pae=True)

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the sampler draws its noise in the default dtype
    try:
        reference = predict(grid)
        with ProcessGrid.create(cp=1, backend="gloo") as replicas:
            split = predict(replicas)
    finally:
        torch.set_default_dtype(default)

    def error(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))  # iptm is 0 on one chain

    errors = {"coords": error(split.coords, reference.coords)}
    for k in range(samples):
        mine, ref = split.confidence[k], reference.confidence[k]
        for key in ("plddt", "complex_plddt", "ptm", "iptm", "complex_pde"):
            errors[f"{key}[{k}]"] = error(getattr(mine, key), getattr(ref, key))
    if split.pae is not None and reference.pae is not None:  # gathered on each grid's rank 0
        errors["pae"] = error(split.pae, reference.pae)
    bad = {key: value for key, value in errors.items() if not value <= 1e-9}
    assert everywhere(grid, len(split.confidence) == samples and not bad), f"rank {grid.rank}: {bad}"
