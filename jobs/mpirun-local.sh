#!/usr/bin/env bash
# Launch an MPI program with Open MPI on this one machine, e.g.
#     jobs/mpirun-local.sh -n 4 .venv/bin/foldcp-hpc info jobs/demo.toml
#
# Assumptions: Open MPI (Debian's openmpi-bin, 4.1), one node, any number of cores. For the launched job only
# (never the calling shell) it sets:
#   - OMPI_ALLOW_RUN_AS_ROOT / _CONFIRM when run as root (containers, CI);
#   - oversubscription and no core binding, so more ranks than cores run (slowly) instead of refusing;
#   - OMP_NUM_THREADS=1 unless already set, so oversubscribed ranks do not fight over threads;
#   - the shared-memory transport without single-copy (CMA), which containers often forbid.
# Clusters use their own launchers: see jobs/slurm.sbatch, jobs/pbs.sh and jobs/mpirun.sh (docs/running.md).
set -euo pipefail
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
export OMPI_MCA_rmaps_base_oversubscribe=1
exec mpirun --oversubscribe --bind-to none "$@"
