"""`inferencefleet bench` against NVIDIA's perf_analyzer on the same worker and concurrency.

Starts one `inferencefleet serve` worker, then alternates perf_analyzer (gRPC, 3 windows of
--window seconds; --streaming in stream mode) and `inferencefleet bench` (one step of 3
windows' length, same mode) for --rounds rounds, so that background load hits both alike.
Prints each round, the medians (frames/s, p99) and the median of the per-round
bench/perf_analyzer ratios. perf_analyzer comes from
tritonclient's wheel; it needs libcudart.so.12 (nvidia-cuda-runtime-cu12) and libb64 (Debian's
libb64-0d).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nvidia.cuda_runtime

VENV_BIN = Path(sys.executable).parent
_SUMMARY = re.compile(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency (\d+) usec")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "inferencefleet.cli", *args]


def perf_analyzer(args: argparse.Namespace, port: int, model: str) -> tuple[float, float]:
    """(infer/s, p99 ms) over 3 windows (stability check disabled: the machine is shared)."""
    lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    argv = [
        str(VENV_BIN / "perf_analyzer"), "-m", model, "-u", f"127.0.0.1:{port}", "-i", "grpc",
        "--concurrency-range", str(args.concurrency), "-p", str(int(args.window * 1000)),
        "-s", "1000", "--percentile=99",
    ]  # fmt: skip
    if args.mode == "stream":
        argv.append("--streaming")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=True)
    match = _SUMMARY.search(done.stdout)
    if match is None:
        raise SystemExit(f"perf_analyzer printed no summary:\n{done.stdout}\n{done.stderr}")
    return float(match.group(2)), int(match.group(3)) / 1000.0


def bench(args: argparse.Namespace, port: int, model: str) -> tuple[float, float, float]:
    """(frames/s, p99 ms, client CPU %) of one step as long as perf_analyzer's 3 windows."""
    argv = cli(
        "bench", f"127.0.0.1:{port}", "--model", model, "--concurrency", str(args.concurrency),
        "--duration", str(3 * args.window), "--warmup", "2", "--quiet", "--json",
        "--mode", args.mode,
    )  # fmt: skip
    step = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    best = step["steps"][0]
    return best["frames_per_s"], best["latency_ms"]["p99"], best["client_cpu_percent"]


def wait_ready(port: int, model: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    probe = cli("bench", f"127.0.0.1:{port}", "--model", model, "-c", "1", "--duration", "0.2")
    while subprocess.run(
        [*probe, "--warmup", "0", "--quiet", "--json"], capture_output=True
    ).returncode:
        if time.monotonic() > deadline:
            raise SystemExit("the worker did not become ready")
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="worker threads (1 leaves a core)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--window", type=float, default=5.0, help="perf_analyzer window (s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=["unary", "stream"], default="unary")
    args = parser.parse_args()

    port = free_port()
    name = args.model.removeprefix("builtin:")
    worker = subprocess.Popen(
        cli(
            "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", "--device", "cpu", "--threads", str(args.threads),
            "--image-size", str(args.image_size),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    pa_runs, bench_runs = [], []
    try:
        wait_ready(port, name)
        print(f"worker: {args.model} {args.image_size}px, {args.threads} thread(s), port {port}")
        measured = 3 * args.window
        print(f"concurrency {args.concurrency}, {args.mode}, batch 1, {measured:g} s measured")
        for round_ in range(1, args.rounds + 1):
            pa_runs.append(perf_analyzer(args, port, name))
            bench_runs.append(bench(args, port, name))
            (pa_fps, pa_p99), (b_fps, b_p99, b_cpu) = pa_runs[-1], bench_runs[-1]
            print(
                f"round {round_}: perf_analyzer {pa_fps:7.1f} frames/s p99 {pa_p99:6.1f} ms | "
                f"bench {b_fps:7.1f} frames/s p99 {b_p99:6.1f} ms (client CPU {b_cpu:.0f}%)"
            )
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    pa_fps = statistics.median(r[0] for r in pa_runs)
    pa_p99 = statistics.median(r[1] for r in pa_runs)
    b_fps = statistics.median(r[0] for r in bench_runs)
    b_p99 = statistics.median(r[1] for r in bench_runs)
    print(f"median: perf_analyzer {pa_fps:.1f} frames/s p99 {pa_p99:.1f} ms")
    print(f"median: bench         {b_fps:.1f} frames/s p99 {b_p99:.1f} ms")
    print(f"ratio of the medians: frames/s {b_fps / pa_fps:.3f}, p99 {b_p99 / pa_p99:.3f}")
    fps_ratio = statistics.median(b[0] / p[0] for b, p in zip(bench_runs, pa_runs, strict=True))
    p99_ratio = statistics.median(b[1] / p[1] for b, p in zip(bench_runs, pa_runs, strict=True))
    print(f"median of per-round ratios: frames/s {fps_ratio:.3f}, p99 {p99_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
