#!/usr/bin/env bash
# `make test`'s pytest run: three pytest processes at once, each with a test cluster of its own
# (most e2e tests wait on the cluster, not on the CPUs, so they overlap well):
#   real node  the real node's tests (images built, pods that serve) on a cluster that takes
#              the machine's real node, then the worker's tests (server/tests: no cluster);
#   operator   operator/tests on a kwok-only cluster;
#   cluster    e2e/tests and charts/tests on another kwok-only cluster.
# Each prints as it goes, its lines prefixed with its part. Exit non-zero if any part fails.
# Extra arguments go to every pytest process (e.g. --durations=20).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
REAL_NODE_TESTS=(
  e2e/tests/test_real_node.py
  e2e/tests/test_real_node_chart.py
  operator/tests/test_real_node_fleet.py
)
base_dir="${INFERENCEFLEET_CLUSTER_DIR:-}"
if [[ -z "$base_dir" ]]; then  # e2e/e2ecluster's default_state_dir
  shm=/dev/shm; [[ -d $shm && -w $shm ]] || shm="${TMPDIR:-/tmp}"
  base_dir="$shm/inferencefleet-cluster"
fi
base_port="${INFERENCEFLEET_CLUSTER_PORT_BASE:-16443}"
real_node="${INFERENCEFLEET_REAL_NODE:-auto}"  # auto: its tests skip, saying why, without one
not_real=()
for t in "${REAL_NODE_TESTS[@]}"; do not_real+=("--ignore=$t"); done

# part <label> <cluster dir suffix> <port offset> <real node: 1|0|auto> <pytest args...>
part() {
  local label="$1" suffix="$2" offset="$3" real="$4"; shift 4
  INFERENCEFLEET_CLUSTER_DIR="$base_dir$suffix" \
  INFERENCEFLEET_CLUSTER_PORT_BASE=$((base_port + offset)) \
  INFERENCEFLEET_REAL_NODE="$real" \
    "$PY" -m pytest -p no:cacheprovider "$@" 2>&1 | sed -u "s/^/[$label] /"
  return "${PIPESTATUS[0]}"
}

part "real node" "-real" 40 "$real_node" "$@" "${REAL_NODE_TESTS[@]}" server/tests &
real_pid=$!
part operator "" 0 0 "$@" "${not_real[@]}" operator/tests &
operator_pid=$!
part cluster "-e2e" 80 0 "$@" "${not_real[@]}" e2e/tests charts/tests
cluster_rc=$?
wait "$operator_pid"; operator_rc=$?
wait "$real_pid"; real_rc=$?
echo "make test: exit status real node $real_rc, operator $operator_rc, cluster $cluster_rc"
exit $(( real_rc != 0 || operator_rc != 0 || cluster_rc != 0 ))
