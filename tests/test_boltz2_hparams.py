"""The hyper-parameters in foldcp_hpc.data.boltz2_hparams rebuild the released Boltz-2 architecture.

Measured with boltz 2.2.1: ``boltz2_hparams()`` gives 5,102 state-dict keys (as in ``boltz2_conf.ckpt``)
and 506,724,992 parameters; the full model is built on the meta device (no memory, ~15 s of CPU for
boltz's truncated-normal initialiser, which the test leaves out), the reduced one on CPU (~1.5 s).
"""

from __future__ import annotations

import pytest
import torch

from foldcp_hpc.data.boltz2_hparams import (
    BOLTZ2_CONF_NUM_PARAMETERS,
    BOLTZ2_CONF_STATE_DICT_KEYS,
    boltz2_hparams,
    reduced_boltz2_hparams,
)

pytest.importorskip("boltz")

# Every argument boltz predict passes to Boltz2.load_from_checkpoint (boltz/main.py, boltz 2.2.1).
LOAD_OVERRIDES = (
    "predict_args",
    "diffusion_process_args",
    "ema",
    "use_kernels",
    "pairformer_args",
    "msa_args",
    "steering_args",
)


def _boltz2():
    from boltz.model.models.boltz2 import Boltz2

    return Boltz2


def test_counts_match_boltz2_conf_checkpoint(monkeypatch):
    import boltz.model.layers.initialize as init

    assert BOLTZ2_CONF_STATE_DICT_KEYS == 5102
    assert BOLTZ2_CONF_NUM_PARAMETERS == 506_724_992
    # boltz's truncated-normal initialiser draws every value with scipy even for meta tensors (25 s of CPU for the
    # 507M parameters); names and shapes do not depend on it
    monkeypatch.setattr(init, "trunc_normal_init_", lambda weights, scale=1.0, fan="fan_in": None)
    with torch.device("meta"):
        model = _boltz2()(**boltz2_hparams())
    state = model.state_dict()
    assert len(state) == BOLTZ2_CONF_STATE_DICT_KEYS
    assert sum(p.numel() for p in model.parameters()) == BOLTZ2_CONF_NUM_PARAMETERS
    # Keys known from the checkpoint.
    assert "confidence_module.boundaries" in state
    assert "structure_module.score_model.token_transformer.layers.0.output_projection_linear.weight" in state
    assert "structure_module.score_model.token_transformer.layers.0.output_projection.0.weight" in state
    assert not any(k.startswith("model.") for k in state)


def test_inference_overrides_present_and_guidance_off():
    hp = boltz2_hparams()
    for key in LOAD_OVERRIDES:
        assert key in hp, key
    assert hp["ema"] is False and hp["use_kernels"] is False
    assert hp["pairformer_args"]["v2"] is True
    assert hp["msa_args"]["use_paired_feature"] is True
    steering = hp["steering_args"]
    assert not (steering["fk_steering"] or steering["physical_guidance_update"] or steering["contact_guidance_update"])
    for key in ("recycling_steps", "sampling_steps", "diffusion_samples", "max_parallel_samples"):
        assert key in hp["predict_args"]
    assert boltz2_hparams() is not hp  # fresh dict every call


def test_reduced_model_builds_on_cpu():
    hp = reduced_boltz2_hparams()
    model = _boltz2()(**hp)
    assert len(model.pairformer_module.layers) == 2
    assert len(model.confidence_module.pairformer_stack.layers) == 1
    assert len(model.structure_module.score_model.token_transformer.layers) == 2
    assert sum(p.numel() for p in model.parameters()) < 60_000_000
