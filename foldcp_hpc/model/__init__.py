"""Boltz-2 modules on the context-parallel grid: same constructor arguments as Boltz's plus ``grid``, same
parameter names (state dicts load strictly), tiles in place of full pair tensors."""

from .attention import AttentionPairBias
from .pairformer import PairformerLayer, PairformerModule, PairformerNoSeqLayer, PairformerNoSeqModule
from .transition import Transition
from .triangular_attention import TriangleAttentionEndingNode, TriangleAttentionStartingNode
from .triangular_mult import TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing

__all__ = [
    "AttentionPairBias",
    "PairformerLayer",
    "PairformerModule",
    "PairformerNoSeqLayer",
    "PairformerNoSeqModule",
    "Transition",
    "TriangleAttentionEndingNode",
    "TriangleAttentionStartingNode",
    "TriangleMultiplicationIncoming",
    "TriangleMultiplicationOutgoing",
]
