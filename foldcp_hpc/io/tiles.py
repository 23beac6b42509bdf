"""Pair tiles in one HDF5 file: written by the p x p ranks of a grid, read back as tiles of any grid.

Layout (see docs/hdf5-layout.md): datasets in full logical shape, ``[*lead, N, N, *trail]`` for pair
quantities (``/trunk/z`` [N, N, C_z], ``/confidence/pae`` [S, N, N]) and ``[*lead, N, *trail]`` for token
quantities (``/trunk/s`` [N, C_s]), real tokens only, chunked on the writing grid's tile boundaries.

Two ways to write the same layout, chosen by :func:`use_fallback`:

* **mpio** (h5py built with MPI): one file, created collectively (``driver="mpio"``) over the writing ranks'
  communicator; rank (row, col) writes the real part of its tile as a hyperslab under collective I/O.
* **fallback** (serial h5py): rank k writes its real tile part into ``<stem>.rank<k>.h5``; rank 0 writes the
  master file whose virtual datasets stitch the rank files into the full logical shapes, so h5py, h5ls and
  the readers here see the same datasets as in the mpio file.

Readers (:func:`read_tile`, :func:`read_tokens`, :func:`read_full`) are serial and take any grid side p', so
a file written on 3 x 3 reads back as 2 x 2 tiles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .. import __version__
from ..distributed.layout import TileLayout
from ..errors import UniformError
from .h5complete import begin, mark_complete
from .h5layout import MAX_PIECE_BYTES, chunk_shape, pair_shape, rank_file_name, row_pieces, token_shape

if TYPE_CHECKING:
    import h5py

    from ..distributed.grid import ProcessGrid

__all__ = ["H5LayoutError", "PairFile", "use_fallback", "read_tile", "read_tokens", "read_full", "token_dims",
           "FALLBACK_ENV"]

FALLBACK_ENV = "FOLDCP_H5_FALLBACK"
FORMAT = "foldcp_hpc tiles 1"  # root attribute "format": bump when the layout changes
# file format: 1.8's dense attribute storage (attributes over 64 KiB, e.g. a long job file) and 1.10's virtual
# datasets; nothing newer, so HDF5 1.10 and later read the files
LIBVER = ("v108", "v110")


class H5LayoutError(UniformError):
    """A dataset or file that does not fit the tile layout (wrong shape, unknown name, not a tiled dataset)."""


def use_fallback(requested: bool | None = None) -> bool:
    """Whether to write per-rank files plus a virtual master instead of one parallel file.

    ``requested`` True or False decides; None takes ``FOLDCP_H5_FALLBACK`` (``1`` forces the fallback, ``0``
    forbids it) and otherwise falls back exactly when h5py is not built with MPI.

    Raises:
        H5LayoutError: the mpio writer is demanded but h5py has no MPI support.
    """
    import h5py

    mpi = bool(h5py.get_config().mpi)
    if requested is None:
        env = os.environ.get(FALLBACK_ENV, "").strip()
        if env not in ("", "0", "1"):
            raise H5LayoutError(f"{FALLBACK_ENV}={env!r}: expected 1 (per-rank files) or 0 (one parallel file)")
        requested = None if env == "" else env == "1"
    if requested is None:
        return not mpi
    if not requested and not mpi:
        raise H5LayoutError(f"one parallel HDF5 file needs h5py built with MPI; this h5py {h5py.__version__} is "
                            f"serial (set {FALLBACK_ENV}=1 or leave the choice automatic)")
    return requested


class PairFile:
    """One HDF5 file of pair and token quantities, written by the p x p ranks of ``comm``.

    Every method is called by every rank of ``comm`` in the same order with the same names and shapes
    (dataset creation and attributes are collective under the mpio driver). Rank ``row * p + col`` of
    ``comm`` holds tile (row, col).

    Args:
        path: the file (the master file under the fallback).
        comm: mpi4py communicator of exactly the p * p writing ranks, in row-major grid order.
        p: grid side.
        attrs: root attributes (str, numbers, bools, lists), equal on every rank.
        fallback: see :func:`use_fallback`; the choice is agreed over ``comm`` (any rank without MPI-h5py
            makes every rank use the fallback).

    Use :meth:`for_grid` to write from a :class:`ProcessGrid`. Close with :meth:`close` (marks the file
    complete) or use it as a context manager (complete only when the block ends without an exception).
    """

    def __init__(self, path: str | Path, comm: Any, p: int, *, attrs: dict[str, Any] | None = None,
                 fallback: bool | None = None):
        import h5py
        from mpi4py import MPI

        if comm.Get_size() != p * p:
            raise H5LayoutError(f"a {p}x{p} grid writes with {p * p} ranks, the communicator has {comm.Get_size()}")
        self.path = Path(path)
        self.comm = comm
        self.p = p
        self.rank = comm.Get_rank()
        self.row, self.col = divmod(self.rank, p)
        self.fallback = bool(comm.allreduce(int(use_fallback(fallback)), op=MPI.MAX))
        self._datasets: dict[str, dict[str, Any]] = {}
        self._closed = False
        self._master: h5py.File | None = None
        if self.fallback:
            self.rank_path = rank_file_name(self.path, self.rank)
            if self.rank == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            comm.Barrier()
            self._file = h5py.File(self.rank_path, "w", libver=LIBVER)
            self._file.attrs.update({"format": FORMAT, "master": self.path.name, "rank": self.rank,
                                     "row": self.row, "col": self.col})
            begin(self._file)
            if self.rank == 0:
                self._master = h5py.File(self.path, "w", libver=LIBVER)
        else:
            self.rank_path = None
            if self.rank == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            comm.Barrier()
            # large chunks start on 1 MiB boundaries (file-system stripes); small metadata stays packed
            self._file = h5py.File(self.path, "w", driver="mpio", comm=comm, libver=LIBVER,
                                   alignment_threshold=1 << 20, alignment_interval=1 << 20)
            self._master = self._file
        root = {"format": FORMAT, "foldcp_hpc_version": __version__, "writer": "fallback" if self.fallback else "mpio",
                "grid_p": p, **(attrs or {})}
        self.set_attrs(root)
        if self._master is not None:
            begin(self._master)

    @classmethod
    def for_grid(cls, path: str | Path, grid: "ProcessGrid", *, attrs: dict[str, Any] | None = None,
                 fallback: bool | None = None, replica: int = 0) -> "PairFile | None":
        """Open ``path`` for writing by replica ``replica`` of ``grid`` (its p x p ranks, ``grid.grid_group.comm``).

        Every rank of the grid calls it; ranks of other replicas (which hold the same tiles) get None and
        write nothing. Root attributes ``grid_dp`` and ``grid_p`` are added to ``attrs``.
        """
        if not 0 <= replica < grid.dp:
            raise H5LayoutError(f"replica {replica} does not exist in a grid of {grid.dp} replica(s)")
        if grid.replica != replica:
            return None
        return cls(path, grid.grid_group.comm, grid.p, attrs={"grid_dp": grid.dp, **(attrs or {})}, fallback=fallback)

    # ------------------------------------------------------------------------------------------------------------
    def set_attrs(self, values: dict[str, Any], name: str = "/") -> None:
        """Set attributes of group or dataset ``name`` (equal values on every rank). Dicts are stored as JSON."""
        if self._master is None:
            return
        if name not in self._master:
            raise H5LayoutError(f"{self.path}: no group or dataset {name} to set attributes on")
        target = self._master[name]
        for key, value in values.items():
            target.attrs[key] = json.dumps(value) if isinstance(value, dict) else value

    def create_group(self, name: str, attrs: dict[str, Any] | None = None) -> None:
        """Create group ``name`` (and its parents) with ``attrs``; datasets create their groups themselves."""
        if self._master is not None:
            self._master.require_group(name)
        self.set_attrs(attrs or {}, name)

    def create_pair(self, name: str, n_tokens: int, *, lead: tuple[int, ...] = (), trail: tuple[int, ...] = (),
                    dtype: Any = "float32", attrs: dict[str, Any] | None = None) -> None:
        """Create pair dataset ``name`` of shape ``[*lead, N, N, *trail]``.

        z [N, N, C_z]: ``trail=(C_z,)``; pae [S, N, N]: ``lead=(S,)``; ``attrs`` go on the dataset.
        """
        shape = pair_shape(n_tokens, tuple(lead), tuple(trail))
        self._create(name, "pair", shape, (len(lead), len(lead) + 1), n_tokens, dtype, attrs)

    def create_tokens(self, name: str, n_tokens: int, *, lead: tuple[int, ...] = (), trail: tuple[int, ...] = (),
                      dtype: Any = "float32", attrs: dict[str, Any] | None = None) -> None:
        """Create token dataset ``name`` of shape ``[*lead, N, *trail]`` (e.g. s: ``trail=(C_s,)``)."""
        shape = token_shape(n_tokens, tuple(lead), tuple(trail))
        self._create(name, "tokens", shape, (len(lead),), n_tokens, dtype, attrs)

    def _create(self, name: str, kind: str, shape: tuple[int, ...], dims: tuple[int, ...], n_tokens: int,
                dtype: Any, attrs: dict[str, Any] | None) -> None:
        import h5py

        if name in self._datasets:
            raise H5LayoutError(f"{self.path}: dataset {name} created twice")
        dtype = np.dtype(dtype)
        layout = TileLayout(n_tokens, self.p)
        chunks = chunk_shape(shape, dims, layout.n_local, dtype.itemsize)
        meta = {"foldcp_kind": kind, "token_dims": list(dims), "n_tokens": n_tokens, "writer_grid_p": self.p,
                "writer_chunks": list(chunks), **(attrs or {})}
        self._datasets[name] = {"kind": kind, "shape": shape, "dims": dims, "layout": layout, "dtype": dtype}
        if not self.fallback:
            self._file.create_dataset(name, shape, dtype, chunks=None if 0 in shape else chunks, fill_time="never")
            self.set_attrs(meta, name)
            return
        # fallback: this rank's real part in its own file, the master stitches every rank's part
        own = self._rank_shape(name, self.row, self.col)
        own_chunks = None if 0 in own else tuple(min(c, s) for c, s in zip(chunks, own, strict=True))
        self._file.create_dataset(name, own, dtype, chunks=own_chunks)
        if self._master is None:
            return
        virtual = h5py.VirtualLayout(shape=shape, dtype=dtype)
        for rank in range(self.p * self.p):
            row, col = divmod(rank, self.p)
            if kind == "tokens" and (row, col) != (0, 0):
                continue  # token datasets are written by rank 0 alone
            part = self._rank_shape(name, row, col)
            if 0 in part:
                continue  # a tile of padding only: no source
            source = h5py.VirtualSource(rank_file_name(self.path, rank).name, name, shape=part)
            virtual[self._global_region(name, row, col)] = source
        self._master.create_virtual_dataset(name, virtual, fillvalue=0)
        self.set_attrs(meta, name)

    def _rank_shape(self, name: str, row: int, col: int) -> tuple[int, ...]:
        """Shape of the real part rank (row, col) writes of ``name``: the real tile, or all of a token dataset."""
        entry = self._datasets[name]
        shape, dims, layout = list(entry["shape"]), entry["dims"], entry["layout"]
        if entry["kind"] == "tokens":
            return tuple(shape) if (row, col) == (0, 0) else tuple(0 for _ in shape)
        rows, cols = layout.valid(row), layout.valid(col)
        shape[dims[0]], shape[dims[1]] = rows.stop - rows.start, cols.stop - cols.start
        return tuple(shape)

    def _global_region(self, name: str, row: int, col: int) -> tuple[slice, ...]:
        """Where rank (row, col)'s real part of ``name`` lies in the logical dataset."""
        entry = self._datasets[name]
        region = [slice(None)] * len(entry["shape"])
        if entry["kind"] == "pair":
            region[entry["dims"][0]] = entry["layout"].valid(row)
            region[entry["dims"][1]] = entry["layout"].valid(col)
        return tuple(region)

    # ------------------------------------------------------------------------------------------------------------
    def write_tile(self, name: str, tile: Any, lead: tuple[int, ...] = ()) -> None:
        """Write this rank's tile of pair dataset ``name`` (collective: every rank calls it).

        Args:
            name: a dataset made by :meth:`create_pair`, shape ``[*lead_shape, N, N, *trail]``.
            tile: ``[*lead_shape[len(lead):], n_local, n_local, *trail]`` pair tile (row-block, col-block) of
                this rank, padded as the grid holds it (numpy array or torch tensor; padding is not written).
            lead: indices into the first lead dims (``lead=(s,)`` writes sample s of pae from a
                ``[n_local, n_local]`` tile).
        """
        entry = self._entry(name, "pair")
        tile = _as_numpy(tile)
        layout, dims, shape = entry["layout"], entry["dims"], entry["shape"]
        n_lead = dims[0]
        if len(lead) > n_lead:
            raise H5LayoutError(f"{name}: {len(lead)} lead indices for {n_lead} lead dim(s)")
        for index, size in zip(lead, shape[:len(lead)], strict=True):
            if not 0 <= index < size:
                raise H5LayoutError(f"{name}: lead index {index} out of range for size {size}")
        expected = (*shape[len(lead):n_lead], layout.n_local, layout.n_local, *shape[n_lead + 2:])
        if tuple(tile.shape) != expected:
            raise H5LayoutError(f"{name}: rank {self.rank} tile ({self.row}, {self.col}) has shape "
                                f"{tuple(tile.shape)}, expected {expected} (n_local {layout.n_local} of "
                                f"N {layout.n_global} on {self.p}x{self.p})")
        rows, cols = layout.valid(self.row), layout.valid(self.col)
        n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
        tdim = n_lead - len(lead)  # the tile's row dim
        row_bytes = tile.size // max(1, layout.n_local) * entry["dtype"].itemsize  # equal on every rank
        for piece in row_pieces(n_rows, layout.n_local, row_bytes, MAX_PIECE_BYTES):
            index = [slice(None)] * tile.ndim
            index[tdim], index[tdim + 1] = piece, slice(0, n_cols)
            data = tile[tuple(index)]
            if self.fallback:
                if data.size:
                    target = [*lead] + [slice(None)] * (len(shape) - len(lead))
                    target[n_lead] = slice(piece.start, piece.stop)
                    self._file[name][tuple(target)] = data
                continue
            start = [*lead, *([0] * (tdim)), rows.start + piece.start, cols.start, *([0] * (len(shape) - n_lead - 2))]
            count = [*([1] * len(lead)), *data.shape]
            _write_hyperslab(self._file[name], start, count, data)

    def write_tokens(self, name: str, values: Any) -> None:
        """Write token dataset ``name`` from ``values``, replicated on every rank (collective: every rank calls it).

        Args:
            values: ``[*lead, N or n_padded, *trail]`` (e.g. s: [N, C_s]), equal on every rank; padding rows
                past N are dropped. Rank 0's copy is written.
        """
        entry = self._entry(name, "tokens")
        values = _as_numpy(values)
        shape, dim, layout = entry["shape"], entry["dims"][0], entry["layout"]
        if values.ndim != len(shape) or values.shape[dim] not in (layout.n_global, layout.n_padded) or \
                values.shape[:dim] != shape[:dim] or values.shape[dim + 1:] != shape[dim + 1:]:
            raise H5LayoutError(f"{name}: values of shape {tuple(values.shape)} do not fit {shape} (token dim {dim}, "
                                f"N {layout.n_global} or padded {layout.n_padded})")
        real = values[(slice(None),) * dim + (slice(0, layout.n_global),)]
        if self.fallback:
            if self.rank == 0 and real.size:
                self._file[name][...] = real
            return
        mine = self.rank == 0 and real.size > 0
        _write_hyperslab(self._file[name], [0] * len(shape), list(shape) if mine else [0] * len(shape), real)

    def write_replicated(self, name: str, values: Any, attrs: dict[str, Any] | None = None) -> None:
        """Create and write small dataset ``name`` (counters, RNG states) from ``values``, equal on every rank.

        The shape and dtype must agree on every rank; rank 0's values are written (into the master file under
        the fallback).
        """
        values = _as_numpy(values)
        if name in self._datasets:
            raise H5LayoutError(f"{self.path}: dataset {name} created twice")
        self._datasets[name] = {"kind": "replicated", "shape": values.shape, "dtype": values.dtype}
        if self.fallback:
            if self._master is not None:
                self._master.create_dataset(name, data=values)
        else:
            dset = self._file.create_dataset(name, values.shape, values.dtype)
            mine = self.rank == 0 and values.size > 0
            _write_hyperslab(dset, [0] * values.ndim, list(values.shape) if mine else [0] * values.ndim, values)
        self.set_attrs({"foldcp_kind": "replicated", **(attrs or {})}, name)

    def _entry(self, name: str, kind: str) -> dict[str, Any]:
        entry = self._datasets.get(name)
        if entry is None:
            known = ", ".join(self._datasets) or "none"
            raise H5LayoutError(f"{self.path}: no dataset {name} was created (created: {known})")
        if entry["kind"] != kind:
            raise H5LayoutError(f"{self.path}: dataset {name} is a {entry['kind']} dataset, not {kind}")
        return entry

    # ------------------------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Flush every open file (collective under mpio)."""
        self._file.flush()
        if self._master is not None and self._master is not self._file:
            self._master.flush()

    def close(self, complete: bool = True) -> None:
        """Close the file(s); with ``complete`` mark them complete first (collective: every rank calls it).

        Fallback order: every rank marks and closes its rank file, all ranks meet, then rank 0 marks and
        closes the master, and all meet again, so a complete master implies complete rank files and the
        master is whole when this returns on any rank.
        """
        if self._closed:
            return
        self._closed = True
        if not self.fallback:
            if complete:
                mark_complete(self._file)
            self._file.close()
            self.comm.Barrier()
            return
        if complete:
            mark_complete(self._file)
        self._file.close()
        self.comm.Barrier()
        if self._master is not None:
            if complete:
                mark_complete(self._master)
            self._master.close()
        self.comm.Barrier()

    def __enter__(self) -> "PairFile":
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        self.close(complete=exc_type is None)

    def __repr__(self) -> str:
        writer = "fallback" if self.fallback else "mpio"
        return f"PairFile({str(self.path)!r}, p={self.p}, rank={self.rank}, writer={writer})"


