#!/usr/bin/env bash
# foldcp-hpc with plain mpirun, no scheduler: one GPU server, or several listed in a hostfile.
#
#     jobs/mpirun.sh jobs/demo.toml                                  # this node: one rank per GPU (4 GPUs: 2 x 2)
#     NP=9 jobs/mpirun.sh jobs/demo.toml runtime.backend=host        # 3 x 3 ranks sharing fewer GPUs
#     HOSTFILE=hosts GPUS_PER_NODE=4 NP=64 jobs/mpirun.sh jobs/large_assembly.toml
#
# Assumptions:
#   - Open MPI 4.1 or 5 (the MPI mpi4py was built against) on PATH; with a hostfile, passwordless ssh to every
#     host and the same paths (repository and venv) on all of them, e.g. a shared file system.
#   - NP defaults to the GPUs nvidia-smi lists on this node (one rank per GPU; every rank sees all GPUs of its
#     node and takes the one of its node-local rank), or 4 CPU ranks without GPUs. NP must be dp * p^2.
#   - A hostfile lists one host per line, `host slots=GPUS_PER_NODE`; ranks fill each host with GPUS_PER_NODE
#     ranks (default 4) before the next.
#   - The venv is FOLDCP_VENV, by default .venv in the repository (jobs/setup-env.sh makes it).
#   - For a laptop or a CPU-only machine with more ranks than cores use jobs/mpirun-local.sh instead
#     (oversubscription, running as root in containers).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: [NP=ranks] [HOSTFILE=file GPUS_PER_NODE=n] $0 job.toml [section.key=value ...]" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FOLDCP_VENV="${FOLDCP_VENV:-$repo/.venv}"
GPUS_PER_NODE="${GPUS_PER_NODE:-4}"
if [ -z "${NP:-}" ]; then
  gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  NP=$(( gpus > 0 ? gpus : 4 ))
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

placement=()
if [ -n "${HOSTFILE:-}" ]; then
  placement=(--hostfile "$HOSTFILE" --map-by "ppr:${GPUS_PER_NODE}:node")
fi
echo "foldcp: $NP ranks${HOSTFILE:+ over the hosts in $HOSTFILE}: $*"
# -x: Open MPI passes only the variables named here to ranks on other hosts.
exec mpirun -n "$NP" "${placement[@]}" -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS \
  "$FOLDCP_VENV/bin/foldcp-hpc" run "$@"
