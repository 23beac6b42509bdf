"""Boltz-2's score model (``modules/diffusionv2.DiffusionModule``) on the grid: one denoising network call.

    s = SingleConditioning(times, s_trunk, s_inputs)                     token sub-block [B m, N/p², 2 C_s]
    a, q, c = AtomAttentionEncoder(conditioning, r)                      own atom windows -> a [B m, N, 2 C_s]
    a = TokenTransformer(a + W s, s, token_trans_bias tiles)             token sub-blocks, bias from the tiles
    r_update = AtomAttentionDecoder(a_norm(a), q, c)                     own atoms (a gathered once)

Token-wise work runs on this rank's token sub-block (:mod:`~foldcp_hpc.model.token_blocks`); the token
transformer's attention scores query block r against key block c on the rank holding that tile of the
precomputed bias, and combines partial softmaxes along grid rows
(:meth:`~foldcp_hpc.model.attention.AttentionPairBias.row_attention`). Parameter names are Boltz's
(``structure_module.score_model.*``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .atom_encoder import AtomAttentionDecoder, AtomAttentionEncoder
from .atom_transformer import AdaLN, ConditionedTransitionBlock
from .attention import AttentionPairBias
from .common import repeat_samples
from ..distributed import autograd as cp
from .token_blocks import col_block, gather_subs, row_block, sub_of_row, to_sub
from .pair_init import FourierEmbedding
from .transition import Transition

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid
    from .diffusion_conditioning import Conditioning

__all__ = ["SingleConditioning", "TokenTransformer", "DiffusionModule"]


class SingleConditioning(nn.Module):
    """AF3 Algorithm 21 (single part): [s_trunk, s_inputs] embedded, plus the noise level's Fourier features."""

    def __init__(self, sigma_data: float, token_s: int = 384, dim_fourier: int = 256, num_transitions: int = 2,
                 transition_expansion_factor: int = 2, eps: float = 1e-20, disable_times: bool = False) -> None:
        super().__init__()
        self.eps, self.sigma_data, self.disable_times = eps, sigma_data, disable_times
        self.norm_single = nn.LayerNorm(2 * token_s)
        self.single_embed = nn.Linear(2 * token_s, 2 * token_s)
        if not disable_times:
            self.fourier_embed = FourierEmbedding(dim_fourier)
            self.norm_fourier = nn.LayerNorm(dim_fourier)
            self.fourier_to_single = nn.Linear(dim_fourier, 2 * token_s, bias=False)
        self.transitions = nn.ModuleList([Transition(dim=2 * token_s, hidden=transition_expansion_factor * 2 * token_s)
                                          for _ in range(num_transitions)])

    def forward(self, times: Tensor, s_trunk: Tensor, s_inputs: Tensor) -> Tensor:
        """times: [B]; s_trunk, s_inputs: [B, N, C_s] replicated. returns [B, N, 2 C_s] replicated."""
        s = self.single_embed(self.norm_single(torch.cat([s_trunk, s_inputs], dim=-1)))
        if not self.disable_times:
            fourier = self.norm_fourier(self.fourier_embed(times))  # [B, dim_fourier]
            s = self.fourier_to_single(fourier)[:, None, :] + s
        for transition in self.transitions:
            s = transition(s) + s
        return s




class TokenTransformerLayer(nn.Module):
    """Boltz's ``DiffusionTransformerLayer`` at token level: the attention bias is a tile of the precomputed
    token-transformer bias."""

    def __init__(self, heads: int, dim: int, dim_single_cond: int, post_layer_norm: bool = False, *,
                 grid: "ProcessGrid") -> None:
        super().__init__()
        self.adaln = AdaLN(dim, dim_single_cond)
        self.pair_bias_attn = AttentionPairBias(c_s=dim, num_heads=heads, compute_pair_bias=False, grid=grid)
        self.output_projection_linear = nn.Linear(dim_single_cond, dim)
        self.output_projection = nn.Sequential(self.output_projection_linear, nn.Sigmoid())
        self.transition = ConditionedTransitionBlock(dim, dim_single_cond)
        self.post_lnorm = nn.LayerNorm(dim) if post_layer_norm else nn.Identity()

    def forward(self, a: Tensor, s: Tensor, bias: Tensor, key_mask: Tensor, multiplicity: int, n_tokens: int) -> Tensor:
        """a, s: [B m, w, C] this rank's token sub-block (:mod:`~foldcp_hpc.model.token_blocks`); bias:
        [B, n, n, H] pair tile; key_mask: [B m, n] token mask of column block c. returns [B m, w, C] (sub-block).

        The attention reads the row block r and the column block c of the conditioned activations (one row
        all-gather, one mirror exchange); everything token-wise runs on the sub-block.
        """
        grid = self.pair_bias_attn.grid
        attn = self.pair_bias_attn
        b = self.adaln(a, s)
        b_rows = row_block(b, grid, n_tokens)
        o = attn.row_attention(b_rows, col_block(b_rows, grid), bias, key_mask, n_tokens, multiplicity)
        b = attn.proj_o(attn.proj_g(b).sigmoid() * sub_of_row(o, grid, n_tokens))
        a = a + self.output_projection(s) * b
        a = a + self.transition(a, s)
        return self.post_lnorm(a)


