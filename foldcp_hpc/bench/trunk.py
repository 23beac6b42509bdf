"""The per-rank worker of ``python -m foldcp_hpc.bench trunk``: the whole trunk forward on this rank's share.

Input: one protein of N residues (a seeded random sequence) with a generated ``.a3m`` MSA of ``msa_rows`` rows,
parsed, tokenized and featurized by the project's own pipeline on rank 0 and broadcast (O(N + M)), then each
rank's pair-feature tile and MSA block. Weights: Boltz-2's widths with random values (``Boltz2`` constructed
with the reduced block counts, its state loaded into ours so both run the same model).
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

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def write_input(folder: Path, n_residues: int, msa_rows: int, seed: int = 0) -> Path:
    """A one-protein Boltz YAML with an .a3m of ``msa_rows`` rows (the query and mutated copies)."""
    rng = np.random.default_rng(seed)
    query = "".join(AMINO_ACIDS[i] for i in rng.integers(0, 20, n_residues))
    rows = [f">query\n{query}"]
    for k in range(max(0, msa_rows - 1)):
        row = [AMINO_ACIDS[rng.integers(20)] if rng.random() < 0.3 else c for c in query]
        for gap in rng.integers(0, n_residues, max(1, n_residues // 20)):
            row[gap] = "-"
        rows.append(f">hit{k}\n{''.join(row)}")
    (folder / "msa.a3m").write_text("\n".join(rows) + "\n")
    (folder / "bench.yaml").write_text(
        f"version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: {query}\n      msa: msa.a3m\n")
    return folder / "bench.yaml"


def run_worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from ..data.boltz2_hparams import reduced_boltz2_hparams
    from ..distributed import ProcessGrid
    from ..model.trunk import Trunk

    dtype = DTYPES[args.dtype]
    backend = "gloo" if args.device == "cpu" and args.backend == "auto" else args.backend
    cache = Path("~/.cache/foldcp_hpc/ccd").expanduser()
    world = MPI.COMM_WORLD
    package = None
    if world.Get_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_input(Path(tmp), args.n, args.msa_rows)
            package = _featurize(path, cache, with_boltz=world.Get_size() == 1 and not args.no_boltz)
    features, boltz_feats = world.bcast(package, root=0)

    hp = reduced_boltz2_hparams(pairformer_blocks=args.blocks)
    hp["token_s"], hp["token_z"] = args.c_s, args.c_z
    rows = []
    with ProcessGrid.create(backend=backend) as grid, torch.no_grad():
        device = grid.device
        from boltz.model.models.boltz2 import Boltz2

        torch.manual_seed(0)
        np.random.seed(0)
        model = Boltz2(**hp).to(dtype=dtype).eval()
        trunk = Trunk(hp, grid=grid).to(dtype=dtype).eval()
        trunk.load_state_dict(trunk.boltz_state(model.state_dict()), strict=True)
        trunk.to(device)
        if boltz_feats is None:
            del model
        cast = lambda t: (t.to(dtype) if t.is_floating_point() else t).to(device)  # noqa: E731
        token = {k: cast(v)[None] for k, v in features.token.items()}
        atom = {k: cast(v)[None] for k, v in features.atom.items() if v.dim() and v.shape[0] == features.n_atoms}
        pair = {k: v[None].to(device) for k, v in features.pair_tile(grid.p, grid.row, grid.col).items()}
        template = {k: cast(v) for k, v in features.template.items()}
        msa = {k: v.to(device) for k, v in features.msa_model_block(grid.p, grid.row, grid.col).items()}

        def ours():
            return trunk(token, atom, pair, template, msa, features.msa.n_rows, recycling_steps=args.recycles)

        grid.barrier()
        _, peak, seconds = profile(ours, device, args.repeats, warm_up=False)  # the trunk is long: no extra run
        seconds = grid.comm.allreduce(seconds, op=_max())
        peaks = grid.comm.gather(peak, root=0)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        common = {"n": features.n_tokens, "atoms": int(features.atom["atom_pad_mask"].sum()),
                  "device_name": name, "dtype": args.dtype}
        rows.append({"impl": "foldcp_hpc", "ranks": grid.world_size, "grid": f"{grid.p}x{grid.p}",
                     "peak_bytes": peaks, "seconds": seconds, **common})
        if boltz_feats is not None:
            rows.append(_boltz_row(model.to(device), boltz_feats, cast, args, device, common))
    if grid.rank == 0:
        Path(args.out).write_text(json.dumps(rows))


def _featurize(path: Path, cache: Path, with_boltz: bool):
    """Our features and, for the one-rank run's boltz row, boltz's featurizer output of the same input."""
    from ..data.features import featurize
    from ..featurize import tokenize_input

    parsed, tokenized, _ = tokenize_input(path, cache)
    torch.manual_seed(0)
    features = featurize(tokenized, parsed.molecules, np.random.default_rng(42))
    boltz_feats = None
    if with_boltz:
        from boltz.data import const
        from boltz.data.feature.featurizerv2 import Boltz2Featurizer

        torch.manual_seed(0)
        boltz_feats = Boltz2Featurizer().process(
            tokenized, molecules=parsed.molecules, random=np.random.default_rng(42), training=False,
            max_atoms=None, max_tokens=None, max_seqs=const.max_msa_seqs, pad_to_max_seqs=False,
            single_sequence_prop=0.0, compute_frames=True, inference_pocket_constraints=None,
            inference_contact_constraints=None, compute_constraint_features=True, override_method=None,
            compute_affinity=False)
        boltz_feats = {k: v for k, v in boltz_feats.items() if isinstance(v, torch.Tensor)}
    return features, boltz_feats


def _boltz_row(model, feats, cast, args, device, common) -> dict:
    """Boltz-2's own trunk modules, run as ``Boltz2.forward`` runs them (its Pairformer chunking at inference)."""
    feats = {k: cast(v)[None] for k, v in feats.items()}

    def boltz():
        s_inputs = model.input_embedder(feats)
        s_init = model.s_init(s_inputs)
        z_init = model.z_init_1(s_inputs)[:, :, None] + model.z_init_2(s_inputs)[:, None, :]
        z_init = z_init + model.rel_pos(feats)
        z_init = z_init + model.token_bonds(feats["token_bonds"].to(z_init.dtype))
        z_init = z_init + model.token_bonds_type(feats["type_bonds"].long())
        z_init = z_init + model.contact_conditioning(feats)
        s, z = torch.zeros_like(s_init), torch.zeros_like(z_init)
        mask = feats["token_pad_mask"].to(z.dtype)
        pair_mask = mask[:, :, None] * mask[:, None, :]
        for _ in range(args.recycles + 1):
            s = s_init + model.s_recycle(model.s_norm(s))
            z = z_init + model.z_recycle(model.z_norm(z))
            z = z + model.template_module(z, feats, pair_mask)
            z = z + model.msa_module(z, s_inputs, feats)
            s, z = model.pairformer_module(s, z, mask=mask, pair_mask=pair_mask)
        return s, z, model.distogram_module(z)

    _, peak, seconds = profile(boltz, device, args.repeats, warm_up=False)
    return {"impl": "boltz", "ranks": 1, "grid": "-", "peak_bytes": [peak], "seconds": seconds, **common}
