"""Where a worker's event loop spends its time per request: the worker runs in this process under
cProfile while `inferencefleet bench` (another process) keeps N single-frame requests in flight;
the loop thread's time is then grouped (gRPC, protobuf, the servicer, the batcher and its hand-off
to the forward thread, metrics, asyncio) and divided by the requests served. The forward thread
is not profiled; its share is the compute time the worker's ModelStatistics reports.

  .venv/bin/python bench/profile_worker.py --model builtin:tiny --in-flight 4

cProfile slows Python-level code, so the absolute figures are upper bounds; the split is the
point. Timing lives here, never in tests.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "operator")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

WARMUP_S = 2.0
GROUPS = (  # first match wins: (group, substrings of "file:function")
    ("idle (waiting in epoll)", ("epoll", "select.")),
    ("protobuf encode/decode", ("protobuf", "_pb2", "SerializeToString", "FromString")),
    ("gRPC (cygrpc, aio server)", ("grpc", "cygrpc")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("batcher (queue, hand-off, deliver)", ("batcher.py",)),
    ("servicer + protocol", ("servicer.py", "protocol.py", "errors.py", "stats.py")),
    ("hand-off to the forward thread", ("concurrent/futures", "threading.py", "run_in_executor")),
    ("asyncio event loop", ("asyncio",)),
    # gRPC's Cython core runs inside the loop's callbacks, below what cProfile sees
    ("callbacks' own time (gRPC's Cython core)", ("Context' objects",)),
)


def group_of(key: tuple[str, int, str]) -> str:
    text = f"{key[0]}:{key[2]}"
    for name, needles in GROUPS:
        if any(needle in text for needle in needles):
            return name
    return "other"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(args: argparse.Namespace, port: int, out: dict[str, object]) -> None:
    """In a thread: wait for the worker, run the benchmark, then SIGTERM this process."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'server'}:{ROOT / 'operator'}"}
    # the worker's gRPC runs on this process's event loop: wait for SERVING from another process
    wait = (
        "import asyncio, sys; from fleet_client.client import InferenceClient\n"
        "async def main():\n"
        f"    async with InferenceClient('127.0.0.1:{port}') as c:\n"
        "        await c.wait_ready(within_s=900)\n"
        "asyncio.run(main())"
    )
    subprocess.run([sys.executable, "-c", wait], env=env, check=True)
    model = args.model.removeprefix("builtin:")
    argv = [sys.executable, "-m", "inferencefleet.cli", "bench", f"127.0.0.1:{port}",
            "--model", model, "-c", str(args.in_flight), "--duration", str(args.seconds),
            "--warmup", str(WARMUP_S), "--quiet", "--json", "--connect-timeout", "600"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    out["bench"] = json.loads(done.stdout) if done.returncode == 0 else done.stderr[-2000:]
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()

    from fleet_server import serve

    port = free_port()
    out: dict[str, object] = {}
    threading.Thread(target=load, args=(args, port, out), daemon=True).start()
    argv = ["--model", args.model, "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", "--threads", str(args.threads),
            "--image-size", str(args.image_size), "--max-batch-size", str(args.max_batch_size),
            "--grace-period-s", "1"]  # fmt: skip
    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.runcall(serve.main, argv)
    wall = time.perf_counter() - began
    bench = out.get("bench")
    if not isinstance(bench, dict):
        print(f"the benchmark failed: {bench}")
        return 1
    # requests served in the warm-up and the measured window, at the window's rate
    requests = int(bench["steps"][0]["requests"] / args.seconds * (args.seconds + WARMUP_S))
    stats = pstats.Stats(profiler)
    totals: dict[str, float] = {}
    for key, value in stats.stats.items():  # type: ignore[attr-defined]
        totals[group_of(key)] = totals.get(group_of(key), 0.0) + value[2]  # tottime
    step = bench["steps"][0]
    print(
        f"{args.model} {args.image_size}px, {args.in_flight} in flight, maxBatchSize "
        f"{args.max_batch_size}: {step['frames_per_s']} frames/s, p50 "
        f"{step['latency_ms']['p50']} ms; ~{requests} requests under load ({wall:.0f} s of "
        "worker in all, model loading included: those groups are upper bounds)"
    )
    print("event-loop thread time per request, by group (cProfile tottime):")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {name:<38} {1e6 * seconds / max(1, requests):8.0f} us")
    print("top functions by own time:")
    stats.sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
