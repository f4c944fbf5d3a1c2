"""Raw in-process model throughput vs the same model served over gRPC, in one run.

`make bench-server MODEL=builtin:resnet18`. Three processes: a raw helper that runs the model
runner in a loop (same code, threads and uint8 -> logits work as the worker), the worker
(`inferencefleet serve`, maxBatchSize set to the raw best batch size), and this one, the load
generator, which keeps a fixed number of single-frame requests in flight (one ModelStreamInfer
stream, or concurrent unary calls). Raw and served windows alternate for several rounds, so
load from elsewhere on the machine hits both alike; medians are reported, and
`served/raw ratio: 0.NN` = median served frames/s at saturation / median raw frames/s at the best
batch. The added latency is the p50 of unary single-frame calls at concurrency 1 minus the p50
of the raw batch-1 forward. A second worker, the same but with maxBatchSize 1, is measured at
--low-in-flight requests in flight next to the first: `batched/unbatched ratio at 4 in flight`
says whether batching pays when the queue is shallow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `inferencefleet serve` sets it


def raw_helper(args: argparse.Namespace) -> int:
    """Reads `batch seconds` lines, runs the model that long, answers one JSON line each."""
    import numpy as np
    import torch
    from fleet_server.models import load_model
    from fleet_server.runner import ModelRunner

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    runner = ModelRunner(
        load_model(args.model),
        device=torch.device("cpu"),
        dtype=torch.float32,
        image_size=args.image_size,
    )
    runner.warm_up(args.max_batch_size)
    rng = np.random.default_rng(0)
    print("ready", flush=True)
    for line in sys.stdin:
        batch, seconds = int(line.split()[0]), float(line.split()[1])
        frames = rng.integers(0, 256, (batch, args.image_size, args.image_size, 3), np.uint8)
        times: list[float] = []
        cpu = time.process_time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t = time.perf_counter()
            runner.infer([frames])
            times.append(time.perf_counter() - t)
        answer = {
            "fps": batch * len(times) / sum(times),
            "p50": statistics.median(times),
            "frames_per_cpu_s": batch * len(times) / (time.process_time() - cpu),
        }
        print(json.dumps(answer), flush=True)
    return 0


class Raw:
    """The raw helper process, driven over its stdin/stdout."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--raw-helper", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("raw helper failed to start")

    def run(self, batch: int, seconds: float) -> dict[str, float]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{batch} {seconds}\n")
        self.proc.stdin.flush()
        answer: dict[str, float] = json.loads(self.proc.stdout.readline())
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_worker(args: argparse.Namespace, port: int, batch: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "fleet_server.serve", "--model", args.model,
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
            "--threads", str(args.threads), "--image-size", str(args.image_size),
            "--max-batch-size", str(batch),
            "--max-queue-delay-us", str(args.max_queue_delay_us),
            "--max-queue-size", str(max(64, 4 * args.in_flight)),
        ],
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'server'}:{ROOT / 'operator'}"},
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Load:
    """The load generator: single-frame requests against the worker (pid `server`)."""

    def __init__(self, client: Any, request: Any, server: int) -> None:
        self.client = client
        self.request = request
        self.server = server
        self.cpu: tuple[float, float] = (0.0, 0.0)  # server, load generator: at window start

    def start_window(self) -> None:
        self.cpu = (cpu_seconds(self.server), time.process_time())

    def window_cpu(self) -> tuple[float, float]:
        """CPU seconds the worker and this process used since start_window()."""
        return cpu_seconds(self.server) - self.cpu[0], time.process_time() - self.cpu[1]

    async def latency_p50(self, seconds: float) -> float:
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 20:
            t = time.perf_counter()
            await self.client.infer_raw(self.request)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    async def stream_fps(self, in_flight: int, seconds: float, warmup: float) -> tuple[float, int]:
        """Frames/s over the window after `warmup`, and frames answered in it."""
        window = asyncio.Semaphore(in_flight)
        stop = False

        async def requests() -> Any:
            while not stop:
                await window.acquire()
                yield self.request

        call = self.client.stub.ModelStreamInfer(requests())
        start = time.perf_counter() + warmup
        done = 0
        async for answer in call:
            if answer.error_message:
                raise RuntimeError(answer.error_message)
            window.release()
            now = time.perf_counter()
            if now >= start:
                if done == 0:
                    self.start_window()
                done += 1
                if now - start >= seconds:
                    stop = True
                    call.cancel()
                    return done / (now - start), done
        raise RuntimeError("stream ended early")

    async def unary_fps(self, in_flight: int, seconds: float, warmup: float) -> tuple[float, int]:
        """Frames/s of calls answered within the window after `warmup`, and their count."""
        start = time.perf_counter() + warmup
        end = start + seconds
        done = [0]

        async def loop() -> None:
            while time.perf_counter() < end:
                await self.client.infer_raw(self.request)
                if start <= time.perf_counter() <= end:
                    done[0] += 1

        async def window() -> None:
            await asyncio.sleep(warmup)
            self.start_window()

        await asyncio.gather(window(), *(loop() for _ in range(in_flight)))
        return done[0] / seconds, done[0]


