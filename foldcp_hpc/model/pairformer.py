"""The Pairformer stack on pair tiles (Boltz-2's ``layers/pairformer.py``, v2 single track).

Layer order as in Boltz: tri_mul_out, tri_mul_in, tri_att_start, tri_att_end, transition_z, then the single
track in float32 with autocast off (pre_norm_s, AttentionPairBias, transition_s). Parameter names equal
Boltz's, so ``load_state_dict(boltz_module.state_dict())`` works strictly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor, nn

from .attention import AttentionPairBias
from .common import at_least_f32, dropout_mask
from .transition import Transition
from .triangular_attention import TriangleAttentionEndingNode, TriangleAttentionStartingNode
from .triangular_mult import TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

# Boltz (data/const.py): above this many tokens triangle attention runs in query chunks of 128, else 512
CHUNK_SIZE_THRESHOLD = 384


def tri_attn_chunk_size(n_tokens: int, training: bool) -> Optional[int]:
    """Boltz's query-row chunk for triangle attention: None in training, 128 above 384 tokens, else 512."""
    if training:
        return None
    return 128 if n_tokens > CHUNK_SIZE_THRESHOLD else 512


class PairformerNoSeqLayer(nn.Module):
    """The pair half of a Pairformer layer (used by the MSA and template modules)."""

    def __init__(self, token_z: int, dropout: float = 0.25, pairwise_head_width: int = 32,
                 pairwise_num_heads: int = 4, post_layer_norm: bool = False, *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.token_z = token_z
        self.dropout = dropout
        self.post_layer_norm = post_layer_norm
        self.tri_mul_out = TriangleMultiplicationOutgoing(token_z, grid=grid)
        self.tri_mul_in = TriangleMultiplicationIncoming(token_z, grid=grid)
        self.tri_att_start = TriangleAttentionStartingNode(token_z, pairwise_head_width, pairwise_num_heads,
                                                           inf=1e9, grid=grid)
        self.tri_att_end = TriangleAttentionEndingNode(token_z, pairwise_head_width, pairwise_num_heads,
                                                       inf=1e9, grid=grid)
        self.transition_z = Transition(token_z, token_z * 4)

    def forward(self, z: Tensor, pair_mask: Tensor, chunk_size_tri_attn: Optional[int] = None,
                use_kernels: bool = False, n_tokens: Optional[int] = None, inplace: bool = False) -> Tensor:
        """z: [B, N_i, N_j, C_z] pair tile (row-block r, col-block c); pair_mask: [B, N_i, N_j] the same tile.

        n_tokens: the true N (needed for dropout in training and for exact treatment of padding).
        inplace: z may be overwritten (the caller does not use it again); in inference every update is then
            added into z's storage (see :func:`_pair_stack`).
        """
        return _pair_stack(self, z, pair_mask, chunk_size_tri_attn, n_tokens, inplace)


def _pair_stack(layer: nn.Module, z: Tensor, pair_mask: Tensor, chunk: Optional[int], n_tokens: Optional[int],
                inplace: bool = False) -> Tensor:
    """tri_mul_out, tri_mul_in, tri_att_start, tri_att_end and transition_z, each added to z.

    In inference with ``inplace`` (autograd off, not training) each module adds its update into z's own storage
    (``add_update``), so a layer needs little more than z itself; otherwise each sum is a new tensor, as Boltz.
    """
    grid, rate, training = layer.grid, layer.dropout, layer.training
    n_tokens = grid.padding_for(z.shape[1], n_tokens)
    if training and rate > 0 and n_tokens is None:
        raise ValueError("dropout in training needs n_tokens (the true token count) to draw Boltz's masks")
    if inplace and not training and not torch.is_grad_enabled():
        z = layer.tri_mul_out.add_update(z, pair_mask)
        z = layer.tri_mul_in.add_update(z, pair_mask)
        z = layer.tri_att_start.add_update(z, pair_mask, chunk_size=chunk, n_tokens=n_tokens)
        z = layer.tri_att_end.add_update(z, pair_mask, chunk_size=chunk, n_tokens=n_tokens)
        return layer.transition_z.add_update(z)

    def drop(columnwise: bool = False):
        return dropout_mask(rate, z, training, grid, n_tokens or 0, columnwise)

    z = z + drop() * layer.tri_mul_out(z, mask=pair_mask)
    z = z + drop() * layer.tri_mul_in(z, mask=pair_mask)
    z = z + drop() * layer.tri_att_start(z, mask=pair_mask, chunk_size=chunk, n_tokens=n_tokens)
    z = z + drop(columnwise=True) * layer.tri_att_end(z, mask=pair_mask, chunk_size=chunk, n_tokens=n_tokens)
    return z + layer.transition_z(z)


class PairformerLayer(nn.Module):
    """One Pairformer layer: the pair stack on tiles, then the single track on replicated s."""

    def __init__(self, token_s: int, token_z: int, num_heads: int = 16, dropout: float = 0.25,
                 pairwise_head_width: int = 32, pairwise_num_heads: int = 4, post_layer_norm: bool = False,
                 v2: bool = True, *, grid: "ProcessGrid") -> None:
        super().__init__()
        if not v2:
            raise ValueError("only Boltz-2's Pairformer (v2=True) is implemented; boltz 2.2.1's v1 layer fails too")
        self.grid = grid
        self.token_z = token_z
        self.dropout = dropout
        self.num_heads = num_heads
        self.post_layer_norm = post_layer_norm
        self.pre_norm_s = nn.LayerNorm(token_s)
        self.attention = AttentionPairBias(token_s, token_z, num_heads, grid=grid)
        self.tri_mul_out = TriangleMultiplicationOutgoing(token_z, grid=grid)
        self.tri_mul_in = TriangleMultiplicationIncoming(token_z, grid=grid)
        self.tri_att_start = TriangleAttentionStartingNode(token_z, pairwise_head_width, pairwise_num_heads,
                                                           inf=1e9, grid=grid)
        self.tri_att_end = TriangleAttentionEndingNode(token_z, pairwise_head_width, pairwise_num_heads,
                                                       inf=1e9, grid=grid)
        self.transition_s = Transition(token_s, token_s * 4)
        self.transition_z = Transition(token_z, token_z * 4)
        self.s_post_norm = nn.LayerNorm(token_s) if post_layer_norm else nn.Identity()

    def forward(self, s: Tensor, z: Tensor, mask: Tensor, pair_mask: Tensor,
                chunk_size_tri_attn: Optional[int] = None, use_kernels: bool = False,
                inplace: bool = False) -> tuple[Tensor, Tensor]:
        """s: [B, N, C_s] replicated; z: [B, N_i, N_j, C_z] pair tile (row-block r, col-block c);
        mask: [B, N] replicated; pair_mask: [B, N_i, N_j] pair tile. returns (s, z) placed as given.
        inplace: z may be overwritten (see :func:`_pair_stack`).
        """
        z = _pair_stack(self, z, pair_mask, chunk_size_tri_attn, mask.shape[1], inplace)
        return self.single_track(s, z, mask), z

    def single_track(self, s: Tensor, z: Tensor, mask: Tensor) -> Tensor:
        """The sequence stack after the pair stack, in float32 with autocast off (as Boltz's layer): attention
        with pair bias from z, transition, post-norm. s: [B, N, C_s] replicated; z: pair tile; mask: [B, N]
        replicated; returns the new s, replicated."""
        with torch.autocast("cuda", enabled=False):
            s_normed = self.pre_norm_s(at_least_f32(s))
            # z in its own dtype: the pair bias reads it in one pass (or converts it a few rows at a time)
            s = at_least_f32(s) + self.attention(s=s_normed, z=z, mask=at_least_f32(mask), k_in=s_normed)
            s = s + self.transition_s(s)
            return self.s_post_norm(s)


class PairformerModule(nn.Module):
    """``num_blocks`` Pairformer layers on the grid; same constructor arguments as Boltz's plus ``grid``."""

    def __init__(self, token_s: int, token_z: int, num_blocks: int, num_heads: int = 16, dropout: float = 0.25,
                 pairwise_head_width: int = 32, pairwise_num_heads: int = 4, post_layer_norm: bool = False,
                 activation_checkpointing: bool = False, v2: bool = True, *, grid: "ProcessGrid", **kwargs) -> None:
        super().__init__()
        self.grid = grid
        self.token_z = token_z
        self.num_blocks = num_blocks
        self.dropout = dropout
        self.num_heads = num_heads
        self.post_layer_norm = post_layer_norm
        self.activation_checkpointing = activation_checkpointing
        self.layers = nn.ModuleList(
            PairformerLayer(token_s, token_z, num_heads, dropout, pairwise_head_width, pairwise_num_heads,
                            post_layer_norm, v2, grid=grid)
            for _ in range(num_blocks)
        )

    def forward(self, s: Tensor, z: Tensor, mask: Tensor, pair_mask: Tensor, use_kernels: bool = False,
                start_block: int = 0, on_block: Optional[Callable[[int, Tensor, Tensor], None]] = None,
                inplace: bool = False) -> tuple[Tensor, Tensor]:
        """s: [B, N, C_s] replicated; z: [B, N_i, N_j, C_z] pair tile; mask: [B, N]; pair_mask: [B, N_i, N_j] tile.

        start_block: the blocks before it are taken as done (s, z are their output: a resumed run);
        on_block(done, s, z): called after each block with the number of blocks done (checkpoints, signals);
        inplace: the caller gives z up: in inference the layers then update it in its own storage.
        """
        chunk = tri_attn_chunk_size(mask.shape[1], self.training)
        for index in range(start_block, self.num_blocks):
            layer = self.layers[index]
            if self.activation_checkpointing and self.training:
                s, z = torch.utils.checkpoint.checkpoint(layer, s, z, mask, pair_mask, chunk, use_reentrant=False)
            else:
                s, z = layer(s, z, mask, pair_mask, chunk, inplace=inplace)
            if on_block is not None:
                on_block(index + 1, s, z)
        return s, z


class PairformerNoSeqModule(nn.Module):
    """``num_blocks`` pair-only Pairformer layers on the grid (MSA and template modules)."""

    def __init__(self, token_z: int, num_blocks: int, dropout: float = 0.25, pairwise_head_width: int = 32,
                 pairwise_num_heads: int = 4, post_layer_norm: bool = False, activation_checkpointing: bool = False,
                 *, grid: "ProcessGrid", **kwargs) -> None:
        super().__init__()
        self.grid = grid
        self.token_z = token_z
        self.num_blocks = num_blocks
        self.dropout = dropout
        self.post_layer_norm = post_layer_norm
        self.activation_checkpointing = activation_checkpointing
        self.layers = nn.ModuleList(
            PairformerNoSeqLayer(token_z, dropout, pairwise_head_width, pairwise_num_heads, post_layer_norm, grid=grid)
            for _ in range(num_blocks)
        )

    def forward(self, z: Tensor, pair_mask: Tensor, use_kernels: bool = False, n_tokens: Optional[int] = None,
                inplace: bool = False) -> Tensor:
        """z: [B, N_i, N_j, C_z] pair tile; pair_mask: [B, N_i, N_j] tile; n_tokens: the true N (default: the N
        recorded by the grid's ``scatter_pair``); inplace: the caller gives z up (see :func:`_pair_stack`)."""
        exact_n = self.grid.padding_for(z.shape[1], n_tokens)
        chunk = tri_attn_chunk_size(z.shape[1] * self.grid.p if exact_n is None else exact_n, self.training)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                z = torch.utils.checkpoint.checkpoint(layer, z, pair_mask, chunk, False, exact_n, use_reentrant=False)
            else:
                z = layer(z, pair_mask, chunk, False, exact_n, inplace=inplace)
        return z
