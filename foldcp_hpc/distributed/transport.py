"""How tensors travel between ranks: NCCL, gloo, or CUDA tensors staged through host memory over gloo.

* ``nccl``: one rank per GPU, tensors stay on the GPU. NCCL refuses two ranks on one GPU
  ("Duplicate GPU detected"), so it needs at least as many GPUs per node as ranks per node.
* ``gloo``: CPU tensors, CPU compute. What CI and laptops run.
* ``host``: compute on GPUs, communicate over gloo by copying each message to host memory and back.
  Lets a 2x2 or 3x3 grid run on a machine with fewer GPUs than ranks (ranks then share GPUs
  round-robin). Slow, but exact: for development and tests of GPU code paths.
* ``auto``: ``nccl`` when every rank of a node can have its own GPU, ``host`` when there are GPUs but
  fewer than ranks on the node, ``gloo`` without GPUs.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the job-file checks read TRANSPORTS without it
    import torch

__all__ = ["Transport", "resolve_transport", "TRANSPORTS"]

TRANSPORTS = ("auto", "nccl", "gloo", "host")


@dataclasses.dataclass(frozen=True)
class Transport:
    """A resolved transport.

    Attributes:
        name: ``nccl``, ``gloo`` or ``host``.
        backend: the torch.distributed backend (``nccl`` or ``gloo``).
        n_gpus: GPUs visible on this node (0 for gloo).
    """

    name: str
    backend: str
    n_gpus: int

    @property
    def staged(self) -> bool:
        """True when messages are copied to host memory before sending (``host``)."""
        return self.name == "host"

    def device_for(self, local_rank: int) -> "torch.device":
        """Compute device of the rank with node-local rank ``local_rank``."""
        import torch

        if self.name == "gloo":
            return torch.device("cpu")
        return torch.device("cuda", local_rank % self.n_gpus)

    def to_wire(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """The tensor as it is sent: contiguous, and on the host for ``host``."""
        if self.staged and tensor.is_cuda:
            return tensor.detach().to("cpu", copy=True).contiguous()
        return tensor.contiguous()

    def wire_like(self, tensor: "torch.Tensor", shape: "torch.Size | tuple[int, ...] | None" = None) -> "torch.Tensor":
        """An empty receive buffer matching ``tensor`` (or ``shape``) where the wire lives."""
        import torch

        shape = tensor.shape if shape is None else shape
        device = torch.device("cpu") if self.staged else tensor.device
        return torch.empty(shape, dtype=tensor.dtype, device=device)

    def from_wire(self, received: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
        """A received tensor moved back to the device of ``like``."""
        if received.device != like.device:
            return received.to(like.device, non_blocking=False)
        return received


def resolve_transport(name: str, *, local_size: int, n_gpus: int | None = None) -> Transport:
    """Turn a transport name (``auto`` included) into a :class:`Transport` for a node of ``local_size`` ranks.

    Raises:
        ValueError: unknown name, or a GPU transport without GPUs, or NCCL with more ranks than GPUs
            on the node (the message says to use ``host``).
    """
    if name not in TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}; expected one of {', '.join(TRANSPORTS)}")
    if n_gpus is None:
        import torch

        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        name = "gloo" if n_gpus == 0 else ("nccl" if local_size <= n_gpus else "host")
    if name == "gloo":
        return Transport("gloo", "gloo", 0)
    if n_gpus == 0:
        raise ValueError(f"transport {name!r} needs CUDA GPUs, but none is visible on this node; use 'gloo'")
    if name == "nccl" and local_size > n_gpus:
        raise ValueError(
            f"transport 'nccl' needs one GPU per rank, but this node runs {local_size} ranks on {n_gpus} GPU(s); "
            f"use 'host' (GPU compute, host-staged messages) or fewer ranks per node"
        )
    return Transport(name, "nccl" if name == "nccl" else "gloo", n_gpus)
