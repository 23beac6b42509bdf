"""Running boltz's modules as the float64 reference, and comparing our tiles with them."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def float64_reference():
    """Make ``Tensor.float()`` give float64 while boltz's modules run.

    boltz casts with ``.float()`` inside its layers (the triangle contraction, the single track, one-hot
    features), which in a float64 module fails with mixed dtypes; the reference must run wholly in float64 to
    compare at 1e-10.
    """
    original = torch.Tensor.float

    def to_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else self.double()

    torch.Tensor.float = to_float64
    try:
        yield
    finally:
        torch.Tensor.float = original


def narrow_boltz2_hparams(**blocks) -> dict:
    """``reduced_boltz2_hparams(**blocks)`` with narrow channels, for the whole-model parity tests: token_s 64,
    token_z 32, atom_s 32, atom_z 8, MSA and template widths 16, triangle-attention and head widths 8, Fourier
    embedding 32 (every head count as released, so each still divides its width). What those tests compare (tiles,
    rings, windows, reductions against boltz) does not depend on the widths, and the released widths in float64
    cost several times as much (the whole-model test on one rank: 12 s against 3 s). The released widths still
    run in the demo job (boltz2-small), the input embedder's parity test, the planner's and the bench's tests."""
    from foldcp_hpc.data.boltz2_hparams import reduced_boltz2_hparams

    hp = reduced_boltz2_hparams(**blocks)
    hp.update(token_s=64, token_z=32, atom_s=32, atom_z=8)
    hp["msa_args"].update(msa_s=16, pairwise_head_width=8)
    hp["template_args"].update(template_dim=16, pairwise_head_width=8)
    hp["pairformer_args"]["pairwise_head_width"] = 8
    hp["confidence_model_args"]["pairformer_args"]["pairwise_head_width"] = 8
    hp["score_model_args"]["dim_fourier"] = 32
    return hp


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Add scale * randn to every parameter (the same on every rank): boltz zero-initialises output layers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return module


def shared_randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def token_mask(batch: int, n: int, seed: int) -> torch.Tensor:
    """[B, N] float mask with about a fifth of the tokens masked (never all)."""
    mask = (torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) > 0.2).double()
    mask[:, 0] = 1.0
    return mask


def relative_error(ours: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """max |ours - ref| / max(max |ref|, floor)."""
    return float((ours - ref).abs().max() / max(float(ref.abs().max()), floor, 1e-300))


def double(features: dict) -> dict:
    """The tensors of a feature dict, floating ones in float64 (non-tensor entries dropped)."""
    return {k: (v.double() if v.is_floating_point() else v) for k, v in features.items() if isinstance(v, torch.Tensor)}


def boltz2_forward(model: torch.nn.Module, feats: dict, sampling_seed: int = 123, **kwargs) -> dict:
    """``Boltz2.forward(feats, **kwargs)`` in float64 without gradients, torch's global generator reseeded with
    ``sampling_seed`` where sampling starts (boltz's eval-mode dropout masks draw from it during the trunk, our
    sampler starts its own generator there)."""
    sample = model.structure_module.sample

    def reseeded_sample(*args, **sample_kwargs):
        torch.manual_seed(sampling_seed)
        return sample(*args, **sample_kwargs)

    model.structure_module.sample = reseeded_sample
    try:
        with torch.no_grad(), float64_reference():
            return model(feats, **kwargs)
    finally:
        model.structure_module.sample = sample
