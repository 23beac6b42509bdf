"""Boltz-2's EDM sampler (``modules/diffusionv2.AtomDiffusion.sample``) around the distributed score model.

The atom coordinates ([samples, M, 3], O(M)) are replicated: every rank draws the same random numbers from
its own generator, seeded alike, in Boltz's order (initial noise; per step a random rotation, a random
translation, then the step noise), so all ranks hold identical coordinates without communicating them. Per
step each rank runs the score model for its atom windows; the coordinate updates of all windows are then
gathered (:func:`~foldcp_hpc.distributed.autograd.gather_atoms`, O(M)). The schedule, the preconditioning,
the noise, the rigid alignment of the noisy coordinates onto the denoised ones and the update are Boltz's, in
its precisions (the schedule in float32, the alignment's SVD in float32).

Not implemented: Boltz's inference-time steering (FK steering, physical and contact guidance potentials);
:class:`AtomDiffusion` refuses to run where the job asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import sqrt
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..distributed import collectives as raw
from ..distributed.autograd import gather_atoms
from ..distributed.layout import replica_share
from .diffusion import DiffusionModule
from .graphed import GraphedCall

if TYPE_CHECKING:
    from ..distributed.atom_layout import AtomWindowLayout
    from ..distributed.grid import ProcessGrid
    from .diffusion_conditioning import Conditioning

__all__ = ["AtomDiffusion", "random_rotations", "weighted_rigid_align"]


def random_rotations(n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n, 3, 3] uniformly random rotations from random unit quaternions (real part >= 0), drawn as Boltz does."""
    o = torch.randn((n, 4), dtype=dtype, device=device, generator=generator)
    norm = torch.sqrt((o * o).sum(1))
    o = o / torch.where((norm < 0) != (o[:, 0] < 0), -norm, norm)[:, None]
    r, i, j, k = torch.unbind(o, -1)
    two_s = 2.0 / (o * o).sum(-1)
    matrix = torch.stack((1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
                          two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
                          two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j)), -1)
    return matrix.reshape(o.shape[:-1] + (3, 3))


