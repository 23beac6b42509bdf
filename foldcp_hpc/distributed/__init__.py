"""Context parallelism: the process grid, pure tile layout, and the collectives that move tiles.

Importing this package does no MPI or torch.distributed work; :meth:`ProcessGrid.create` does.
"""

from .grid import AxisGroup, GridError, ProcessGrid
from .layout import TileLayout

__all__ = ["AxisGroup", "GridError", "ProcessGrid", "TileLayout"]
