"""``foldcp-hpc featurize``: check and parse a job's input, compute its features and each rank's pair tile.

Rank 0 reads and checks the input (one line naming the file and field on any mistake, and the whole job
ends), parses and tokenizes it with boltz, computes the token and atom features (O(N + M)) and broadcasts
them; every rank then builds its own tile of the pair features. Rank 0 prints a summary.
"""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING, Any

from .config import ConfigError, load_job
from .data.inputs import InputError, parse_input

if TYPE_CHECKING:
    from .data.features import Features

__all__ = ["run_featurize", "features_of", "tokenize_input"]

MIB = 1024 * 1024


def tokenize_input(path, cache_dir, max_msa_seqs: int = 8192) -> tuple[Any, Any, dict]:
    """Parse and tokenize one input with boltz (MSAs loaded); returns (parsed input, tokenized, MSAs)."""
    parsed = parse_input(path, cache_dir)  # first: its checks need neither torch nor boltz's parser
    from boltz.data.tokenize.boltz2 import Boltz2Tokenizer
    from boltz.data.types import Input

    from .data.msa import load_msas

    target = parsed.target
    msas = load_msas(target, parsed.path, max_msa_seqs)
    data = Input(structure=target.structure, msa=msas, record=target.record,
                 residue_constraints=target.residue_constraints, templates=target.templates,
                 extra_mols=target.extra_mols)
    return parsed, Boltz2Tokenizer().tokenize(data), msas


def features_of(path, cache_dir, max_tokens: int | None = None, max_msa_seqs: int = 8192,
                keep_parsed: bool = False, seed: int | None = None) -> tuple:
    """Parse, tokenize and featurize one input on this rank; returns the features and a summary (and, with
    ``keep_parsed``, the parsed input and its MSAs: the output writer needs its structure, the affinity pass
    both). seed: seeds the reference conformers' augmentation, so that a run (and its resume) is reproducible."""
    parsed, tokenized, msas = tokenize_input(path, cache_dir, max_msa_seqs)
    import numpy as np

    from .data.features import featurize

    target = parsed.target
    n_tokens = len(tokenized.tokens)
    if max_tokens is not None and n_tokens > max_tokens:
        raise InputError(f"{path}: {n_tokens} tokens, more than [input] max_tokens = {max_tokens}")
    options = target.record.inference_options
    if seed is not None:  # the reference conformers' random augmentation draws from torch's generator
        import torch

        torch.manual_seed(seed)
    features = featurize(tokenized, parsed.molecules, np.random.default_rng(42),
                         options.pocket_constraints if options else None,
                         options.contact_constraints if options else None)
    chains = target.structure.chains
    summary = {"chains": len(chains), "tokens": n_tokens, "atoms": int(features.atom["atom_pad_mask"].sum()),
               "atoms_padded": features.n_atoms, "bonds": int(len(features.bonds)),
               "constraint_writes": len(features.contacts), "msa_rows": features.msa.n_rows,
               "msa_chains": len(msas), "name": target.record.id}
    return (features, summary, parsed, msas) if keep_parsed else (features, summary)


def run_featurize(job_path: str, overrides: list[str]) -> int:
    job = load_job(job_path, overrides)
    if job.input.path is None:
        raise ConfigError(f"{job.source}: [input] path: required (the Boltz .yaml or .fasta to fold)")
    from mpi4py import MPI

    # The input is read and checked before the grid starts, and torch and boltz are imported only where
    # needed, so that a bad input or job file ends the job before the other ranks spend seconds importing.
    start = time.perf_counter()
    world = MPI.COMM_WORLD
    package = None
    if world.Get_rank() == 0:
        package = features_of(job.resolve(job.input.path), job.resolve(job.input.ccd_cache), job.input.max_tokens,
                              job.input.max_msa_seqs)
    features, summary = world.bcast(package, root=0)
    from .distributed.grid import ProcessGrid

    with ProcessGrid.create(job.grid.cp, job.grid.dp, backend=job.runtime.backend,
                            timeout_s=job.runtime.timeout_s) as grid:
        tile = features.pair_tile(grid.p, grid.row, grid.col)
        msa_block = features.msa_block(grid.p, grid.row, grid.col)
        tile_bytes = sum(t.numel() * t.element_size() for t in (*tile.values(), *msa_block))
        one_d = sum(t.numel() * t.element_size() for part in (features.token, features.atom) for t in part.values())
        seconds = time.perf_counter() - start
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        tiles = grid.comm.gather(tile_bytes, root=0)
        peaks = grid.comm.gather(peak_rss, root=0)
        if grid.rank != 0:
            return 0
        print(f"input {job.resolve(job.input.path)}: {summary['chains']} chains, {summary['tokens']} tokens, "
              f"{summary['atoms']} atoms ({summary['atoms_padded']} padded to windows of 32), "
              f"{summary['bonds']} token bonds, {summary['constraint_writes']} constraint writes, "
              f"MSA of {summary['msa_rows']} rows ({summary['msa_chains']} chains with an MSA file)")
        n_local = grid.layout(summary["tokens"]).n_local
        print(f"grid {grid.p}x{grid.p}: pair tiles of {n_local}x{n_local} tokens; pair features and MSA block per rank "
              f"{min(tiles) / MIB:.2f}-{max(tiles) / MIB:.2f} MiB, token and atom features "
              f"{one_d / MIB:.2f} MiB on every rank; {seconds:.1f} s")
        peaks = sorted(peaks)
        print(f"per-rank peak resident memory (whole process: Python, torch, boltz included) min / median / max: "
              f"{peaks[0] / MIB:.0f} / {peaks[len(peaks) // 2] / MIB:.0f} / {peaks[-1] / MIB:.0f} MiB", flush=True)
    return 0
