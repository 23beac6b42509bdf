"""The whole Boltz-2 model on the grid: trunk, diffusion conditioning, sampler, confidence and (with an affinity
checkpoint's hyper-parameters) affinity, run as ``Boltz2.forward`` runs them at inference (``boltz predict``:
confidence one sample at a time; affinity on the sample with the best ipTM).

``FoldModel.load_boltz_state`` takes a Boltz-2 state dict (a checkpoint's, or ``Boltz2(...)``'s random one)
and loads it strictly; the only Boltz-2 parameters not used are the b-factor head's (``bfactor_module.*``:
Boltz-2 predicts b-factors but writes none of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import torch
from torch import Tensor, nn

from ..data.boltz2_hparams import diffusion_conditioning_args
from ..distributed.autograd import gather_pair
from ..distributed.layout import replica_share
from .affinity import AffinityModule, affinity_outputs, cross_pair_mask
from .confidence import ConfidenceModule, SampleConfidence, share_confidences
from .diffusion_conditioning import DiffusionConditioning
from .sampler import AtomDiffusion
from .trunk import Trunk, TrunkOutput, TrunkPosition

if TYPE_CHECKING:
    from ..data.features import Features
    from ..distributed.grid import ProcessGrid

__all__ = ["FoldModel", "Prediction", "ResumePoint", "PredictHooks", "UNUSED_BOLTZ_PREFIXES"]

UNUSED_BOLTZ_PREFIXES = ("bfactor_module.",)


@dataclass
class Prediction:
    """What a run produces, on every rank.

    coords: [samples, M, 3] replicated; trunk: the trunk's output (tiles); confidence: one
    :class:`~foldcp_hpc.model.confidence.SampleConfidence` per sample (tiles and replicated values); pae, pde:
    [samples, N, N] gathered only when asked for (the output path), else None; affinity: Boltz-2's affinity
    outputs (``affinity_pred_value``, ``affinity_probability_binary`` and, for the ensemble, the same suffixed
    1 and 2; each [1, 1] replicated) when the model predicts affinity, else None.
    """

    coords: Tensor
    trunk: TrunkOutput
    confidence: list[SampleConfidence]
    pae: Optional[Tensor] = None
    pde: Optional[Tensor] = None
    affinity: Optional[dict[str, Tensor]] = None


@dataclass
class ResumePoint:
    """Where a resumed :meth:`FoldModel.predict` starts (a checkpoint's content).

    stage "trunk": inside the trunk at ``position``; stage "sampling": the trunk is done (``position`` holds its
    final s and z) and the sampler has done ``sampling_step`` steps, leaving ``coords`` [S, M, 3] (replicated) and
    the generator in ``generator_state``.
    """

    stage: str
    position: TrunkPosition
    sampling_step: int = 0
    coords: Optional[Tensor] = None
    generator_state: Optional[Tensor] = None


class PredictHooks(Protocol):
    """What :meth:`FoldModel.predict` tells at the points where it can be resumed (checkpoints, walltime signals)."""

    def after_block(self, position: TrunkPosition) -> None: ...

    def after_step(self, step: int, steps: int, coords: Tensor, trunk: TrunkOutput,
                   generator: torch.Generator) -> None: ...


class FoldModel(nn.Module):
    """Boltz-2 on the grid, built from ``Boltz2``'s hyper-parameters; submodules named as Boltz-2's."""

    def __init__(self, hparams: dict[str, Any], *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        self.hparams = hparams
        token_s, token_z = hparams["token_s"], hparams["token_z"]
        self.trunk = Trunk(hparams, grid=grid)
        self.diffusion_conditioning = DiffusionConditioning(**diffusion_conditioning_args(hparams), grid=grid)
        score_model_args = {"token_s": token_s, "atom_s": hparams["atom_s"],
                            "atoms_per_window_queries": hparams["atoms_per_window_queries"],
                            "atoms_per_window_keys": hparams["atoms_per_window_keys"], **hparams["score_model_args"]}
        self.structure_module = AtomDiffusion(score_model_args, **hparams["diffusion_process_args"], grid=grid)
        self.confidence_prediction = hparams.get("confidence_prediction", True)
        if self.confidence_prediction:
            args = dict(hparams["confidence_model_args"])
            args["pairformer_args"] = dict(args["pairformer_args"])
            self.confidence_module = ConfidenceModule(
                token_s, token_z, token_level_confidence=hparams.get("token_level_confidence", True),
                bond_type_feature=hparams.get("bond_type_feature", False),
                fix_sym_check=hparams.get("fix_sym_check", False), cyclic_pos_enc=hparams.get("cyclic_pos_enc", False),
                conditioning_cutoff_min=hparams.get("conditioning_cutoff_min"),
                conditioning_cutoff_max=hparams.get("conditioning_cutoff_max"), **args, grid=grid)
        self.affinity_prediction = hparams.get("affinity_prediction", False)
        self.affinity_mw_correction = hparams.get("affinity_mw_correction", True)
        if self.affinity_prediction:
            if not self.confidence_prediction:
                raise ValueError("affinity_prediction needs confidence_prediction (Boltz-2 picks the sample by ipTM)")
            if hparams.get("affinity_ensemble", False):
                self.affinity_module1 = AffinityModule(token_s, token_z, **hparams["affinity_model_args1"], grid=grid)
                self.affinity_module2 = AffinityModule(token_s, token_z, **hparams["affinity_model_args2"], grid=grid)
            else:
                self.affinity_module = AffinityModule(token_s, token_z, **hparams["affinity_model_args"], grid=grid)
        steering = hparams.get("steering_args") or {}
        self.steering = [k for k in ("fk_steering", "physical_guidance_update", "contact_guidance_update")
                         if steering.get(k)]

    def load_boltz_state(self, state: dict[str, Tensor]) -> None:
        """Load a Boltz-2 state dict strictly (every parameter of ours from it; nothing of it unused but the
        b-factor head). Raises ValueError naming the missing or unexpected keys."""
        sources = {name: Trunk.boltz_name(name[len("trunk."):]) if name.startswith("trunk.") else name
                   for name in self.state_dict()}
        missing = [source for source in sources.values() if source not in state]
        if missing:
            raise ValueError(f"Boltz-2 state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
        mine = {name: state[source] for name, source in sources.items()}
        used = set(sources.values())
        unused = [k for k in state if k not in used and not k.startswith(UNUSED_BOLTZ_PREFIXES)]
        if unused:
            raise ValueError(f"{len(unused)} Boltz-2 parameters have no place in this model, e.g. {unused[:3]}")
        self.load_state_dict(mine, strict=True)

    @torch.no_grad()
    def predict(self, features: "Features", *, recycling_steps: int, sampling_steps: int, diffusion_samples: int,
                max_parallel_samples: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                gather_pae: bool = False, gather_pde: bool = False,
                progress: Optional[Callable[..., None]] = None, hooks: Optional[PredictHooks] = None,
                resume: Optional[ResumePoint] = None, cuda_graphs: bool = True) -> Prediction:
        """Fold one input: features in, coordinates and confidence out (see :class:`Prediction`).

        generator: seeded alike on every rank; progress(stage, done, total[, detail]) is called as stages advance;
        hooks: told after every Pairformer block and sampler step; resume: start from a checkpoint's point (the
        result equals the uninterrupted run's); cuda_graphs: replay the sampler's score model from a CUDA graph
        on a one-rank grid on CUDA (:meth:`~foldcp_hpc.model.sampler.AtomDiffusion.scorer`).
        """
        if self.steering:
            raise ValueError(f"inference-time steering ({', '.join(self.steering)}) is not implemented; "
                             "set the checkpoint's steering_args off")
        grid = self.grid
        device = grid.device
        report = progress or (lambda stage, done, total, detail="": None)
        token, atom = features.model_inputs(dtype, device)
        pair = {k: v[None].to(device) for k, v in features.pair_tile(grid.p, grid.row, grid.col).items()}
        template = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in features.template.items()}
        msa = {k: v.to(device) for k, v in features.msa_model_block(grid.p, grid.row, grid.col).items()}
        n_tokens = features.n_tokens

        blocks = self.trunk.pairformer_module.num_blocks
        total_blocks = (recycling_steps + 1) * blocks

        def after_block(position: TrunkPosition) -> None:
            report("trunk", position.recycle * blocks + position.blocks, total_blocks,
                   f"recycle {position.recycle + 1}/{recycling_steps + 1}, block {position.blocks}/{blocks}")
            if hooks is not None:
                hooks.after_block(position)

        if resume is None or resume.stage == "trunk":
            start = None if resume is None else resume.position
            report("trunk", 0 if start is None else start.recycle * blocks + start.blocks, total_blocks)
            trunk = self.trunk(token, atom, pair, template, msa, features.msa.n_rows, recycling_steps=recycling_steps,
                               start=start, on_block=after_block)
        else:
            trunk = self.trunk.output(self.trunk.input_embedder(token, atom), resume.position.s, resume.position.z)
        report("conditioning", 0, 1)
        rel = self.trunk.pair_init.relative_positions(token, n_tokens)
        conditioning = self.diffusion_conditioning(trunk.s, trunk.z, rel, token, atom)
        report("conditioning", 1, 1)

        def after_step(step: int, steps: int, coords: Tensor) -> None:
            report("sampling", step, steps)
            if hooks is not None:
                hooks.after_step(step, steps, coords, trunk, generator)

        start_step, start_coords = 0, None
        if resume is not None and resume.stage == "sampling":
            generator.set_state(resume.generator_state)
            start_step, start_coords = resume.sampling_step, resume.coords
        report("sampling", start_step, sampling_steps)
        coords = self.structure_module.sample(
            trunk.s_inputs, trunk.s, token, atom, conditioning, generator, num_sampling_steps=sampling_steps,
            multiplicity=diffusion_samples, max_parallel_samples=max_parallel_samples, on_step=after_step,
            start_step=start_step, start_coords=start_coords, cuda_graphs=cuda_graphs)
        del conditioning
        confidences, pae, pde = [], [], []
        if self.confidence_prediction:
            # dp replicas: each scores its share of the samples (as in sampling), then the shares are exchanged
            own = replica_share(diffusion_samples, grid.dp, grid.replica)
            report("confidence", 0, len(own))
            base = self.confidence_module.pair_base(trunk.s_inputs, trunk.z, token, pair) if len(own) else None
            for k in own:
                result = self.confidence_module(trunk.s_inputs, trunk.s, trunk.z, coords[k:k + 1], token, atom, pair,
                                                trunk.distogram[..., 0, :], z_base=base,
                                                consume_base=k == own.stop - 1)
                result.logits.clear()  # the logits tiles are not kept past the heads
                if k == own.stop - 1:
                    base = None  # its storage became the last sample's pair input
                confidences.append(result)
                report("confidence", k + 1 - own.start, len(own))
            if grid.dp > 1:
                confidences = share_confidences(confidences, grid, diffusion_samples)
            for result in confidences:
                if gather_pae:
                    pae.append(gather_pair(result.pae[..., None], grid, n_tokens)[..., 0])
                if gather_pde:
                    pde.append(gather_pair(result.pde[..., None], grid, n_tokens)[..., 0])
        affinity = None
        if self.affinity_prediction:
            report("affinity heads", 0, 1)
            affinity = self.predict_affinity(features, token, atom, trunk, coords, confidences)
            report("affinity heads", 1, 1)
        return Prediction(coords=coords, trunk=trunk, confidence=confidences,
                          pae=torch.cat(pae) if pae else None, pde=torch.cat(pde) if pde else None, affinity=affinity)

    def predict_affinity(self, features: "Features", token: dict[str, Tensor], atom: dict[str, Tensor],
                         trunk: TrunkOutput, coords: Tensor, confidences: list[SampleConfidence]) -> dict[str, Tensor]:
        """Boltz-2's affinity outputs for the sample with the best ipTM (``Boltz2.forward``'s choice).

        token, atom: :meth:`Features.model_inputs` (with ``profile_affinity``); coords: [S, M, 3] replicated.
        """
        if "profile_affinity" not in token:
            raise ValueError("the affinity model needs affinity features (featurize(..., compute_affinity=True))")
        iptm = torch.cat([c.iptm for c in confidences])
        best = int(torch.argsort(iptm, descending=True)[0])
        s_inputs = self.trunk.input_embedder(token, atom, affinity=True)
        cross = cross_pair_mask(token, self.grid, features.n_tokens, trunk.z.dtype)
        z = trunk.z * cross[..., None]
        modules = ([self.affinity_module1, self.affinity_module2] if hasattr(self, "affinity_module1")
                   else [self.affinity_module])
        results = [module(s_inputs, z, coords[best:best + 1], token, atom, cross) for module in modules]
        return affinity_outputs(results, features.affinity_mw, self.affinity_mw_correction)
