"""Completion marking of HDF5 files, their verification, and keep-last-two rotation of checkpoint names.

A file is *complete* when its root attribute ``complete`` is True. Writers set it False at creation and
True last, after the data is flushed and after a ``manifest`` attribute (JSON: every dataset's shape and
dtype) is written, so a file cut short anywhere before that final step reads as incomplete. :func:`verify`
checks more than the flag: the file opens, the manifest matches the datasets, every allocated chunk lies
inside the file, and for a fallback master every rank file it stitches is complete too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "COMPLETE_ATTR",
    "MANIFEST_ATTR",
    "begin",
    "mark_complete",
    "manifest",
    "problems",
    "verify",
    "checkpoint_name",
    "parse_checkpoint_name",
    "rotation",
    "latest_complete",
]

COMPLETE_ATTR = "complete"
MANIFEST_ATTR = "manifest"


def manifest(h5: Any) -> dict[str, dict[str, Any]]:
    """``{"/trunk/z": {"shape": [N, N, C], "dtype": "float32"}, ...}`` for every dataset of open file ``h5``."""
    import h5py

    found: dict[str, dict[str, Any]] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found["/" + name] = {"shape": list(obj.shape), "dtype": str(obj.dtype)}

    h5.visititems(visit)
    return dict(sorted(found.items()))


def begin(h5: Any) -> None:
    """Mark open file ``h5`` incomplete (collective under the mpio driver: every rank calls it)."""
    h5.attrs[COMPLETE_ATTR] = False


def mark_complete(h5: Any) -> None:
    """Flush ``h5``, write its manifest, flush, then set ``complete`` True and flush again.

    Under the mpio driver every rank calls it (attribute writes are collective and must carry equal values;
    the manifest is computed from metadata every rank sees alike).
    """
    h5.flush()
    h5.attrs[MANIFEST_ATTR] = json.dumps(manifest(h5))
    h5.flush()
    h5.attrs[COMPLETE_ATTR] = True
    h5.flush()


def problems(path: str | Path, *, _depth: int = 0) -> list[str]:
    """Everything wrong with ``path`` as a finished file, one line each; empty when it is complete and whole.

    Never raises for a bad file: a missing, truncated, non-HDF5 or half-written file gives a line saying so.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        return [f"{path}: no such file"]
    try:
        size = path.stat().st_size
        with h5py.File(path, "r") as h5:
            return _check_open(h5, path, size, _depth)
    except Exception as exc:  # noqa: BLE001 - any failure to read means "not a good file"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [f"{path}: cannot be read as HDF5 ({first})"]


def _check_open(h5: Any, path: Path, size: int, depth: int) -> list[str]:
    import h5py

    found: list[str] = []
    if not bool(h5.attrs.get(COMPLETE_ATTR, False)):
        state = "missing" if COMPLETE_ATTR not in h5.attrs else "False"
        found.append(f"{path}: attribute '{COMPLETE_ATTR}' is {state} (written partly or not finished)")
        return found
    if MANIFEST_ATTR not in h5.attrs:
        return [f"{path}: attribute '{MANIFEST_ATTR}' is missing"]
    expected = json.loads(h5.attrs[MANIFEST_ATTR])
    actual = manifest(h5)
    for name, entry in expected.items():
        if name not in actual:
            found.append(f"{path}: dataset {name} listed in the manifest is missing")
        elif actual[name] != entry:
            found.append(f"{path}: dataset {name} is {actual[name]['shape']} {actual[name]['dtype']}, "
                         f"the manifest says {entry['shape']} {entry['dtype']}")
    for name in actual.keys() - expected.keys():
        found.append(f"{path}: dataset {name} is not in the manifest")
    sources: set[Path] = set()

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        if obj.is_virtual:
            for source in obj.virtual_sources():
                sources.add(_source_path(path, source.file_name))
            return
        end = _storage_end(obj)
        if end > size:
            found.append(f"{path}: dataset /{name} needs {end} bytes, the file has {size} (truncated)")

    h5.visititems(visit)
    if depth == 0:
        for source in sorted(sources):
            found.extend(problems(source, _depth=depth + 1))
    return found