def weighted_rigid_align(true_coords: Tensor, pred_coords: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """``true_coords`` rigidly moved onto ``pred_coords`` (weighted Kabsch, AF3 Algorithm 28), as Boltz computes it:
    the covariance's SVD and the determinant in float32. true/pred: [B, M, 3]; weights, mask: [B, M]."""
    w = (mask * weights).unsqueeze(-1)
    true_centroid = (true_coords * w).sum(dim=-2, keepdim=True) / w.sum(dim=-2, keepdim=True)
    pred_centroid = (pred_coords * w).sum(dim=-2, keepdim=True) / w.sum(dim=-2, keepdim=True)
    true_centered = true_coords - true_centroid
    pred_centered = pred_coords - pred_centroid
    # the contractions are spelled as Boltz spells them: torch.einsum may order a three-operand product
    # differently for other spellings, which in float32 moves the result by an ulp
    cov = torch.einsum("...ni,...nj->...ij", w * pred_centered, true_centered)
    u, _, vh = torch.linalg.svd(cov.to(torch.float32), driver="gesvd" if cov.is_cuda else None)
    v = vh.mH
    rot = torch.einsum("...ij,...kj->...ik", u, v).to(torch.float32)
    f = torch.eye(3, dtype=torch.float32, device=cov.device)[None].repeat(cov.shape[0], 1, 1)
    f[..., -1, -1] = torch.det(rot)
    rot = torch.einsum("...ij,...jk,...lk->...il", u, f, v).to(cov.dtype)
    return torch.einsum("...ni,...ji->...nj", true_centered, rot) + pred_centroid


class AtomDiffusion(nn.Module):
    """Boltz-2's ``AtomDiffusion`` at inference: holds the score model (``score_model``) and samples.

    Constructor arguments as Boltz's (``score_model_args`` and the ``diffusion_process_args``), plus ``grid``.
    """

    def __init__(self, score_model_args: dict[str, Any], num_sampling_steps: int = 5, sigma_min: float = 0.0004,
                 sigma_max: float = 160.0, sigma_data: float = 16.0, rho: float = 7, P_mean: float = -1.2,
                 P_std: float = 1.5, gamma_0: float = 0.8, gamma_min: float = 1.0, noise_scale: float = 1.003,
                 step_scale: float = 1.5, step_scale_random: Optional[list] = None,
                 coordinate_augmentation: bool = True, coordinate_augmentation_inference: Optional[bool] = None,
                 compile_score: bool = False, alignment_reverse_diff: bool = False,
                 synchronize_sigmas: bool = False, *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.score_model = DiffusionModule(**score_model_args, grid=grid)
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = sigma_min, sigma_max, sigma_data, rho
        self.num_sampling_steps = num_sampling_steps
        self.gamma_0, self.gamma_min = gamma_0, gamma_min
        self.noise_scale, self.step_scale = noise_scale, step_scale
        self.alignment_reverse_diff = alignment_reverse_diff

    # EDM preconditioning (Karras et al. 2022), Boltz's functions of sigma
    def c_skip(self, sigma: Tensor) -> Tensor:
        return (self.sigma_data**2) / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma * self.sigma_data / torch.sqrt(self.sigma_data**2 + sigma**2)

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1 / torch.sqrt(sigma**2 + self.sigma_data**2)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return torch.log((sigma / self.sigma_data).clamp(min=1e-20)) * 0.25

    def sample_schedule(self, num_sampling_steps: Optional[int] = None) -> Tensor:
        """[steps + 1] noise levels, float32 as in Boltz, ending at 0."""
        steps = self.num_sampling_steps if num_sampling_steps is None else num_sampling_steps
        inv_rho = 1 / self.rho
        index = torch.arange(steps, dtype=torch.float32)
        sigmas = (self.sigma_max**inv_rho + index / (steps - 1) * (self.sigma_min**inv_rho - self.sigma_max**inv_rho)
                  ) ** self.rho
        return nn.functional.pad(sigmas * self.sigma_data, (0, 1), value=0.0)

    def _step(self, noisy: Tensor, atom_mask: Tensor, t_hat: float, sigma_t: float, chunks: Sequence[Tensor],
              score: "_Score") -> Tensor:
        """One sampler step of the samples in ``noisy`` [S, M, 3] (replicated), denoised a chunk of sample
        indices at a time; atom_mask: [S, M]; score: see :meth:`denoise`. Returns their new coordinates
        [S, M, 3]."""
        denoised = torch.zeros_like(noisy)
        for chunk in chunks:
            denoised[chunk] = self.denoise(noisy[chunk], t_hat, score)
        if self.alignment_reverse_diff:
            mask = atom_mask.to(noisy.dtype)
            noisy = weighted_rigid_align(noisy, denoised, mask, mask).to(denoised)
        return noisy + self.step_scale * (sigma_t - t_hat) * ((noisy - denoised) / t_hat)

    def denoise(self, noisy: Tensor, sigma: float, score: "_Score") -> Tensor:
        """The preconditioned network: denoised coordinates [S, M, 3] (replicated) of noisy [S, M, 3].

        score(r_own, times): the score model on this rank's atoms r_own [S, m_own, 3] at noise levels times [S]
        (:meth:`scorer`); returns this rank's coordinate updates [S, m_own, 3].
        """
        samples = noisy.shape[0]
        sigma_t = torch.full((samples,), sigma, dtype=noisy.dtype, device=noisy.device)
        padded = sigma_t[:, None, None]  # [S] -> [S, 1, 1]
        layout = score.layout
        a0, a1 = layout.atoms(self.grid.axis("grid").index)
        r_own = (self.c_in(padded) * noisy)[:, a0:a1]
        update = gather_atoms(score(r_own, self.c_noise(sigma_t)), self.grid, layout)
        return self.c_skip(padded) * noisy + self.c_out(padded) * update

    def scorer(self, s_inputs: Tensor, s_trunk: Tensor, token: dict[str, Tensor], atom: dict[str, Tensor],
               conditioning: "Conditioning", cuda_graphs: bool = True) -> "_Score":
        """The score model with everything but the noisy atoms and the noise levels bound: ``score(r_own,
        times)``, with ``score.layout`` the atom windows. On a one-rank grid on CUDA without autograd (and
        ``cuda_graphs``) the calls after the second replay a CUDA graph (:mod:`.graphed`); elsewhere each call
        runs eagerly (collectives along the grid are not recorded)."""

        def call(r_own: Tensor, times: Tensor) -> Tensor:
            return self.score_model(s_inputs, s_trunk, r_own, times, token, atom, conditioning,
                                    multiplicity=r_own.shape[0])

        graphs = cuda_graphs and self.grid.axis("grid").size == 1 and s_trunk.is_cuda and not torch.is_grad_enabled()
        return _Score(GraphedCall(call, enabled=graphs), conditioning.layout)

    @torch.no_grad()
    def sample(self, s_inputs: Tensor, s_trunk: Tensor, token: dict[str, Tensor], atom: dict[str, Tensor],
               conditioning: "Conditioning", generator: torch.Generator, num_sampling_steps: Optional[int] = None,
               multiplicity: int = 1, max_parallel_samples: Optional[int] = None,
               on_step: Optional[Callable[[int, int, Tensor], None]] = None, start_step: int = 0,
               start_coords: Optional[Tensor] = None, cuda_graphs: bool = True) -> Tensor:
        """Sampled coordinates [multiplicity, M, 3], replicated on every rank of the grid.

        generator: every rank's must be seeded alike (same seed, same device type); ``on_step(step, steps,
        coords)`` is called after each step (progress, checkpoints). A resumed run passes the checkpoint's
        ``start_step`` (steps done), ``start_coords`` [multiplicity, M, 3] and a generator in the state saved there.
        cuda_graphs: replay the score model from a CUDA graph where :meth:`scorer` can (one-rank grids on CUDA).
        """
        steps = self.num_sampling_steps if num_sampling_steps is None else num_sampling_steps
        max_parallel_samples = multiplicity if max_parallel_samples is None else max_parallel_samples
        atom_mask = atom["atom_pad_mask"].repeat_interleave(multiplicity, 0)
        dtype, device = s_trunk.dtype, s_trunk.device
        shape = (*atom_mask.shape, 3)
        sigmas = self.sample_schedule(steps)
        gammas = torch.where(sigmas > self.gamma_min, self.gamma_0, 0.0)  # torch's default dtype, as in Boltz
        if start_coords is None:
            coords = sigmas[0] * torch.randn(shape, dtype=dtype, device=device, generator=generator)
        else:
            coords = start_coords.to(dtype=dtype, device=device)
        score = self.scorer(s_inputs, s_trunk, token, atom, conditioning, cuda_graphs)
        for step, (sigma_tm, sigma_t, gamma) in enumerate(zip(sigmas[:-1], sigmas[1:], gammas[1:])):
            if step < start_step:
                continue
            rotation = random_rotations(multiplicity, generator, dtype, device)
            translation = torch.randn((multiplicity, 1, 3), dtype=dtype, device=device, generator=generator)
            coords = coords - coords.mean(dim=-2, keepdim=True)
            coords = torch.einsum("bmd,bds->bms", coords, rotation) + translation
            sigma_tm, sigma_t, gamma = sigma_tm.item(), sigma_t.item(), gamma.item()
            t_hat = sigma_tm * (1 + gamma)
            noise_var = self.noise_scale**2 * (t_hat**2 - sigma_tm**2)
            eps = sqrt(noise_var) * torch.randn(shape, dtype=dtype, device=device, generator=generator)
            noisy = coords + eps
            step_args = (t_hat, sigma_t)
            if self.grid.dp == 1:  # Boltz's chunks: multiplicity % max_parallel_samples + 1 of them
                chunks = torch.arange(multiplicity).chunk(multiplicity % max_parallel_samples + 1)
                coords = self._step(noisy, atom_mask, *step_args, chunks, score)
            else:
                # dp replicas: every replica drew every sample's noise above (the generators stay in step); it
                # steps its replica_share of the samples, and each share travels along the replica axis: the
                # same values as one replica stepping all samples, since every sample's step is its own
                own = replica_share(multiplicity, self.grid.dp, self.grid.replica)
                coords = noisy.clone()
                if len(own):
                    rows = slice(own.start, own.stop)
                    chunks = torch.arange(len(own)).split(max_parallel_samples)
                    coords[rows] = self._step(noisy[rows], atom_mask[rows], *step_args, chunks, score)
                coords = share_samples(coords, self.grid)
            if on_step is not None:
                on_step(step + 1, steps, coords)
        score.call.release()
        return coords


@dataclass
class _Score:
    """The bound score model (:meth:`AtomDiffusion.scorer`) and the atom windows it scores."""

    call: GraphedCall
    layout: "AtomWindowLayout"

    def __call__(self, r_own: Tensor, times: Tensor) -> Tensor:
        return self.call(r_own, times)


def share_samples(values: Tensor, grid: "ProcessGrid") -> Tensor:
    """Each replica's share of the samples, to every replica: values [S, ...] whose rows of
    ``replica_share(S, dp, k)`` are right on replica k; returns [S, ...] right everywhere (one broadcast per
    share along the replica axis). forward only (inference)."""
    samples = values.shape[0]
    for owner in range(grid.dp):
        rows = replica_share(samples, grid.dp, owner)
        if len(rows):
            values[rows.start:rows.stop] = raw.broadcast(values[rows.start:rows.stop].contiguous(), grid, "replica",
                                                         src=owner)
    return values
