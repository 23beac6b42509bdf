"""Transition (SwiGLU MLP), Boltz's ``layers/transition.py``: per element, so tile-local with no communication."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


class Transition(nn.Module):
    """Two-layer SwiGLU MLP applied to the last dim; same parameters as Boltz's ``Transition``.

    x: [..., D] any placement (a pair tile or the replicated single representation); returns [..., out_dim].
    ``chunk_size`` splits the hidden layer (Boltz's inference chunking) to bound the [..., hidden] transient.
    """

    def __init__(self, dim: int = 128, hidden: int = 512, out_dim: Optional[int] = None) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(dim, hidden, bias=False)
        self.fc3 = nn.Linear(hidden, out_dim, bias=False)
        self.silu = nn.SiLU()
        self.hidden = hidden

    def forward(self, x: Tensor, chunk_size: Optional[int] = None) -> Tensor:
        x = self.norm(x)
        if chunk_size is None or self.training:
            return self.fc3(self.silu(self.fc1(x)) * self.fc2(x))
        out = None
        for start in range(0, self.hidden, chunk_size):
            stop = start + chunk_size
            h = self.silu(x @ self.fc1.weight[start:stop].T) * (x @ self.fc2.weight[start:stop].T)
            part = h @ self.fc3.weight[:, start:stop].T
            out = part if out is None else out + part
        return out
