"""``foldcp-hpc inspect FILE [--plot NAME --out x.png]``: what an HDF5 file of foldcp_hpc holds, and pictures.

The summary lists the root attributes (stage, grid, dtype, version, checkpoint counters), whether the file
is complete (see :mod:`foldcp_hpc.io.h5complete`), and every dataset with its shape, dtype, chunks and
placement. ``--plot`` draws a pair quantity as a PNG, reading the file in blocks of at most ``BLOCK_BYTES``
and averaging K x K token blocks as it goes, so a 30,000 x 30,000 matrix never sits in memory whole:

* ``[N, N, bins]`` distogram logits: the argmax bin (``--quantity argmax``, default for names containing
  "distogram") or the expected distance (``expected``: softmax over bins, bin centres spread evenly over the
  dataset's ``min_dist``..``max_dist`` attributes, Boltz-2's 2 and 22 A by default);
* ``[S, N, N]`` (pae, pde): sample ``--sample`` (``value``);
* ``[N, N, C]`` pair representation: the norm ||z_ij|| over channels (``norm``, default for other pair data).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UniformError

__all__ = ["InspectError", "summary", "pair_image", "plot", "run_inspect", "BLOCK_BYTES", "MAX_PIXELS"]

BLOCK_BYTES = 64 * 1024 * 1024  # the most one read of a plot holds
MAX_PIXELS = 2048  # default downsampling keeps the image at most this many pixels a side
QUANTITIES = ("argmax", "expected", "norm", "value")
_KNOWN = ("stage", "model", "grid_dp", "grid_p", "dtype", "writer", "foldcp_hpc_version", "format")


class InspectError(UniformError):
    """A file or field that cannot be inspected; the message names both."""


def _open(path: str | Path) -> Any:
    import h5py

    path = Path(path)
    if not path.exists():
        raise InspectError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise InspectError(f"{path}: not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InspectError(f"{path}: cannot be opened as HDF5 ({str(exc).splitlines()[0]})") from None


def _text(value: Any, width: int = 100) -> str:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    text = str(value)
    lines = text.splitlines() or [""]
    if len(lines) > 1:
        return f"{lines[0][:width]} ... ({len(lines)} lines, {len(text)} chars)"
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} chars)"


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def summary(path: str | Path) -> str:
    """A readable account of ``path``: completeness, root attributes, groups and datasets."""
    import h5py

    from .io.h5complete import COMPLETE_ATTR, MANIFEST_ATTR, problems

    path = Path(path)
    issues = problems(path)
    with _open(path) as h5:
        attrs = dict(h5.attrs)
        lines = [f"{path}: {_size(path.stat().st_size)}"]
        if not issues:
            state = "complete (marker set, sizes match the manifest, every part present)"
        elif COMPLETE_ATTR in attrs and not bool(attrs[COMPLETE_ATTR]):
            state = "INCOMPLETE (written partly or not closed; do not resume from it)"
        else:
            state = "NOT VERIFIED: " + "; ".join(issues)
        lines.append(f"  state     {state}")
        version, writer = attrs.get("foldcp_hpc_version"), attrs.get("writer")
        if version is not None:
            lines.append(f"  written   by foldcp_hpc {_text(version)} ({_text(writer)} writer)")
        if "grid_p" in attrs:
            p, dp = int(attrs["grid_p"]), int(attrs.get("grid_dp", 1))
            lines.append(f"  grid      {dp}x{p}x{p} (dp x p x p), {p * p} writing rank(s)")
        for key in ("stage", "model", "dtype"):
            if key in attrs:
                lines.append(f"  {key:<9} {_text(attrs[key])}")
        others = [k for k in attrs if k not in (*_KNOWN, COMPLETE_ATTR, MANIFEST_ATTR)]
        if others:
            lines.append("attributes:")
            lines.extend(f"  {key:<24} {_text(attrs[key])}" for key in sorted(others))
        lines.append("contents:")
        rows: list[tuple[str, ...]] = []

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                rows.append(_dataset_row("/" + name, obj))
            elif obj.attrs:
                group_attrs = ", ".join(f"{k}={_text(v, 40)}" for k, v in obj.attrs.items())
                rows.append((f"/{name}/", "group", "", "", "", group_attrs))

        h5.visititems(visit)
        if not rows:
            lines.append("  (none)")
        widths = [max(len(r[i]) for r in rows) for i in range(5)] if rows else []
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[5])
    return "\n".join(line.rstrip() for line in lines)


def _dataset_row(name: str, dset: Any) -> tuple[str, ...]:
    shape = "[" + ", ".join(str(s) for s in dset.shape) + "]"
    if dset.is_virtual:
        sources = {s.file_name for s in dset.virtual_sources()}
        storage = f"virtual, {len(sources)} file(s)"
    elif dset.chunks is not None:
        storage = "chunks [" + ", ".join(str(c) for c in dset.chunks) + "]"
    else:
        storage = "contiguous"
    kind = dset.attrs.get("foldcp_kind")
    if isinstance(kind, bytes):
        kind = kind.decode()
    placement = ""
    if kind in ("pair", "tokens"):
        dims = ",".join(str(int(d)) for d in dset.attrs.get("token_dims", []))
        placement = f"{kind} (token dims {dims}; tiles of grid p={int(dset.attrs.get('writer_grid_p', 0))})"
    elif kind:
        placement = str(kind)
    extra = {k: v for k, v in dset.attrs.items()
             if k not in ("foldcp_kind", "token_dims", "n_tokens", "writer_grid_p", "writer_chunks")}
    if extra:
        placement += (" " if placement else "") + ", ".join(f"{k}={_text(v, 40)}" for k, v in extra.items())
    nbytes = math.prod(dset.shape) * dset.dtype.itemsize
    return name, shape, str(dset.dtype), storage, _size(nbytes), placement


# ----------------------------------------------------------------------------------------------------------------
def _default_quantity(name: str, dset: Any, dims: tuple[int, int]) -> str:
    if dims[1] == dset.ndim - 1:
        return "value"
    return "argmax" if "distogram" in name.lower() else "norm"


def _pair_dims(path: Path, name: str, dset: Any) -> tuple[int, int]:
    if "token_dims" in dset.attrs:
        dims = tuple(int(d) for d in dset.attrs["token_dims"])
    else:  # a file from elsewhere: take the first two equal dims
        dims = next(((i, i + 1) for i in range(dset.ndim - 1) if dset.shape[i] == dset.shape[i + 1]), ())
    if len(dims) != 2:
        raise InspectError(f"{path}: {name}: shape {list(dset.shape)} is not a pair quantity (no N x N dims)")
    return dims  # type: ignore[return-value]


def _reduce(block: np.ndarray, quantity: str, dims: tuple[int, int], attrs: Any) -> np.ndarray:
    """``[b_i, b_j]`` quantity of a block ``[*lead, b_i, b_j, *trail]`` (lead dims already indexed away)."""
    trail = block.shape[2:]
    if quantity == "value":
        return block.astype(np.float64)
    if quantity == "norm":  # no block-sized temporaries: the block is the largest thing held
        flat = block.reshape(*block.shape[:2], -1)
        return np.sqrt(np.einsum("ijc,ijc->ij", flat, flat, dtype=np.float64))
    logits = block.reshape(*block.shape[:2], -1, trail[-1])[:, :, 0, :]  # first distogram head
    if quantity == "argmax":
        return logits.argmax(-1).astype(np.float64)
    low = float(attrs.get("min_dist", 2.0))
    high = float(attrs.get("max_dist", 22.0))
    centres = np.linspace(low, high, logits.shape[-1])
    weights = logits - logits.max(-1, keepdims=True)
    np.exp(weights, out=weights)
    return (weights @ centres) / weights.sum(-1, dtype=np.float64)


def pair_image(path: str | Path, name: str, *, quantity: str | None = None, downsample: int | None = None,
               sample: int = 0) -> tuple[np.ndarray, str, int]:
    """The K x K block means of a pair quantity of dataset ``name``, read block by block.

    Returns:
        ``(image, quantity, K)``: image ``[ceil(N / K), ceil(N / K)]`` float64, the quantity drawn, and K.
    """
    path = Path(path)
    with _open(path) as h5:
        obj = h5.get(name)
        if obj is None or not hasattr(obj, "shape"):
            names: list[str] = []
            h5.visititems(lambda n, o: names.append("/" + n) if hasattr(o, "shape") else None)
            raise InspectError(f"{path}: no dataset {name} (datasets: {', '.join(names) or 'none'})")
        dset = obj
        dims = _pair_dims(path, name, dset)
        quantity = quantity or _default_quantity(name, dset, dims)
        if quantity not in QUANTITIES:
            raise InspectError(f"{path}: {name}: unknown quantity {quantity!r}; "
                               f"expected one of {', '.join(QUANTITIES)}")
        trail = dset.shape[dims[1] + 1:]
        if quantity in ("argmax", "expected") and not trail:
            raise InspectError(f"{path}: {name}: {quantity} needs a bins dim after the N x N dims, "
                               f"shape {list(dset.shape)}")
        if quantity == "value" and trail:
            raise InspectError(f"{path}: {name}: shape {list(dset.shape)} has channels; use --quantity norm")
        lead = dset.shape[:dims[0]]
        if lead and not 0 <= sample < math.prod(lead):
            raise InspectError(f"{path}: {name}: sample {sample} out of range for {math.prod(lead)} sample(s)")
        lead_index = np.unravel_index(sample, lead) if lead else ()
        n = int(dset.shape[dims[0]])
        k = downsample or max(1, -(-n // MAX_PIXELS))
        if k < 1:
            raise InspectError(f"{path}: --downsample must be positive, got {k}")
        m = -(-n // k)
        per_token_pair = max(1, math.prod(trail)) * dset.dtype.itemsize
        side = dset.chunks[dims[0]] if dset.chunks else n
        side = min(side, max(1, int(math.isqrt(BLOCK_BYTES // per_token_pair))))
        side = max(k, side // k * k)  # whole K x K cells per block
        total = np.zeros((m, m))
        count = np.zeros((m, m))
        for i0 in range(0, n, side):
            for j0 in range(0, n, side):
                rows, cols = slice(i0, min(i0 + side, n)), slice(j0, min(j0 + side, n))
                block = dset[(*(int(x) for x in lead_index), rows, cols)]
                values = _reduce(block, quantity, dims, dset.attrs)
                _accumulate(total, count, values, i0 // k, j0 // k, k)
        return total / np.maximum(count, 1), quantity, k


def _accumulate(total: np.ndarray, count: np.ndarray, values: np.ndarray, ci: int, cj: int, k: int) -> None:
    """Add ``values`` [b_i, b_j] (starting on a cell boundary) into K x K cells ``total`` [m, m] from (ci, cj)."""
    bi, bj = values.shape
    mi, mj = -(-bi // k), -(-bj // k)
    padded = np.zeros((mi * k, mj * k))
    weight = np.zeros((mi * k, mj * k))
    padded[:bi, :bj] = values
    weight[:bi, :bj] = 1.0
    total[ci:ci + mi, cj:cj + mj] += padded.reshape(mi, k, mj, k).sum((1, 3))
    count[ci:ci + mi, cj:cj + mj] += weight.reshape(mi, k, mj, k).sum((1, 3))


def plot(path: str | Path, name: str, out: str | Path, *, quantity: str | None = None,
         downsample: int | None = None, sample: int = 0) -> str:
    """Write a PNG of ``name`` to ``out``; returns a one-line description of what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, quantity, k = pair_image(path, name, quantity=quantity, downsample=downsample, sample=sample)
    labels = {"argmax": "argmax distogram bin", "expected": "expected distance (A)", "norm": "||z_ij||",
              "value": "value"}
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=150)
    shown = ax.imshow(image, cmap="viridis_r" if quantity in ("argmax", "expected", "value") else "viridis",
                      interpolation="nearest", extent=(0, image.shape[1] * k, image.shape[0] * k, 0))
    fig.colorbar(shown, ax=ax, label=labels[quantity])
    ax.set_title(f"{Path(path).name}:{name} {quantity}" + (f" sample {sample}" if quantity == "value" else "")
                 + (f" ({k}x{k} block means)" if k > 1 else ""), fontsize=9)
    ax.set_xlabel("token j")
    ax.set_ylabel("token i")
    fig.tight_layout()
    out = Path(out)
    try:
        fig.savefig(out)
    except OSError as exc:
        raise InspectError(f"{out}: cannot write the PNG ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return f"wrote {out}: {name} {quantity}, {image.shape[0]}x{image.shape[1]} pixels (K={k})"


def run_inspect(path: str, plot_name: str | None = None, out: str | None = None, quantity: str | None = None,
                downsample: int | None = None, sample: int = 0) -> int:
    """The ``inspect`` command: print the summary; with ``plot_name`` also write the PNG."""
    print(summary(path), flush=True)
    if plot_name is not None:
        target = out or f"{Path(path).stem}{plot_name.replace('/', '_')}.png"
        print(plot(path, plot_name, target, quantity=quantity, downsample=downsample, sample=sample), flush=True)
    return 0
