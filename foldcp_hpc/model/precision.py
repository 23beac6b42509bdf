"""The model's precision as a job names it: the parameters' dtype and the autocast context the model runs in.

``float32`` and ``float64`` run every operation in that dtype (float64 is what the parity tests use).
``bf16-mixed`` is what ``boltz predict`` runs Boltz-2 in (Lightning's ``bf16-mixed``): float32 parameters and
float32 activations between layers, with matrix products and attention computed in bfloat16 under
``torch.autocast`` (accumulated in float32); on CUDA it takes the Triton kernels (``foldcp_hpc.kernels``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["PRECISIONS", "Precision"]

#: The names a job may give ``[model] dtype``.
PRECISIONS = ("float32", "float64", "bf16-mixed")

_PARAMETER_DTYPE = {"float32": torch.float32, "float64": torch.float64, "bf16-mixed": torch.float32}


@dataclass(frozen=True)
class Precision:
    """One of :data:`PRECISIONS`: ``dtype`` for the parameters and inputs, ``autocast(device)`` around the model."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in _PARAMETER_DTYPE:
            raise ValueError(f"precision {self.name!r} is not one of {', '.join(PRECISIONS)}")

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' and the model inputs' dtype (float32 under ``bf16-mixed``)."""
        return _PARAMETER_DTYPE[self.name]

    @property
    def mixed(self) -> bool:
        return self.name == "bf16-mixed"

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """The context the model's forward runs in: ``torch.autocast`` to bfloat16 when mixed, else nothing."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
