#!/usr/bin/env bash
# `make test`'s pytest run: two pytest processes at once, each with a test cluster of its own.
#   - the real node's tests (images built, pods that serve) on a cluster that takes the real
#     node, then the worker's tests (server/tests: no cluster), which balance the two parts;
#   - everything else on a kwok-only cluster.
# Both print as they go, each line prefixed with its part. Exit non-zero if either fails.
# Extra arguments go to both pytest processes (e.g. --durations=20).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
REAL_NODE_TESTS=(
  e2e/tests/test_real_node.py
  e2e/tests/test_real_node_chart.py
  operator/tests/test_real_node_fleet.py
)
BESIDE_THEM=(server/tests)
base_dir="${INFERENCEFLEET_CLUSTER_DIR:-}"
base_port="${INFERENCEFLEET_CLUSTER_PORT_BASE:-16443}"
ignore=()
for t in "${REAL_NODE_TESTS[@]}" "${BESIDE_THEM[@]}"; do ignore+=("--ignore=$t"); done

# The real node's part: its own cluster (ports 40 above the other's), the real node if this
# machine has one (INFERENCEFLEET_REAL_NODE as set, default auto: its tests skip, saying why,
# where there is none).
(
  [[ -n "$base_dir" ]] && export INFERENCEFLEET_CLUSTER_DIR="$base_dir-real"
  if [[ -z "$base_dir" ]]; then  # beside the other's default (e2e/e2ecluster: default_state_dir)
    shm=/dev/shm; [[ -d $shm && -w $shm ]] || shm="${TMPDIR:-/tmp}"
    export INFERENCEFLEET_CLUSTER_DIR="$shm/inferencefleet-cluster-real"
  fi
  export INFERENCEFLEET_CLUSTER_PORT_BASE=$((base_port + 40))
  "$PY" -m pytest -p no:cacheprovider "$@" "${REAL_NODE_TESTS[@]}" "${BESIDE_THEM[@]}" 2>&1 \
    | sed -u 's/^/[real node] /'
  exit "${PIPESTATUS[0]}"
) &
real_pid=$!

(
  export INFERENCEFLEET_REAL_NODE=0
  "$PY" -m pytest "$@" "${ignore[@]}" 2>&1 | sed -u 's/^/[kwok] /'
  exit "${PIPESTATUS[0]}"
)
rest_rc=$?
wait "$real_pid"
real_rc=$?
echo "make test: kwok part exit $rest_rc, real node part exit $real_rc"
exit $(( rest_rc != 0 || real_rc != 0 ))
