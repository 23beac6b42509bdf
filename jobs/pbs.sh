#!/usr/bin/env bash
# foldcp-hpc on PBS Pro / OpenPBS: 64 ranks (an 8 x 8 grid) on 16 nodes of 4 GPUs, one rank per GPU.
#
#     foldcp-hpc validate jobs/large_assembly.toml --ranks 64                 # first, on the login node
#     qsub jobs/pbs.sh                                                        # folds jobs/large_assembly.toml
#     qsub -v FOLDCP_JOB=jobs/my.toml,FOLDCP_OVERRIDES="sampling.diffusion_samples=5" jobs/pbs.sh
#     qsub -l select=4:ncpus=32:ngpus=4:mpiprocs=4 -v FOLDCP_JOB=jobs/my.toml jobs/pbs.sh   # 16 ranks: 4 x 4
#
# Assumptions (edit the #PBS lines and the variables below for your site):
#   - PBS Pro 2021+ or OpenPBS 20+ with GPUs as the ngpus resource; qsub passes no script arguments, so the job
#     file and overrides come in through -v FOLDCP_JOB=...,FOLDCP_OVERRIDES=... .
#   - Open MPI 4.1 or 5 built with PBS (tm) support, the MPI mpi4py was built against: its mpiexec reads the
#     nodes and the mpiprocs per node from PBS itself. Loaded with torch's CUDA by FOLDCP_MODULES (names differ
#     per site; empty: load nothing). With HPE Cray PALS use `mpiexec -n 64 --ppn 4 --depth 8` instead.
#   - 4 GPUs per node (select=...:ngpus=4:mpiprocs=4): every rank sees all GPUs of its node and takes the one
#     of its node-local rank.
#   - The venv is FOLDCP_VENV, by default .venv in the directory qsub was called from (the repository root).
#   - No checkpoint before the walltime: PBS sends SIGTERM at the limit and SIGKILL after its kill_delay, and
#     foldcp-hpc run does not write checkpoints yet; give the job enough walltime.
#PBS -N foldcp
#PBS -l select=16:ncpus=32:ngpus=4:mpiprocs=4
#PBS -l walltime=24:00:00
#PBS -j oe
set -euo pipefail

cd "${PBS_O_WORKDIR:-$PWD}"
FOLDCP_JOB="${FOLDCP_JOB:-jobs/large_assembly.toml}"
FOLDCP_OVERRIDES="${FOLDCP_OVERRIDES:-}"
FOLDCP_VENV="${FOLDCP_VENV:-$PWD/.venv}"
FOLDCP_MODULES="${FOLDCP_MODULES-openmpi cuda}"

if [ -n "$FOLDCP_MODULES" ]; then
  # shellcheck disable=SC2086 # a list of module names
  module load $FOLDCP_MODULES
fi

# PBS writes one line per MPI slot (mpiprocs per chunk) into the node file: that is the rank count.
nranks=$(wc -l < "$PBS_NODEFILE")
echo "foldcp: PBS job ${PBS_JOBID:-?} on $(sort -u "$PBS_NODEFILE" | wc -l) node(s), $nranks ranks: $FOLDCP_JOB $FOLDCP_OVERRIDES"

# -x: Open MPI passes only the variables named here to remote ranks. Threads per rank = ncpus / mpiprocs of the
# select line (PBS itself sets OMP_NUM_THREADS to the chunk's ncpus, which four ranks would oversubscribe).
# shellcheck disable=SC2086 # overrides are separate words
exec mpiexec -n "$nranks" -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS="${FOLDCP_THREADS_PER_RANK:-8}" \
  "$FOLDCP_VENV/bin/foldcp-hpc" run "$FOLDCP_JOB" $FOLDCP_OVERRIDES
