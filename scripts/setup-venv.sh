#!/usr/bin/env bash
# Creates .venv/ at the repository root from requirements.lock (reused when the lock is unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_DIR="${INFERENCEFLEET_CACHE:-$HOME/.cache/inferencefleet}"
UV_VERSION="0.13.8"
BOOT="$CACHE_DIR/bootstrap"

if [ ! -x "$BOOT/bin/uv" ] || [ "$("$BOOT/bin/uv" --version | awk '{print $2}')" != "$UV_VERSION" ]; then
    echo "setup: installing uv $UV_VERSION into $BOOT"
    python3 -m venv "$BOOT"
    "$BOOT/bin/pip" install --quiet "uv==$UV_VERSION"
fi
UV="$BOOT/bin/uv"

# perf_analyzer (shipped in tritonclient's wheel, run by the worker's tests) needs Debian's libb64.
if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d' && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
    echo "setup: installing libb64-0d for perf_analyzer"
    apt-get install -y -q libb64-0d >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null; }
fi

stamp=".venv/.lock-sha256"
want="$(cat requirements.lock pyproject.toml | sha256sum | awk '{print $1}')"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "setup: creating .venv from requirements.lock (first run downloads torch; cached in ~/.cache/uv)"
[ -x .venv/bin/python ] || "$UV" venv --quiet --python python3 .venv
"$UV" pip sync --quiet --python .venv/bin/python requirements.lock
"$UV" pip install --quiet --python .venv/bin/python --no-deps -e .
echo "$want" > "$stamp"
echo "setup: .venv ready"
