"""Boltz-2 checkpoints: strict layout checks and clear refusals (serial), rank-0 read + broadcast (MPI)."""

from __future__ import annotations

import pytest
import torch

from foldcp_hpc.data.boltz2_hparams import reduced_boltz2_hparams
from foldcp_hpc.data.weights import (CheckpointError, check_layout, expected_layout, inference_hparams,
                                     load_weights, read_checkpoint)
from conftest import everywhere


def lightning_checkpoint(path, seed=0, hparams=None, perturb=False):
    """A real-layout checkpoint: boltz's Boltz2 (``hparams``, default the reduced architecture) with random
    weights (``perturb``: every parameter perturbed, as boltz's initialisers zero the output layers), saved the
    way Lightning saves one."""
    import numpy
    from boltz.model.models.boltz2 import Boltz2

    from boltz_reference import perturb_

    torch.manual_seed(seed)
    numpy.random.seed(seed)
    model = Boltz2(**(hparams or reduced_boltz2_hparams()))
    if perturb:
        perturb_(model, seed=seed)
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.5.0",
                "state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "optimizer_states": [], "lr_schedulers": []}, path)
    return model.state_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "boltz2_small.ckpt"
    return path, lightning_checkpoint(path)


def test_a_real_layout_checkpoint_passes_the_strict_check(checkpoint):
    path, saved = checkpoint
    state, hparams = read_checkpoint(path)
    layout = expected_layout(inference_hparams(hparams))
    check_layout(state, layout, str(path))
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)


def test_stored_hparams_without_v2_get_the_predict_overrides(checkpoint):
    _, hparams = read_checkpoint(checkpoint[0])
    hparams = dict(hparams, pairformer_args={k: v for k, v in hparams["pairformer_args"].items() if k != "v2"})
    hp = inference_hparams(hparams)
    assert hp["pairformer_args"]["v2"] is True and hp["msa_args"]["use_paired_feature"] is True
    assert hp["ema"] is False and hp["steering_args"]["fk_steering"] is False


def test_corrupted_checkpoint_is_refused(checkpoint, tmp_path):
    data = checkpoint[0].read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated.ckpt: cannot be read as a PyTorch checkpoint"):
        read_checkpoint(bad)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(CheckpointError, match="junk.ckpt: cannot be read"):
        read_checkpoint(junk)
    with pytest.raises(CheckpointError, match="nope.ckpt: no such checkpoint file"):
        read_checkpoint(tmp_path / "nope.ckpt")


def test_foreign_checkpoints_are_refused_with_the_differences(checkpoint, tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_checkpoint(plain)

    state, hparams = read_checkpoint(checkpoint[0])
    layout = expected_layout(inference_hparams(hparams))
    foreign = dict(state)
    foreign.pop("distogram_module.distogram.weight")
    foreign["confidence_module.extra.weight"] = torch.zeros(3)
    first = next(iter(foreign))
    foreign[first] = torch.zeros(1, 2, 3)
    with pytest.raises(CheckpointError) as info:
        check_layout(foreign, layout, "foreign.ckpt")
    message = str(info.value)
    assert "foreign.ckpt: not a Boltz-2 checkpoint of this architecture" in message
    assert "missing 1: distogram_module.distogram.weight" in message
    assert "unexpected 1: confidence_module.extra.weight" in message
    assert f"wrong shape 1: {first} (1, 2, 3) != " in message


@pytest.mark.mpi
def test_rank0_reads_and_every_rank_gets_the_same_weights(grid, tmp_path_factory):
    from mpi4py import MPI

    from boltz_reference import narrow_boltz2_hparams

    path = None
    if grid.rank == 0:  # narrow channels: the same keys and broadcasts as the released widths, 1/30 of the bytes
        path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
        lightning_checkpoint(path, seed=5, hparams=narrow_boltz2_hparams())
    path = grid.comm.bcast(str(path) if path else None, root=0)
    weights = load_weights(grid, path)
    reference = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    ok = set(weights.state_dict) == set(reference) and all(
        torch.equal(weights.state_dict[k], reference[k]) for k in reference)
    assert everywhere(grid, ok and not weights.untrained and weights.source == path)
    del MPI


@pytest.mark.mpi
def test_random_weights_are_seeded_identical_everywhere_and_labelled(grid):
    from boltz_reference import narrow_boltz2_hparams

    weights = load_weights(grid, "random", narrow_boltz2_hparams(), seed=11)
    checksum = sum(float(t.double().sum()) for t in weights.state_dict.values() if t.is_floating_point())
    assert everywhere(grid, checksum == grid.comm.bcast(checksum, root=0))
    assert everywhere(grid, weights.untrained and weights.source == "random (seed 11)")