def _write_hyperslab(dset: "h5py.Dataset", start: list[int], count: list[int], data: np.ndarray) -> None:
    """Collectively write ``data`` into ``dset[start : start + count]``; an empty ``count`` writes nothing but
    still takes part (h5py's ``dset[...] = ...`` skips empty selections, which would hang the other ranks)."""
    from h5py import h5fd, h5p, h5s

    dxpl = h5p.create(h5p.DATASET_XFER)
    dxpl.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE)
    fspace = dset.id.get_space()
    if 0 in count or not count:
        fspace.select_none()
        mspace = h5s.create_simple((1,))
        mspace.select_none()
        buffer = np.zeros(1, dtype=dset.dtype)
    else:
        fspace.select_hyperslab(tuple(start), tuple(count))
        mspace = h5s.create_simple(tuple(count))
        buffer = np.ascontiguousarray(data.reshape(count), dtype=dset.dtype)
    dset.id.write(mspace, fspace, buffer, dxpl=dxpl)


def _as_numpy(array: Any) -> np.ndarray:
    """A numpy view of ``array`` (torch tensors leave the device; bfloat16 widens to float32)."""
    if hasattr(array, "detach"):
        import torch

        tensor = array.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(array)


# ----------------------------------------------------------------------------------------------------------------
class _Opened:
    """Context manager: an open h5py file or group as given, or ``path`` opened read-only and closed after."""

    def __init__(self, source: Any):
        self.source = source
        self.file: Any = None

    def __enter__(self) -> Any:
        import h5py

        if isinstance(self.source, (str, Path)):
            self.file = h5py.File(self.source, "r")
            return self.file
        return self.source

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def _dataset(h5: Any, name: str) -> "h5py.Dataset":
    import h5py

    obj = h5.get(name)
    if not isinstance(obj, h5py.Dataset):
        where = getattr(getattr(h5, "file", None), "filename", "?")
        raise H5LayoutError(f"{where}: no dataset {name}")
    return obj


