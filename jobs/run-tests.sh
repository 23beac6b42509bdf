#!/usr/bin/env bash
# Run the whole test suite: serial tests, then the MPI tests at 1, 4 and 9 ranks (oversubscribed on small
# machines). Assumes jobs/setup-env.sh has made .venv. Extra arguments go to every pytest call (e.g. -k grid).
#
# Under mpirun, rank 0 prints; the other ranks write .cache/test-logs/<ranks>-rank-<k>.log, shown when their
# run fails. Every MPI run has a time limit, so a hang fails the suite instead of stalling it.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="$repo/.venv/bin/python"
[ -x "$py" ] || { echo "run-tests: no .venv; run jobs/setup-env.sh first" >&2; exit 2; }
logs="$repo/.cache/test-logs"
mkdir -p "$logs"
rm -rf "$logs"/*.log "$logs"/tmp-*
limit="${FOLDCP_TEST_TIMEOUT:-900}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
passed=0 failed=0 status=0

tally() {  # add the counts of pytest's closing line in $1 to the totals
  local counts
  counts="$(grep -aE '[0-9]+ (passed|failed|errors?)' "$1" | tail -n 1 | awk '
    { for (i = 2; i <= NF; i++) { w = $i; gsub(/[^a-z]/, "", w); n = $(i - 1) + 0
        if (w == "passed") p += n; else if (w == "failed" || w == "error" || w == "errors") f += n } }
    END { print p + 0, f + 0 }')"
  passed=$((passed + ${counts% *}))
  failed=$((failed + ${counts#* }))
}

echo "== serial tests"
"$py" -m pytest --color=no -q --durations=12 -m "not mpi" "$@" tests 2>&1 | tee "$logs/serial.log"
rc=${PIPESTATUS[0]}
tally "$logs/serial.log"
[ "$rc" = 0 ] || status=1

for n in 1 4 9; do
  echo "== MPI tests on $n rank(s)"
  # each rank gets its own pytest temporary folder: pytest would otherwise prune folders other ranks still use
  timeout --kill-after=30 "$limit" "$repo/jobs/mpirun-local.sh" -n "$n" bash -c '
    rank=${OMPI_COMM_WORLD_RANK:-0}
    if [ "$rank" = 0 ]; then exec "$@" --basetemp="'"$logs"'/tmp-'"$n"'-0"; fi
    exec "$@" --basetemp="'"$logs"'/tmp-'"$n"'-$rank" >"'"$logs"'/'"$n"'-rank-$rank.log" 2>&1' _ \
    "$py" -m pytest --with-mpi -m mpi --color=no -q -p no:cacheprovider "$@" tests 2>&1 | tee "$logs/mpi-$n.log"
  rc=${PIPESTATUS[0]}
  tally "$logs/mpi-$n.log"
  if [ "$rc" != 0 ]; then
    status=1
    [ "$rc" = 124 ] && echo "run-tests: the $n-rank run passed its ${limit}s limit" && failed=$((failed + 1))
    for log in "$logs/$n"-rank-*.log; do
      [ -f "$log" ] && grep -aqE "FAILED|ERROR|Error" "$log" && { echo "---- $(basename "$log")"; tail -n 40 "$log"; }
    done
  fi
done

echo "run-tests: serial + MPI at 1, 4, 9 ranks"
echo "$passed passed, $failed failed"
exit "$status"
