"""``[output] save``: a run's intermediates streamed into one tiles file, tile by tile, never gathered.

``<output dir>/intermediates_<name>.h5`` (layout in docs/hdf5-layout.md) holds what was asked for:

    /trunk/s_inputs     [N, C_s]          s_inputs            (replicated; rank 0's copy)
    /trunk/s            [N, C_s]          trunk_s
    /trunk/z            [N, N, C_z]       trunk_z             (each rank writes its tile)
    /distogram          [N, N, bins]      distogram           (logits)
    /confidence/pae     [S, N, N]         pae                 (each rank writes its tile of every sample)
    /confidence/pde     [S, N, N]         pde
    /confidence/plddt   [S, N]            plddt

Root attributes: stage "prediction", the input name, the job file's text, dtype, the grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .tiles import PairFile

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid
    from ..model.boltz2 import Prediction

__all__ = ["save_intermediates"]


def _stored(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32).cpu()


def save_intermediates(path: Path, grid: "ProcessGrid", prediction: "Prediction", n_tokens: int,
                       names: Sequence[str], attrs: dict[str, Any] | None = None) -> Path | None:
    """Write the intermediates ``names`` (see the module docstring) of ``prediction``; collective over the grid.

    Returns the path on the ranks that wrote (replica 0), None on the others.
    """
    trunk = prediction.trunk
    dtype = np.float64 if trunk.z.dtype == torch.float64 else np.float32
    pair_file = PairFile.for_grid(path, grid, attrs={"stage": "prediction", **(attrs or {})})
    if pair_file is None:
        return None
    samples = len(prediction.confidence)
    with pair_file as out:
        for name, key in (("s_inputs", "/trunk/s_inputs"), ("trunk_s", "/trunk/s")):
            if name in names:
                values = trunk.s_inputs if name == "s_inputs" else trunk.s
                out.create_tokens(key, n_tokens, trail=(values.shape[-1],), dtype=dtype)
                out.write_tokens(key, _stored(values[0]))  # [N, C_s]
        if "trunk_z" in names:
            out.create_pair("/trunk/z", n_tokens, trail=(trunk.z.shape[-1],), dtype=dtype)
            out.write_tile("/trunk/z", _stored(trunk.z[0]))  # [n, n, C_z] tile
        if "distogram" in names:
            logits = trunk.distogram[0, :, :, 0]  # [B, n, n, 1, bins] -> [n, n, bins]
            out.create_pair("/distogram", n_tokens, trail=(logits.shape[-1],), dtype=dtype,
                            attrs={"min_dist": 2.0, "max_dist": 22.0})  # Boltz-2's distogram bins (for inspect)
            out.write_tile("/distogram", _stored(logits))
        for name in ("pae", "pde"):
            if name in names and samples:
                out.create_pair(f"/confidence/{name}", n_tokens, lead=(samples,), dtype=dtype)
                for k, confidence in enumerate(prediction.confidence):
                    out.write_tile(f"/confidence/{name}", _stored(getattr(confidence, name)[0]), lead=(k,))
        if "plddt" in names and samples:
            out.create_tokens("/confidence/plddt", n_tokens, lead=(samples,), dtype=dtype)
            out.write_tokens("/confidence/plddt", _stored(torch.cat([c.plddt for c in prediction.confidence])))
    return path