def token_dims(dset: "h5py.Dataset") -> tuple[int, ...]:
    """The token dims of a tiled dataset (attribute ``token_dims``): (0, 1) for z, (1, 2) for pae, (0,) for s."""
    if "token_dims" not in dset.attrs:
        raise H5LayoutError(f"{dset.file.filename}: dataset {dset.name} has no 'token_dims' attribute "
                            f"(not written as tiles)")
    return tuple(int(d) for d in dset.attrs["token_dims"])


def read_tile(source: Any, name: str, p: int, row: int, col: int, lead: tuple[int, ...] = ()) -> np.ndarray:
    """Tile (row, col) of pair dataset ``name`` on a p x p grid, whatever grid wrote it.

    Args:
        source: a path, or an open h5py file.
        lead: indices into the first lead dims (``(s,)``: sample s of pae).

    Returns:
        ``[*lead_rest, n_local, n_local, *trail]`` pair tile (row-block, col-block) of the p x p grid, zero past N.
    """
    with _Opened(source) as h5:
        dset = _dataset(h5, name)
        dims = token_dims(dset)
        if len(dims) != 2:
            raise H5LayoutError(f"{dset.file.filename}: dataset {name} is not a pair dataset (token dims {dims})")
        layout = TileLayout(int(dset.shape[dims[0]]), p)
        if not (0 <= row < p and 0 <= col < p):
            raise H5LayoutError(f"tile ({row}, {col}) out of range for a {p}x{p} grid")
        if len(lead) > dims[0]:
            raise H5LayoutError(f"{name}: {len(lead)} lead indices for {dims[0]} lead dim(s)")
        shape = dset.shape
        out = np.zeros((*shape[len(lead):dims[0]], layout.n_local, layout.n_local, *shape[dims[1] + 1:]), dset.dtype)
        rows, cols = layout.valid(row), layout.valid(col)
        if rows.stop > rows.start and cols.stop > cols.start and out.size:
            source_sel = (*lead, *([slice(None)] * (dims[0] - len(lead))), rows, cols)
            dest = (*([slice(None)] * (dims[0] - len(lead))), slice(0, rows.stop - rows.start),
                    slice(0, cols.stop - cols.start))
            out[dest] = dset[source_sel]
        return out


