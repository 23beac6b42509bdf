"""``[model] dtype``: the precisions a job may name, and the whole model under ``bf16-mixed`` (boltz predict's own
precision) against float32 on the same weights and input, at 1 and 4 ranks (MPI part)."""

from __future__ import annotations

import pytest
import torch

from conftest import everywhere
from foldcp_hpc.config import DTYPES
from foldcp_hpc.model.precision import PRECISIONS, Precision


def test_precisions_are_the_job_files_choices():
    assert tuple(DTYPES) == PRECISIONS


@pytest.mark.parametrize("name, dtype, mixed", [("float32", torch.float32, False), ("float64", torch.float64, False),
                                                ("bf16-mixed", torch.float32, True)])
def test_precision_dtype_and_autocast(name, dtype, mixed):
    precision = Precision(name)
    assert precision.dtype == dtype and precision.mixed == mixed
    with precision.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") == mixed
        product = torch.ones(2, 2, dtype=torch.float32) @ torch.ones(2, 2, dtype=torch.float32)
    assert product.dtype == (torch.bfloat16 if mixed else torch.float32)


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="'bf16' is not one of float32, float64, bf16-mixed"):
        Precision("bf16")


@pytest.mark.mpi
def test_fold_model_bf16_mixed_is_close_to_float32(grid):
    """predict under bf16-mixed (float32 weights and z, autocast) against float32 on the same weights: the
    trunk's s and z and the distogram differ by bfloat16 roundings (more than 0: autocast took effect; less
    than 5%), and the coordinates, pLDDT and PAE are finite."""
    from foldcp_hpc.model.boltz2 import FoldModel
    from boltz_reference import narrow_boltz2_hparams, perturb_
    from test_plan_mpi import synthetic_features

    if grid.p == 3:
        pytest.skip("checked at 1 and 4 ranks; the bfloat16 ring of the triangle product is checked at 9")
    features = synthetic_features(grid, 41, 4)  # 41 tokens: padded on the 2 x 2 grid
    hp = narrow_boltz2_hparams(pairformer_blocks=1, msa_blocks=1, token_transformer_depth=2, confidence_blocks=1,
                                atom_depth=1)
    torch.manual_seed(0)
    model = perturb_(FoldModel(hp, grid=grid).eval(), seed=3)  # no zero-initialised output layers
    runs = {}
    for name in ("float32", "bf16-mixed"):
        precision = Precision(name)
        with torch.no_grad(), precision.autocast(grid.device):
            runs[name] = model.predict(features, recycling_steps=0, sampling_steps=2, diffusion_samples=1,
                                       max_parallel_samples=1, generator=torch.Generator().manual_seed(5),
                                       dtype=precision.dtype)
    wide, mixed = runs["float32"], runs["bf16-mixed"]
    errors = {}
    for key in ("s", "z", "distogram"):
        ref, got = getattr(wide.trunk, key).double(), getattr(mixed.trunk, key).double()
        errors[key] = float((got - ref).norm() / ref.norm())
    finite = bool(torch.isfinite(mixed.coords).all()) and all(
        bool(torch.isfinite(c.plddt).all()) and bool(torch.isfinite(c.pae).all()) for c in mixed.confidence)
    assert everywhere(grid, all(0 < e < 5e-2 for e in errors.values()) and finite), \
        f"rank {grid.rank}: relative errors {errors}, finite {finite}"
