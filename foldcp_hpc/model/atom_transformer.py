"""Boltz-2's atom transformer (AF3 Algorithms 7, 23, 25, 26) on atom windows split over the grid.

Each rank owns a contiguous run of 32-atom query windows (:class:`~foldcp_hpc.distributed.atom_layout.
AtomWindowLayout`); window k attends to the 128 atoms ``[32k - 48, 32k + 80)``. Per layer the conditioned
atoms ``b = adaln(a, c)`` are extended by the 48-atom halo on each side (:func:`~foldcp_hpc.distributed.
autograd.halo_extend`: point-to-point from the owners) and cut into overlapping key windows with
``unfold``; everything else is per atom or per window, so local. Parameter names are Boltz's
(``diffusion_transformer.layers.{i}...``), so Boltz state dicts load strictly.

Letters: B batch, M atoms (own: m), W windows (own: w), Q queries per window (32), K keys per window (128),
H heads, D head width, C channels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..distributed.autograd import halo_extend
from .common import at_least_f32

if TYPE_CHECKING:
    from ..distributed.atom_layout import AtomWindowLayout
    from ..distributed.grid import ProcessGrid

__all__ = ["AdaLN", "ConditionedTransitionBlock", "WindowAttention", "AtomTransformer", "key_windows"]

MASK_INF = 1e6  # Boltz's AttentionPairBias(inf=1e6)


def key_windows(extended: Tensor, layout: "AtomWindowLayout", dim: int = 1) -> Tensor:
    """Key windows of halo-extended atoms.

    extended: [B, m + 2 halo, *C] atoms ``[a0 - halo, a1 + halo)`` along ``dim`` 1.
    returns: [B, w, K, *C] (window i of this rank reads extended atoms ``[Q i, Q i + K)``).
    """
    if dim != 1:
        raise ValueError(f"key_windows expects atoms along dim 1, got dim {dim}")
    if extended.shape[1] < layout.keys:  # a rank with no window (fewer windows than ranks): only its halos
        return extended.new_empty((extended.shape[0], 0, layout.keys, *extended.shape[2:]))
    windows = extended.unfold(1, layout.keys, layout.queries)  # [B, w, *C, K]
    return windows.movedim(-1, 2)  # [B,w,*C,K] -> [B,w,K,*C]


class AdaLN(nn.Module):
    """Adaptive LayerNorm (AF3 Algorithm 26): sigmoid(s_scale(norm s)) * norm(a) + s_bias(norm s)."""

    def __init__(self, dim: int, dim_single_cond: int) -> None:
        super().__init__()
        self.a_norm = nn.LayerNorm(dim, elementwise_affine=False, bias=False)
        self.s_norm = nn.LayerNorm(dim_single_cond, bias=False)
        self.s_scale = nn.Linear(dim_single_cond, dim)
        self.s_bias = nn.Linear(dim_single_cond, dim, bias=False)

    def forward(self, a: Tensor, s: Tensor) -> Tensor:
        s = self.s_norm(s)
        return torch.sigmoid(self.s_scale(s)) * self.a_norm(a) + self.s_bias(s)


class _SwiGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gates = x.chunk(2, dim=-1)
        return nn.functional.silu(gates) * x


class ConditionedTransitionBlock(nn.Module):
    """AF3 Algorithm 25: a SwiGLU transition conditioned on s through AdaLN and a sigmoid output gate."""

    def __init__(self, dim_single: int, dim_single_cond: int, expansion_factor: int = 2) -> None:
        super().__init__()
        self.adaln = AdaLN(dim_single, dim_single_cond)
        dim_inner = int(dim_single * expansion_factor)
        self.swish_gate = nn.Sequential(nn.Linear(dim_single, dim_inner * 2, bias=False), _SwiGLU())
        self.a_to_b = nn.Linear(dim_single, dim_inner, bias=False)
        self.b_to_a = nn.Linear(dim_inner, dim_single, bias=False)
        self.output_projection = nn.Sequential(nn.Linear(dim_single_cond, dim_single), nn.Sigmoid())

    def forward(self, a: Tensor, s: Tensor) -> Tensor:
        a = self.adaln(a, s)
        b = self.swish_gate(a) * self.a_to_b(a)
        return self.output_projection(s) * self.b_to_a(b)


class WindowAttention(nn.Module):
    """Gated attention of each query window over its key window, with a given per-window bias.

    Boltz's ``AttentionPairBias(c_s, num_heads=heads, compute_pair_bias=False)``, parameter for parameter.
    """

    def __init__(self, c_s: int, num_heads: int) -> None:
        super().__init__()
        if c_s % num_heads:
            raise ValueError(f"attention width {c_s} is not divisible by {num_heads} heads")
        self.c_s, self.num_heads, self.head_dim = c_s, num_heads, c_s // num_heads
        self.proj_q = nn.Linear(c_s, c_s)
        self.proj_k = nn.Linear(c_s, c_s, bias=False)
        self.proj_v = nn.Linear(c_s, c_s, bias=False)
        self.proj_g = nn.Linear(c_s, c_s, bias=False)
        self.proj_o = nn.Linear(c_s, c_s, bias=False)

    def forward(self, s: Tensor, k_in: Tensor, bias: Tensor, key_mask: Tensor) -> Tensor:
        """s: [B, w, Q, C] queries; k_in: [B, w, K, C] keys; bias: [B, w, Q, K, H]; key_mask: [B, w, K].

        returns: [B, w, Q, C].
        """
        batch, n_win, n_q, _ = s.shape
        heads, width = self.num_heads, self.head_dim
        q = self.proj_q(s).view(batch, n_win, n_q, heads, width)
        n_k = k_in.shape[2]  # explicit sizes: a rank with no window has zero-size tensors
        k = self.proj_k(k_in).view(batch, n_win, n_k, heads, width)
        v = self.proj_v(k_in).view(batch, n_win, n_k, heads, width)
        g = torch.sigmoid(self.proj_g(s))
        # logits and softmax in at least float32, as Boltz does under autocast
        logits = torch.einsum("bwqhd,bwkhd->bwhqk", at_least_f32(q), at_least_f32(k)) / (width ** 0.5)
        logits = logits + at_least_f32(bias).permute(0, 1, 4, 2, 3)  # [B,w,Q,K,H] -> [B,w,H,Q,K]
        logits = logits + (1 - at_least_f32(key_mask)[:, :, None, None, :]) * -MASK_INF
        weights = logits.softmax(dim=-1)
        o = torch.einsum("bwhqk,bwkhd->bwqhd", weights, at_least_f32(v)).to(v.dtype)
        return self.proj_o(g * o.reshape(batch, n_win, n_q, self.c_s))


class AtomTransformerLayer(nn.Module):
    """Boltz's ``DiffusionTransformerLayer`` on windows (names kept: ``pair_bias_attn``, ``transition``...)."""

    def __init__(self, heads: int, dim: int, dim_single_cond: int, post_layer_norm: bool = False) -> None:
        super().__init__()
        self.adaln = AdaLN(dim, dim_single_cond)
        self.pair_bias_attn = WindowAttention(dim, heads)
        self.output_projection_linear = nn.Linear(dim_single_cond, dim)
        self.output_projection = nn.Sequential(self.output_projection_linear, nn.Sigmoid())
        self.transition = ConditionedTransitionBlock(dim, dim_single_cond)
        self.post_lnorm = nn.LayerNorm(dim) if post_layer_norm else nn.Identity()

    def forward(self, a: Tensor, s: Tensor, bias: Tensor, key_mask: Tensor, grid: "ProcessGrid",
                layout: "AtomWindowLayout") -> Tensor:
        """a, s: [B, m, C] own atoms; bias: [B, w, Q, K, H]; key_mask: [B, w, K]. returns [B, m, C]."""
        batch, n_atoms, dim = a.shape
        n_win = n_atoms // layout.queries
        b = self.adaln(a, s)
        keys = key_windows(halo_extend(b, grid, layout), layout)  # [B, w, K, C]
        queries = b.view(batch, n_win, layout.queries, dim)
        b = self.pair_bias_attn(queries, keys, bias, key_mask).reshape(batch, n_atoms, dim)
        a = a + self.output_projection(s) * b
        a = a + self.transition(a, s)
        return self.post_lnorm(a)


