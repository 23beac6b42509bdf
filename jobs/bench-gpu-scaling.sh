#!/usr/bin/env bash
# Pairformer-layer scaling on one node with >= 4 GPUs: p = 1 on one GPU against a 2x2 NCCL grid (one rank per
# GPU), strong scaling (same N) and weak scaling (N^2/P constant), plus the largest N that fits.
#
#     jobs/bench-gpu-scaling.sh [strong|weak|largest|all] [dtype]      # dtype: bfloat16 (default: the fast path), float32
#
# Assumptions: one node, 4+ NVIDIA GPUs, Open MPI's mpirun, a python with torch (CUDA) and mpi4py (PYTHON,
# default python3), this repository as the working directory. NVLink multicast stays off (shared hosts).
# Writes one JSON file per run into ${OUT:-.cache/bench} and prints the tables.
set -euo pipefail
what="${1:-all}"
dtype="${2:-bfloat16}"
PY="${PYTHON:-python3}"
out="${OUT:-.cache/bench}"
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
bench() {  # bench NAME N RANKS [extra options]
  echo "== $1: N=$2 ranks=$3 ($dtype)"
  timeout 540 "$PY" -m foldcp_hpc.bench pairformer --device cuda --backend nccl --dtype "$dtype" --no-boltz \
    --repeats "${REPEATS:-3}" --n "$2" --ranks "$3" --json "$out/$1-$2-${3//,/-}.json" "${@:4}" \
    || { echo "   (N=$2 on $3 rank(s) did not complete: exit $?)"; return 1; }
}
case "$what" in
  strong|all) bench strong 4096 1,4 || true ;;&
  weak|all) bench weak 8192 1,4 || true ;;&   # with strong: N^2/P constant (4096 on 1, 8192 on 4); 8192 on 1: strong too
  largest|all) for n in ${LARGEST_N:-16384 20480}; do bench largest "$n" 4 --quick || break; done ;;
esac
