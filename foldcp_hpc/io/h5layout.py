"""Pure maths of the HDF5 layout: chunk shapes, the pieces of a tile write, file names. Nothing here opens a file.

A *pair dataset* has the logical shape ``[*lead, N, N, *trail]`` (``/trunk/z`` [N, N, C_z], ``/confidence/pae``
[S, N, N]); a *token dataset* ``[*lead, N, *trail]`` (``/trunk/s`` [N, C_s]). The dims holding tokens are the
dataset's ``token_dims`` (stored as an attribute: (0, 1) for z, (1, 2) for pae, (0,) for s). Files hold real
tokens only: N, never the padded ``n_padded`` of the grid.

Chunks follow the tile boundaries of the writing grid: ``n_local`` along each token dim (clipped to N), 1
along lead dims (one sample of pae is one chunk row), whole trailing dims, so each chunk belongs to exactly
one rank. HDF5 refuses chunks of 4 GiB or more; a chunk that would be larger keeps its token extent and
takes fewer trailing channels first (tile alignment kept), and only then smaller token extents.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_PIECE_BYTES",
    "chunk_shape",
    "row_pieces",
    "rank_file_name",
    "pair_shape",
    "token_shape",
]

MAX_CHUNK_BYTES = 2**32 - 1  # HDF5's limit on the size of one chunk
MAX_PIECE_BYTES = 2**30  # one rank's share of one collective write; MPI-IO counts are ints, so stay well below 2 GiB


def pair_shape(n_tokens: int, lead: tuple[int, ...] = (), trail: tuple[int, ...] = ()) -> tuple[int, ...]:
    """``[*lead, N, N, *trail]``: the logical shape of a pair dataset."""
    return (*lead, n_tokens, n_tokens, *trail)


def token_shape(n_tokens: int, lead: tuple[int, ...] = (), trail: tuple[int, ...] = ()) -> tuple[int, ...]:
    """``[*lead, N, *trail]``: the logical shape of a token dataset."""
    return (*lead, n_tokens, *trail)


def chunk_shape(shape: tuple[int, ...], token_dims: tuple[int, ...], n_local: int, itemsize: int,
                max_bytes: int = MAX_CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk of a dataset of ``shape`` whose ``token_dims`` are tiled in blocks of ``n_local`` tokens.

    Dims before the first token dim get 1, token dims ``min(n_local, N)``, dims after the last token dim
    their full size (every extent at least 1: HDF5 needs positive chunk dims even for empty datasets).
    While the chunk is over ``max_bytes``, trailing dims shrink (last first), then token dims (to
    ``ceil(n_local / k)`` for the smallest k that fits).
    """
    if not token_dims:
        raise ValueError(f"a tiled dataset needs at least one token dim, got token_dims={token_dims}")
    if any(not 0 <= d < len(shape) for d in token_dims):
        raise ValueError(f"token dims {token_dims} out of range for a {len(shape)}-dim shape {shape}")
    if n_local < 1:
        raise ValueError(f"block size n_local must be positive, got {n_local}")
    first, last = min(token_dims), max(token_dims)
    chunk = []
    for dim, size in enumerate(shape):
        if dim in token_dims:
            chunk.append(max(1, min(n_local, size)))
        elif dim < first:
            chunk.append(1)
        else:
            chunk.append(max(1, size))

    def nbytes() -> int:
        return math.prod(chunk) * itemsize

    for dim in range(len(shape) - 1, last, -1):  # trailing dims, last first
        if nbytes() <= max_bytes:
            break
        rest = nbytes() // chunk[dim]
        chunk[dim] = max(1, max_bytes // rest)
    if nbytes() > max_bytes:
        side = chunk[token_dims[0]]
        k = 1
        while True:
            k += 1
            smaller = -(-side // k)
            for dim in token_dims:
                chunk[dim] = min(chunk[dim], smaller)
            if nbytes() <= max_bytes or smaller == 1:
                break
    if nbytes() > max_bytes:
        raise ValueError(f"no chunk of {shape} with {itemsize}-byte items fits {max_bytes} bytes")
    return tuple(chunk)


def row_pieces(n_rows: int, n_local: int, row_bytes: int, max_bytes: int = MAX_PIECE_BYTES) -> list[slice]:
    """Split a tile's ``n_local`` (padded) rows into pieces of at most ``max_bytes``; only real rows kept.

    Every rank of a grid gets the same number of pieces (it depends on ``n_local`` and ``row_bytes`` only),
    so collective writes line up; a rank with fewer real rows (``n_rows`` < ``n_local``) gets empty slices
    for the pieces past its last real row.

    Args:
        n_rows: real rows of this rank's tile (``valid_count``), 0 <= n_rows <= n_local.
        n_local: padded rows of every tile of the grid.
        row_bytes: bytes of one tile row (``n_local * prod(trail) * itemsize * prod(lead)``).
    """
    if not 0 <= n_rows <= n_local:
        raise ValueError(f"a tile of {n_local} rows cannot hold {n_rows} real rows")
    count = max(1, -(-n_local * max(row_bytes, 1) // max_bytes))
    step = max(1, -(-n_local // count))
    pieces = []
    for k in range(count):
        start = min(k * step, n_rows)
        pieces.append(slice(start, min((k + 1) * step, n_rows)))
    return pieces


def rank_file_name(path: str | Path, rank: int) -> Path:
    """The fallback file of ``rank`` beside master file ``path``: ``run.h5`` -> ``run.rank3.h5``.

    A master without an ``.h5``/``.hdf5`` suffix gets ``.rank<k>.h5`` appended (``ckpt`` -> ``ckpt.rank3.h5``).
    """
    path = Path(path)
    if rank < 0:
        raise ValueError(f"rank must be non-negative, got {rank}")
    if path.suffix in (".h5", ".hdf5"):
        return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
    return path.with_name(f"{path.name}.rank{rank}.h5")
