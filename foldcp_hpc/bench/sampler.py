"""The per-rank worker of ``python -m foldcp_hpc.bench sampler``: the diffusion conditioning (once per input)
and one sampler step (the score model on every sample, the coordinate gather), on this rank's tiles and atom
windows. s and z are random (the trunk is not run); the input is the trunk benchmark's synthetic protein.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .memory import profile
from .pairformer import DTYPES, _max
from .trunk import _featurize, write_input


def run_worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from ..data.boltz2_hparams import reduced_boltz2_hparams
    from ..distributed import ProcessGrid
    from ..model.boltz2 import FoldModel

    dtype = DTYPES[args.dtype]
    backend = "gloo" if args.device == "cpu" and args.backend == "auto" else args.backend
    world = MPI.COMM_WORLD
    package = None
    if world.Get_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_input(Path(tmp), args.n, args.msa_rows)
            package = _featurize(path, Path("~/.cache/foldcp_hpc/ccd").expanduser(),
                                 with_boltz=world.Get_size() == 1 and not args.no_boltz)
    features, boltz_feats = world.bcast(package, root=0)
    hp = reduced_boltz2_hparams(token_transformer_depth=args.layers, atom_depth=3)
    samples = args.samples
    rows = []
    with ProcessGrid.create(backend=backend) as grid, torch.no_grad():
        device = grid.device
        torch.manual_seed(0)
        np.random.seed(0)
        model = FoldModel(hp, grid=grid).to(device=device, dtype=dtype).eval()
        token, atom = features.model_inputs(dtype, device)
        n_tokens, c_s, c_z = features.n_tokens, hp["token_s"], hp["token_z"]
        generator = torch.Generator().manual_seed(1)
        s = torch.randn(1, n_tokens, c_s, generator=generator).to(device=device, dtype=dtype)
        s_inputs = torch.randn(1, n_tokens, c_s, generator=generator).to(device=device, dtype=dtype)
        n_local = grid.layout(n_tokens).n_local
        z = torch.randn(1, n_local, n_local, c_z, generator=generator).to(device=device, dtype=dtype)
        rel = model.trunk.pair_init.relative_positions(token, n_tokens)
        noisy = 100 * torch.randn(samples, features.n_atoms, 3, generator=generator).to(device=device, dtype=dtype)

        def conditioning():
            return model.diffusion_conditioning(s, z, rel, token, atom)

        cond, cond_peak, cond_seconds = profile(conditioning, device)

        # eager calls: the step as every rank of a grid runs it (a one-rank CUDA run replays a graph instead)
        score = model.structure_module.scorer(s_inputs, s, token, atom, cond, cuda_graphs=False)

        def step():
            return model.structure_module.denoise(noisy, 80.0, score)

        grid.barrier()
        _, step_peak, step_seconds = profile(step, device, args.repeats)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        common = {"n": n_tokens, "atoms": int(features.atom["atom_pad_mask"].sum()), "device_name": name,
                  "dtype": args.dtype}
        for stage, peak, seconds in (("conditioning", cond_peak, cond_seconds), ("sampler step", step_peak,
                                                                                   step_seconds)):
            rows.append({"impl": "foldcp_hpc", "stage": stage, "ranks": grid.world_size, "grid": f"{grid.p}x{grid.p}",
                         "peak_bytes": grid.comm.gather(peak, root=0),
                         "seconds": grid.comm.allreduce(seconds, op=_max()), **common})
        if boltz_feats is not None:
            rows.extend(_boltz_rows(hp, boltz_feats, s, s_inputs, z, noisy, dtype, device, common, args))
    if grid.rank == 0:
        Path(args.out).write_text(json.dumps(rows))


def _boltz_rows(hp, feats, s, s_inputs, z, noisy, dtype, device, common, args) -> list[dict]:
    """The same two stages with Boltz-2's own modules (one rank: z is the whole pair tensor)."""
    from boltz.model.models.boltz2 import Boltz2

    model = Boltz2(**hp).to(device=device, dtype=dtype).eval()
    feats = {k: (v.to(dtype) if v.is_floating_point() else v)[None].to(device) for k, v in feats.items()}
    rel = model.rel_pos(feats)

    def conditioning():
        out = model.diffusion_conditioning(s_trunk=s, z_trunk=z, relative_position_encoding=rel, feats=feats)
        return dict(zip(("q", "c", "to_keys", "atom_enc_bias", "atom_dec_bias", "token_trans_bias"), out))

    cond, cond_peak, cond_seconds = profile(conditioning, device)
    samples = noisy.shape[0]

    def step():
        return model.structure_module.preconditioned_network_forward(
            noisy, 80.0, network_condition_kwargs={"multiplicity": samples, "s_trunk": s, "s_inputs": s_inputs,
                                                   "feats": feats, "diffusion_conditioning": cond})

    _, step_peak, step_seconds = profile(step, device, args.repeats)
    return [{"impl": "boltz", "stage": stage, "ranks": 1, "grid": "-", "peak_bytes": [peak], "seconds": seconds,
             **common} for stage, peak, seconds in (("conditioning", cond_peak, cond_seconds),
                                                    ("sampler step", step_peak, step_seconds))]
