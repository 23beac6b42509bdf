"""foldcp_hpc: context-parallel Boltz-2 structure prediction on a 2-D grid of MPI ranks.

Nothing here touches MPI or torch.distributed at import time: the grid is built by
:func:`foldcp_hpc.distributed.grid.ProcessGrid.create` when a job starts.
"""

__version__ = "0.1.0"
