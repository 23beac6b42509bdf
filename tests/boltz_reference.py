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