async def measure(
    args: argparse.Namespace, raw: Raw, ports: tuple[int, int], servers: tuple[int, int], batch: int
) -> dict[str, Any]:
    import numpy as np
    from fleet_client.client import InferenceClient, infer_request
    from fleet_spec.contract import served_model_name

    frame = np.random.default_rng(1).integers(
        0, 256, (1, args.image_size, args.image_size, 3), np.uint8
    )
    request = infer_request(served_model_name(args.model), frame)
    keys = ("raw", "stream", "unary", "p50", "raw_p50", "raw_cpu", "stream_cpu", "unary_cpu")
    keys += ("stream_cpu_all", "unary_cpu_all", "low_batched", "low_unbatched")
    keys += ("low_batched_cpu", "low_unbatched_cpu")
    rounds: dict[str, list[float]] = {k: [] for k in keys}
    async with (
        InferenceClient(f"127.0.0.1:{ports[0]}") as client,
        InferenceClient(f"127.0.0.1:{ports[1]}") as unbatched_client,
    ):
        await client.wait_ready(within_s=600)
        await unbatched_client.wait_ready(within_s=600)
        load = Load(client, request, servers[0])
        unbatched = Load(unbatched_client, request, servers[1])
        await load.latency_p50(1.0)
        await unbatched.latency_p50(1.0)
        for _ in range(args.rounds):
            rounds["raw_p50"].append(raw.run(1, args.latency_seconds)["p50"])
            rounds["p50"].append(await load.latency_p50(args.latency_seconds))
            result = raw.run(batch, args.seconds)
            rounds["raw"].append(result["fps"])
            rounds["raw_cpu"].append(result["frames_per_cpu_s"])
            for mode in ("stream", "unary"):
                measure_mode = load.stream_fps if mode == "stream" else load.unary_fps
                fps, frames = await measure_mode(args.in_flight, args.seconds, 1.0)
                worker_cpu, client_cpu = load.window_cpu()
                rounds[mode].append(fps)
                rounds[f"{mode}_cpu"].append(frames / worker_cpu)
                rounds[f"{mode}_cpu_all"].append(frames / (worker_cpu + client_cpu))
            # batching at low concurrency: the same worker settings with maxBatchSize 1
            for name, which in (("low_batched", load), ("low_unbatched", unbatched)):
                fps, frames = await which.unary_fps(args.low_in_flight, args.seconds, 1.0)
                rounds[name].append(fps)
                rounds[f"{name}_cpu"].append(frames / which.window_cpu()[0])
    return rounds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="builtin:resnet18")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-batch-size", type=int, default=8, help="largest raw batch measured")
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--in-flight", type=int, default=16, help="requests in flight at saturation")
    p.add_argument(
        "--low-in-flight", type=int, default=4, help="in flight for batched vs maxBatchSize 1"
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating raw/served rounds")
    p.add_argument("--seconds", type=float, default=8.0, help="each throughput window")
    p.add_argument("--sweep-seconds", type=float, default=3.0, help="each raw batch size")
    p.add_argument("--latency-seconds", type=float, default=3.0, help="each latency window")
    p.add_argument("--raw-helper", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw_helper:
        return raw_helper(args)

    print(f"model {args.model}, {args.threads} torch threads, {args.image_size}x{args.image_size}")
    print(f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} at start")
    raw = Raw(sys.argv[1:])
    servers: list[subprocess.Popen[bytes]] = []
    try:
        sizes = [b for b in (1, 2, 4, 8, 16, 32) if b <= args.max_batch_size]
        sweep = {b: raw.run(b, args.sweep_seconds) for b in sizes}
        for b, result in sweep.items():
            print(
                f"raw batch {b:>3}: {result['fps']:8.1f} frames/s, "
                f"{result['frames_per_cpu_s']:8.1f} frames per CPU-second"
            )
        # Frames per CPU-second picks the batch: on a busy machine wall-clock rates swing with
        # other load, while CPU time per frame does not (and on an idle one they agree).
        batch = max(sweep, key=lambda b: sweep[b]["frames_per_cpu_s"])
        print(f"worker: --max-batch-size {batch} (raw best), {args.in_flight} requests in flight")
        print(
            f"and the same worker with --max-batch-size 1, both at {args.low_in_flight} in flight"
        )
        print(
            "then alternating rounds: raw batch-1 latency, served latency, raw, stream, unary, "
            f"batched and unbatched at {args.low_in_flight}"
        )
        ports = (free_port(), free_port())
        servers = [start_worker(args, ports[0], batch), start_worker(args, ports[1], 1)]
        pids = (servers[0].pid, servers[1].pid)
        rounds = asyncio.run(measure(args, raw, ports, pids, batch))
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=120)
        raw.close()

    def show(values: list[float], scale: float = 1.0) -> str:
        return " ".join(f"{v * scale:.1f}" for v in values)

    med = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"raw batch {batch} per round: {show(rounds['raw'])} frames/s")
    print(f"served, 1 stream per round: {show(rounds['stream'])} frames/s")
    print(f"served, unary calls per round: {show(rounds['unary'])} frames/s")
    print(f"raw best (median): {med['raw']:.1f} frames/s at batch {batch}")
    print(f"served at saturation (median): stream {med['stream']:.1f}, unary {med['unary']:.1f}")
    print(f"unary/raw ratio: {med['unary'] / med['raw']:.2f}")
    print(f"served/raw ratio: {max(med['stream'], med['unary']) / med['raw']:.2f}")
    print(
        f"served/raw ratio at {args.in_flight} in flight (unary): {med['unary'] / med['raw']:.2f}"
    )
    print(
        f"at {args.low_in_flight} in flight (unary), maxBatchSize {batch} per round: "
        f"{show(rounds['low_batched'])}; maxBatchSize 1: {show(rounds['low_unbatched'])} frames/s"
    )
    print(
        f"batched/unbatched ratio at {args.low_in_flight} in flight: "
        f"{med['low_batched'] / med['low_unbatched']:.2f}"
    )
    print(
        f"batched/unbatched ratio per worker CPU-second at {args.low_in_flight} in flight: "
        f"{med['low_batched_cpu'] / med['low_unbatched_cpu']:.2f} "
        f"({show(rounds['low_batched_cpu'])} vs {show(rounds['low_unbatched_cpu'])} frames)"
    )
    print(
        f"frames per CPU-second (median): raw {med['raw_cpu']:.1f}; "
        f"worker alone: stream {med['stream_cpu']:.1f}, unary {med['unary_cpu']:.1f}; "
        f"worker + load generator: stream {med['stream_cpu_all']:.1f}, "
        f"unary {med['unary_cpu_all']:.1f}"
    )
    print(
        "served/raw ratio per CPU-second (worker alone; worker + load generator): "
        f"stream {med['stream_cpu'] / med['raw_cpu']:.2f}, "
        f"{med['stream_cpu_all'] / med['raw_cpu']:.2f}; "
        f"unary {med['unary_cpu'] / med['raw_cpu']:.2f}, "
        f"{med['unary_cpu_all'] / med['raw_cpu']:.2f}"
    )
    added = (med["p50"] - med["raw_p50"]) * 1e3
    print(
        f"p50 at concurrency 1: served {med['p50'] * 1e3:.2f} ms, raw batch-1 "
        f"{med['raw_p50'] * 1e3:.2f} ms, added {added:.2f} ms "
        f"(rounds: {show(rounds['p50'], 1e3)} vs {show(rounds['raw_p50'], 1e3)} ms)"
    )
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
