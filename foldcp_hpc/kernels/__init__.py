"""Fused GPU kernels (Triton), each with a pure-PyTorch equivalent that the model uses where the kernel can't run.

Kernels are compiled on first use, never at import; ``TRITON_INTERPRET=1`` runs them on the CPU (slowly) so that
CI without a GPU tests them against the PyTorch path.
"""

from .triangle_attention import flash_triangle_attention, kernels_available

__all__ = ["flash_triangle_attention", "kernels_available"]