class TokenTransformer(nn.Module):
    """Boltz's ``DiffusionTransformer`` with pair bias, at token level, on the grid (parameter names kept)."""

    def __init__(self, depth: int, heads: int, dim: int = 384, dim_single_cond: int | None = None,
                 pair_bias_attn: bool = True, activation_checkpointing: bool = False, post_layer_norm: bool = False,
                 *, grid: "ProcessGrid") -> None:
        super().__init__()
        if not pair_bias_attn:
            raise ValueError("Boltz-2's token transformer attends with pair bias; pair_bias_attn=False is not used")
        cond = dim if dim_single_cond is None else dim_single_cond
        self.heads = heads
        self.layers = nn.ModuleList([TokenTransformerLayer(heads, dim, cond, post_layer_norm, grid=grid)
                                     for _ in range(depth)])

    def forward(self, a: Tensor, s: Tensor, bias: Tensor, mask: Tensor, multiplicity: int = 1,
                n_tokens: int | None = None) -> Tensor:
        """a, s: [B m, w, C] token sub-blocks; bias: [B, n, n, depth x heads] pair tile (layer l: channels
        [l H, (l + 1) H), as Boltz views it); mask: [B m, N]; n_tokens: N (default: mask's)."""
        n_tokens = mask.shape[1] if n_tokens is None else n_tokens
        bias = bias.unflatten(-1, (len(self.layers), self.heads))  # [B,n,n,L*H] -> [B,n,n,L,H]
        key_mask = cp.scatter_tokens(mask, self.layers[0].pair_bias_attn.grid, by="col")  # [B m, n] block c
        for index, layer in enumerate(self.layers):
            a = layer(a, s, bias[..., index, :], key_mask, multiplicity, n_tokens)
        return a


class DiffusionModule(nn.Module):
    """Boltz-2's score model on the grid (same constructor arguments plus ``grid``)."""

    def __init__(self, token_s: int, atom_s: int, atoms_per_window_queries: int = 32,
                 atoms_per_window_keys: int = 128, sigma_data: int = 16, dim_fourier: int = 256,
                 atom_encoder_depth: int = 3, atom_encoder_heads: int = 4, token_transformer_depth: int = 24,
                 token_transformer_heads: int = 8, atom_decoder_depth: int = 3, atom_decoder_heads: int = 4,
                 conditioning_transition_layers: int = 2, activation_checkpointing: bool = False,
                 transformer_post_ln: bool = False, *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.sigma_data = sigma_data
        self.single_conditioner = SingleConditioning(sigma_data=sigma_data, token_s=token_s, dim_fourier=dim_fourier,
                                                     num_transitions=conditioning_transition_layers)
        self.atom_attention_encoder = AtomAttentionEncoder(
            atom_s=atom_s, token_s=token_s, atoms_per_window_queries=atoms_per_window_queries,
            atoms_per_window_keys=atoms_per_window_keys, atom_encoder_depth=atom_encoder_depth,
            atom_encoder_heads=atom_encoder_heads, structure_prediction=True,
            transformer_post_layer_norm=transformer_post_ln)
        self.s_to_a_linear = nn.Sequential(nn.LayerNorm(2 * token_s), nn.Linear(2 * token_s, 2 * token_s, bias=False))
        self.token_transformer = TokenTransformer(dim=2 * token_s, dim_single_cond=2 * token_s,
                                                  depth=token_transformer_depth, heads=token_transformer_heads,
                                                  grid=grid)
        self.a_norm = nn.LayerNorm(2 * token_s)
        self.atom_attention_decoder = AtomAttentionDecoder(
            atom_s=atom_s, token_s=token_s, attn_window_queries=atoms_per_window_queries,
            attn_window_keys=atoms_per_window_keys, atom_decoder_depth=atom_decoder_depth,
            atom_decoder_heads=atom_decoder_heads)

    def forward(self, s_inputs: Tensor, s_trunk: Tensor, r_noisy: Tensor, times: Tensor, token: dict[str, Tensor],
                atom: dict[str, Tensor], conditioning: "Conditioning", multiplicity: int = 1) -> Tensor:
        """s_inputs, s_trunk: [B, N, C_s] replicated; r_noisy: [B m, m_own, 3] this rank's atoms (scaled noisy
        coordinates); times: [B m]; token / atom: replicated 1-D features; conditioning: from
        :class:`~foldcp_hpc.model.diffusion_conditioning.DiffusionConditioning`.

        returns r_update: [B m, m_own, 3] this rank's atoms.
        """
        grid, cond = self.grid, conditioning
        n_tokens = s_trunk.shape[1]
        # token-wise work on this rank's token sub-block (1/p² of the tokens); gathered once, for the decoder
        s = self.single_conditioner(times, repeat_samples(to_sub(s_trunk, grid), multiplicity),
                                    repeat_samples(to_sub(s_inputs, grid), multiplicity))
        a, q_skip, c_skip = self.atom_attention_encoder(cond.q, cond.c, cond.atom_enc_bias, cond.key_mask, atom,
                                                        n_tokens, grid, cond.layout, r=r_noisy,
                                                        multiplicity=multiplicity)
        a = to_sub(a, grid) + self.s_to_a_linear(s)
        mask = repeat_samples(token["token_pad_mask"], multiplicity)
        a = self.token_transformer(a, s=s, bias=cond.token_trans_bias, mask=mask, multiplicity=multiplicity,
                                   n_tokens=n_tokens)
        a = gather_subs(self.a_norm(a), grid, n_tokens)
        return self.atom_attention_decoder(a, q_skip, c_skip, cond.atom_dec_bias, cond.key_mask, atom, grid,
                                           cond.layout, multiplicity=multiplicity)