class _Layers(nn.Module):
    """Holds the layers under Boltz's name ``diffusion_transformer.layers``."""

    def __init__(self, layers: list[AtomTransformerLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class AtomTransformer(nn.Module):
    """Boltz's ``AtomTransformer`` (Algorithm 7) on this rank's windows.

    Args as Boltz's: ``depth`` layers of ``heads`` heads over atoms of width ``dim`` conditioned on atoms of
    width ``dim_single_cond``; ``attn_window_queries`` / ``attn_window_keys`` must match the layout's.
    """

    def __init__(self, attn_window_queries: int, attn_window_keys: int, depth: int, heads: int, dim: int,
                 dim_single_cond: int | None = None, post_layer_norm: bool = False,
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.attn_window_queries, self.attn_window_keys = attn_window_queries, attn_window_keys
        self.heads = heads
        cond = dim if dim_single_cond is None else dim_single_cond
        self.diffusion_transformer = _Layers([AtomTransformerLayer(heads, dim, cond, post_layer_norm)
                                              for _ in range(depth)])

    def forward(self, q: Tensor, c: Tensor, bias: Tensor, key_mask: Tensor, grid: "ProcessGrid",
                layout: "AtomWindowLayout") -> Tensor:
        """q: [B, m, C] own atoms; c: [B, m, C_c] own atoms' conditioning; bias: [B, w, Q, K, depth * H] (layer
        l uses channels ``[l H, (l + 1) H)``, as Boltz splits it); key_mask: [B, w, K] 1 on real key atoms.

        returns: [B, m, C].
        """
        if (layout.queries, layout.keys) != (self.attn_window_queries, self.attn_window_keys):
            raise ValueError(f"atom layout windows {layout.queries}x{layout.keys} differ from the module's "
                             f"{self.attn_window_queries}x{self.attn_window_keys}")
        layers = self.diffusion_transformer.layers
        bias = bias.unflatten(-1, (len(layers), self.heads))  # [B,w,Q,K,L*H] -> [B,w,Q,K,L,H]
        for index, layer in enumerate(layers):
            q = layer(q, c, bias[..., index, :], key_mask, grid, layout)
        return q
