#!/usr/bin/env bash
# `make demo`: start examples/fleet.yaml on this machine, benchmark it with a short sweep, print
# the table, write the plot, and stop every worker. On a machine with no GPU the fleet runs on
# the CPU (inferencefleet run says so).
#
# Environment knobs:
#   DEMO_FLEET      the manifest (default examples/fleet.yaml)
#   DEMO_RUN_ARGS   extra `inferencefleet run` options, e.g. "--model builtin:tiny --image-size 64"
#   DEMO_BENCH_ARGS extra `inferencefleet bench` options (default: a short sweep)
#   DEMO_PORT       first gRPC port (default 8001); metrics ports start at DEMO_PORT + 1000
#   DEMO_OUT        where the plot and JSON go (default out/)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-venv.sh
PY=.venv/bin/python
FLEET="${DEMO_FLEET:-examples/fleet.yaml}"
OUT="${DEMO_OUT:-out}"
PORT="${DEMO_PORT:-8001}"
read -r -a RUN_ARGS <<< "${DEMO_RUN_ARGS:-}"
read -r -a BENCH_ARGS <<< "${DEMO_BENCH_ARGS:---concurrency 1,4,16 --duration 6 --warmup 2}"
mkdir -p "$OUT"
work="$(mktemp -d)"
started=$SECONDS

echo "demo: starting $FLEET (logs in $work)"
"$PY" -m inferencefleet.cli run "$FLEET" --no-table --port "$PORT" --metrics-port "$((PORT + 1000))" \
    --ready-file "$work/ready" --log-dir "$work/logs" "${RUN_ARGS[@]}" > "$work/run.out" 2>&1 &
run_pid=$!
tail -n +1 -f --pid "$run_pid" "$work/run.out" &
tail_pid=$!

stop_fleet() {
    if kill -0 "$run_pid" 2> /dev/null; then
        kill -INT "$run_pid"
        wait "$run_pid" || true
    fi
    kill "$tail_pid" 2> /dev/null || true
    wait "$tail_pid" 2> /dev/null || true
}
trap stop_fleet EXIT

deadline=$((SECONDS + ${DEMO_START_TIMEOUT:-600}))
until [ -s "$work/ready" ]; do
    if ! kill -0 "$run_pid" 2> /dev/null; then
        wait "$run_pid" || true
        echo "demo: the fleet did not start; see $work/run.out" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "demo: the fleet was not ready in time; see $work/run.out" >&2
        exit 1
    fi
    sleep 1
done
endpoints="$(cat "$work/ready")"
model="$(sed -n 's/.*--model \([^ ]*\)$/\1/p' "$work/run.out" | head -n 1)"
echo "demo: fleet ready after $((SECONDS - started)) s; benchmarking $endpoints"

"$PY" -m inferencefleet.cli bench "$endpoints" --model "$model" "${BENCH_ARGS[@]}" \
    --plot "$OUT/demo.png" --json-file "$OUT/demo.json"

stop_fleet
trap - EXIT
echo "demo: done in $((SECONDS - started)) s; plot $OUT/demo.png, results $OUT/demo.json"