def read_tokens(source: Any, name: str, p: int, index: int) -> np.ndarray:
    """Token block ``index`` of token dataset ``name`` on a p x p grid: ``[*lead, n_local, *trail]``, zero past N."""
    with _Opened(source) as h5:
        dset = _dataset(h5, name)
        dims = token_dims(dset)
        if len(dims) != 1:
            raise H5LayoutError(f"{dset.file.filename}: dataset {name} is not a token dataset (token dims {dims})")
        dim = dims[0]
        layout = TileLayout(int(dset.shape[dim]), p)
        if not 0 <= index < p:
            raise H5LayoutError(f"block {index} out of range for p={p}")
        shape = dset.shape
        out = np.zeros((*shape[:dim], layout.n_local, *shape[dim + 1:]), dset.dtype)
        block = layout.valid(index)
        if block.stop > block.start and out.size:
            out[(slice(None),) * dim + (slice(0, block.stop - block.start),)] = dset[(slice(None),) * dim + (block,)]
        return out


def read_full(source: Any, name: str) -> np.ndarray:
    """The whole dataset ``name`` in its logical shape (serial; for tests and small files)."""
    with _Opened(source) as h5:
        return _dataset(h5, name)[()]


def iter_datasets(source: Any) -> Iterator[tuple[str, "h5py.Dataset"]]:
    """``(name, dataset)`` for every dataset of an open file, in name order."""
    import h5py

    found: list[tuple[str, Any]] = []
    source.visititems(lambda name, obj: found.append(("/" + name, obj)) if isinstance(obj, h5py.Dataset) else None)
    yield from sorted(found, key=lambda item: item[0])
