"""The affinity module's input: the predicted complex cropped around the ligand, featurized as Boltz does.

``boltz predict`` runs affinity as a second pass: it saves the first pass's top-ranked structure
(``pre_affinity_<id>.npz``), re-tokenizes it, crops it with ``AffinityCropper`` to at most 256 tokens and 2,048
atoms around the ligand named by ``properties: affinity`` (the token's nearest residues, by the predicted
coordinates), and featurizes the crop with ``compute_affinity`` (the query sequence's profile, the ligand's
molecular weight, no templates) and the method feature "other". The same steps here, on rank 0 (the crop is
small: O(256 + 2,048)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .features import Features, featurize

__all__ = ["AFFINITY_MAX_TOKENS", "AFFINITY_MAX_ATOMS", "affinity_tokenized", "affinity_features"]

AFFINITY_MAX_TOKENS = 256
AFFINITY_MAX_ATOMS = 2048


def affinity_tokenized(parsed: Any, msas: dict, coords: np.ndarray) -> Any:
    """The cropped, tokenized complex of the affinity pass.

    parsed: the first pass's :class:`~foldcp_hpc.data.inputs.ParsedInput`; msas: its MSAs (chain -> boltz MSA);
    coords: [M_valid, 3] the top-ranked sample's atom coordinates (the structure's valid atoms in order), stored in
    float32 as Boltz's writer stores them.
    """
    from boltz.data.crop.affinity import AffinityCropper
    from boltz.data.tokenize.boltz2 import Boltz2Tokenizer
    from boltz.data.types import Input

    from ..io.predictions import with_coords

    target = parsed.target
    if target.record.affinity is None:
        raise ValueError(f"{parsed.path}: the input has no 'properties: affinity' entry")
    structure = with_coords(target.structure.remove_invalid_chains(), np.asarray(coords, dtype=np.float32))
    data = Input(structure=structure, msa=msas, record=target.record, residue_constraints=target.residue_constraints,
                 templates=target.templates, extra_mols=target.extra_mols)
    tokenized = Boltz2Tokenizer().tokenize(data)
    return AffinityCropper().crop(tokenized, max_tokens=AFFINITY_MAX_TOKENS, max_atoms=AFFINITY_MAX_ATOMS)


def affinity_features(parsed: Any, msas: dict, coords: np.ndarray, seed: int | None = None
                      ) -> tuple[Features, Any]:
    """Features of the affinity pass (see the module docstring) and the cropped tokenized input; ``seed`` seeds
    torch's generator first (the reference conformers' augmentation draws from it)."""
    tokenized = affinity_tokenized(parsed, msas, coords)
    options = parsed.target.record.inference_options
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    features = featurize(tokenized, parsed.molecules, np.random.default_rng(42),
                         options.pocket_constraints if options else None,
                         options.contact_constraints if options else None,
                         override_method="other", compute_affinity=True)
    return features, tokenized
