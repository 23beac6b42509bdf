"""Context parallelism: the process grid, pure tile layout, and the collectives that move tiles.

Importing this package does no MPI or torch.distributed work; :meth:`ProcessGrid.create` does. The public
names are loaded on first use, so that code needing only the layout maths or the backend names (the job-file
checks) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AxisGroup", "GridError", "ProcessGrid", "TileLayout"]

_WHERE = {"AxisGroup": ".grid", "GridError": ".grid", "ProcessGrid": ".grid", "TileLayout": ".layout"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
