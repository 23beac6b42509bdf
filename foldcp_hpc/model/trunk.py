"""Boltz-2's trunk on the grid, from features to (s_inputs, s, z tiles, distogram tiles).

    s_inputs = input_embedder(token, atom features)   (atoms split by windows over the grid)
    s_init = s_init(s_inputs); z_init = pair initialisation (tiles)
    repeat recycling_steps + 1 times:
        s = s_init + s_recycle(s_norm(s)); z = z_init + z_recycle(z_norm(z))
        z = z + template_module(z); z = z + msa_module(z, s_inputs, MSA block)
        s, z = pairformer(s, z)
    distogram = distogram_module(z)

Submodules carry Boltz-2's names; :meth:`Trunk.boltz_state` maps a Boltz-2 state dict onto them (the pair
initialisation's parameters sit at Boltz-2's top level).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..data.boltz2_hparams import embedder_args
from .common import layer_norm, plus, row_chunks
from .distogram import DistogramModule
from .input_embedder import InputEmbedder
from .msa_module import MSAModule
from .pair_init import PairInitializer
from .pairformer import PairformerModule
from .template import TemplateV2Module

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid


class TrunkOutput(NamedTuple):
    """s_inputs, s: [B, N, C_s] replicated; z: [B, n, n, C_z] pair tile; distogram: [B, n, n, 1, bins] tile."""

    s_inputs: Tensor
    s: Tensor
    z: Tensor
    distogram: Tensor


class TrunkPosition(NamedTuple):
    """A point of the trunk's loop: ``blocks`` Pairformer blocks of recycle ``recycle`` done (0 <= recycle <=
    recycling_steps, 1 <= blocks <= num_blocks); s: [B, N, C_s] replicated, z: [B, n, n, C_z] tile, the state there.
    A run resumed from it continues with block ``blocks`` of that recycle."""

    recycle: int
    blocks: int
    s: Tensor
    z: Tensor


class Trunk(nn.Module):
    """The Boltz-2 trunk on tiles, built from ``Boltz2``'s hyper-parameters (``hparams``)."""

    def __init__(self, hparams: dict[str, Any], *, grid: "ProcessGrid") -> None:
        super().__init__()
        self.grid = grid
        token_s, token_z = hparams["token_s"], hparams["token_z"]
        self.input_embedder = InputEmbedder(**embedder_args(hparams), grid=grid)
        self.s_init = nn.Linear(token_s, token_s, bias=False)
        self.pair_init = PairInitializer(
            token_s, token_z, grid=grid, fix_sym_check=hparams.get("fix_sym_check", False),
            cyclic_pos_enc=hparams.get("cyclic_pos_enc", False),
            bond_type_feature=hparams.get("bond_type_feature", False),
            conditioning_cutoff_min=hparams.get("conditioning_cutoff_min", 4.0),
            conditioning_cutoff_max=hparams.get("conditioning_cutoff_max", 20.0))
        self.s_norm = nn.LayerNorm(token_s)
        self.z_norm = nn.LayerNorm(token_z)
        self.s_recycle = nn.Linear(token_s, token_s, bias=False)
        self.z_recycle = nn.Linear(token_z, token_z, bias=False)
        self.use_templates = hparams.get("use_templates", False)
        if self.use_templates:
            if not hparams.get("use_templates_v2", False):
                raise ValueError("only Boltz-2's template module v2 is implemented on the grid")
            self.template_module = TemplateV2Module(token_z, **hparams["template_args"], grid=grid)
        self.msa_module = MSAModule(token_z=token_z, token_s=token_s, **hparams["msa_args"], grid=grid)
        self.pairformer_module = PairformerModule(token_s, token_z, **hparams["pairformer_args"], grid=grid)
        self.distogram_module = DistogramModule(token_z, hparams["num_bins"], grid=grid)

    @staticmethod
    def boltz_name(name: str) -> str:
        """The Boltz-2 state-dict key of this module's parameter ``name`` (the pair initialisation's sit at
        Boltz-2's top level)."""
        return name[len("pair_init."):] if name.startswith("pair_init.") else name

    def boltz_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """This module's entries of a Boltz-2 state dict, under this module's names."""
        return {name: state[self.boltz_name(name)] for name in self.state_dict()}

    def forward(self, token: dict[str, Tensor], atom: dict[str, Tensor], pair: dict[str, Tensor],
                template: dict[str, Tensor], msa: dict[str, Tensor], n_msa_rows: int,
                recycling_steps: int = 0, start: Optional[TrunkPosition] = None,
                on_block: Optional[Callable[[TrunkPosition], None]] = None) -> TrunkOutput:
        """token: 1-D token features [B, N, ...] replicated (incl. ``token_pad_mask``, ``profile``);
        atom: 1-D atom features [B, M, ...] replicated, index form; pair: this rank's pair-feature tile
        [B, n, n]; template: template features [T, N, ...]; msa: this rank's MSA block [B, S_c, N_r] (msa,
        has_deletion, deletion_value, msa_paired, msa_mask).

        start: resume from this position (a checkpoint's) instead of the beginning; on_block: called with the
        position after every Pairformer block (checkpoints and walltime signals).
        """
        grid = self.grid
        s_inputs = self.input_embedder(token, atom)
        n_tokens = s_inputs.shape[1]
        mask = token["token_pad_mask"].to(s_inputs.dtype)  # [B, N]
        layout = grid.layout(n_tokens)
        padded = torch.nn.functional.pad(mask, (0, layout.n_pad))
        pair_mask = (padded[:, layout.block(grid.row), None] * padded[:, None, layout.block(grid.col)])

        s_init = self.s_init(s_inputs)
        if torch.is_grad_enabled():
            z_init = self.pair_init(s_inputs, token, pair, with_relative=False)[0]  # no relative-position tile kept
            z: Optional[Tensor] = torch.zeros_like(z_init)

            def recycled(z_: Tensor) -> Tensor:
                return z_init + self.z_recycle(self.z_norm(z_))
        else:  # z_init is rebuilt a chunk of rows at a time for every recycle: one pair tile fewer held
            init_rows, init_chunk = self.pair_init.row_maker(s_inputs, token, pair)
            z = None  # zeros, made by the first recycle

            def recycled(z_: Optional[Tensor]) -> Tensor:
                return self._recycled(init_rows, init_chunk, z_, layout.n_local)
        s = torch.zeros_like(s_init)
        first = 0 if start is None else start.recycle
        for recycle in range(first, recycling_steps + 1):
            if start is not None and recycle == start.recycle:
                s, z, begin = start.s, start.z, start.blocks
            else:
                s = s_init + self.s_recycle(self.s_norm(s))
                z = recycled(z)
                if self.use_templates and (torch.is_grad_enabled() or self.template_module.has_templates(template)):
                    z = plus(z, self.template_module(z, template, pair_mask, n_tokens=n_tokens))
                z = plus(z, self.msa_module(z, s_inputs, msa, pair_mask, n_rows=n_msa_rows))
                begin = 0
            hook = None if on_block is None else (
                lambda done, s_, z_, recycle=recycle: on_block(TrunkPosition(recycle, done, s_, z_)))
            s, z = self.pairformer_module(s, z, mask=mask, pair_mask=pair_mask, start_block=begin, on_block=hook,
                                          inplace=True)
        return self.output(s_inputs, s, z)

    def _recycled(self, init_rows: Callable[[slice], tuple[Tensor, Tensor]], rows_per_chunk: int,
                  z: Optional[Tensor], n_local: int) -> Tensor:
        """z_init + z_recycle(z_norm(z)) without autograd, into z's own storage (z is the previous recycle's
        output, not used again; None: zeros, the first recycle), a chunk of rows at a time, with z_init's rows
        rebuilt by ``init_rows`` (:meth:`PairInitializer.row_maker`)."""
        out = z
        for rows in row_chunks(n_local, rows_per_chunk):
            init = init_rows(rows)[0]  # [B, rows, n, C_z]
            update = self.z_recycle(layer_norm(self.z_norm, torch.zeros_like(init) if z is None else z[:, rows]))
            if out is None:
                out = init.new_empty(init.shape[0], n_local, *init.shape[2:])
            out[:, rows] = update.add_(init) if update.dtype == out.dtype else init + update
        return out

    def output(self, s_inputs: Tensor, s: Tensor, z: Tensor) -> TrunkOutput:
        """The trunk's output from its final s and z (the distogram head applied)."""
        return TrunkOutput(s_inputs, s, z, self.distogram_module(z))