def _source_path(master: Path, file_name: str) -> Path:
    """Where HDF5 finds a virtual source named ``file_name`` of ``master``: relative to the master's folder."""
    if file_name == ".":
        return master
    source = Path(file_name)
    return source if source.is_absolute() else master.parent / source


def _storage_end(dset: Any) -> int:
    """One past the last byte of ``dset``'s data in its file (0 when nothing is allocated)."""
    if dset.chunks is None:
        offset = dset.id.get_offset()
        return 0 if offset is None else offset + dset.id.get_storage_size()
    end = 0
    if not hasattr(dset.id, "get_chunk_info"):  # h5py built against HDF5 < 1.10.5: no chunk query
        return 0
    for index in range(dset.id.get_num_chunks()):
        info = dset.id.get_chunk_info(index)
        if info.byte_offset is not None:
            end = max(end, info.byte_offset + info.size)
    return end


def verify(path: str | Path) -> bool:
    """True when ``path`` is a complete, whole file (see :func:`problems`); False, never an exception, otherwise."""
    return not problems(path)


# ----------------------------------------------------------------------------------------------------------------
_NAME = "{prefix}-{counter:08d}.h5"


def checkpoint_name(prefix: str, counter: int) -> str:
    """``ckpt-00000042.h5`` for prefix ``ckpt`` and counter 42 (counters sort as names)."""
    if counter < 0:
        raise ValueError(f"checkpoint counter must be non-negative, got {counter}")
    return _NAME.format(prefix=prefix, counter=counter)


def parse_checkpoint_name(name: str, prefix: str) -> tuple[int, int | None] | None:
    """``(counter, rank)`` of a checkpoint master (rank None) or fallback rank file of ``prefix``; None otherwise."""
    match = re.fullmatch(re.escape(prefix) + r"-(\d+)(?:\.rank(\d+))?\.h5", os.path.basename(name))
    if match is None:
        return None
    return int(match.group(1)), None if match.group(2) is None else int(match.group(2))


def rotation(names: Iterable[str], prefix: str, keep: int = 2,
             complete: Iterable[str] | None = None) -> list[str]:
    """The names to delete so that only the newest ``keep`` complete checkpoints of ``prefix`` stay (pure).

    Args:
        names: file names (or paths) in the checkpoint folder; other files are ignored.
        prefix: the checkpoint prefix (``ckpt`` for ``ckpt-00000042.h5``).
        keep: complete checkpoints to keep (at least 1).
        complete: the masters known to be complete (e.g. those :func:`verify` accepts); None takes every
            master as complete.

    A checkpoint is its master plus its fallback rank files; they go together. Incomplete checkpoints
    older than the newest complete one are deleted (they can never be resumed); newer ones are kept,
    since they may still be being written.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    by_counter: dict[int, list[str]] = {}
    masters: dict[int, str] = {}
    for name in names:
        parsed = parse_checkpoint_name(name, prefix)
        if parsed is None:
            continue
        counter, rank = parsed
        by_counter.setdefault(counter, []).append(name)
        if rank is None:
            masters[counter] = name
    good_names = None if complete is None else {os.path.basename(n) for n in complete}
    good = sorted(c for c, m in masters.items() if good_names is None or os.path.basename(m) in good_names)
    kept = set(good[-keep:])
    newest = good[-1] if good else -1
    doomed = [c for c in by_counter if c not in kept and c < newest]
    return sorted(name for c in doomed for name in by_counter[c])


def latest_complete(folder: str | Path, prefix: str) -> Path | None:
    """The newest checkpoint master of ``prefix`` in ``folder`` that :func:`verify` accepts; None if there is none.

    A damaged or half-written newer checkpoint is passed over for the one before it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    masters = []
    for path in folder.iterdir():
        parsed = parse_checkpoint_name(path.name, prefix)
        if parsed is not None and parsed[1] is None:
            masters.append((parsed[0], path))
    for _, path in sorted(masters, reverse=True):
        if verify(path):
            return path
    return None
