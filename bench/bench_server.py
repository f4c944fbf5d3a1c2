"""Raw in-process model throughput vs the same model served over gRPC, in one run.

Prints raw frames/s per batch size (the model runner alone, same threads, same uint8 -> logits
work), served frames/s at saturation (the worker's maxBatchSize set to the raw best batch size;
this process, separate from the worker, keeps a fixed number of single-frame requests in
flight: one ModelStreamInfer stream, then concurrent unary calls),
`served/raw ratio: 0.NN` (best served / best raw), and the p50 latency a request pays at
concurrency 1 over the raw batch-1 forward. Raw is measured before and after the served phase;
the ratio uses the higher of the two, so background load can only make it look worse.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `inferencefleet serve` sets it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_raw(args: argparse.Namespace) -> dict[str, object]:
    """Frames/s of the model runner at each batch size, and its batch-1 latency p50."""
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
    fps: dict[int, float] = {}
    p50_b1 = 0.0
    batches = sorted({1, 2, 4, args.max_batch_size} & set(range(1, args.max_batch_size + 1)))
    for batch in batches:
        frames = rng.integers(0, 256, (batch, args.image_size, args.image_size, 3), np.uint8)
        times: list[float] = []
        end = time.perf_counter() + args.raw_seconds
        while time.perf_counter() < end or len(times) < 3:
            t = time.perf_counter()
            runner.infer([frames])
            times.append(time.perf_counter() - t)
        fps[batch] = batch * len(times) / sum(times)
        if batch == 1:
            p50_b1 = statistics.median(times)
    return {"fps": fps, "p50_b1": p50_b1}


def run_raw_subprocess(args: argparse.Namespace) -> dict[str, object]:
    """The raw measurement in its own process, so its threads are gone before serving starts."""
    argv = [sys.executable, __file__, "--raw-only", *sys.argv[1:]]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    data["fps"] = {int(k): v for k, v in data["fps"].items()}
    return data  # type: ignore[no-any-return]


async def served(args: argparse.Namespace, port: int, model: str) -> dict[str, float]:
    """Concurrency-1 unary p50, then saturation through one stream and through unary calls."""
    import numpy as np
    from fleet_server.client import InferenceClient, infer_request
    from fleet_server.proto import inference_pb2 as pb

    frame = np.random.default_rng(1).integers(
        0, 256, (1, args.image_size, args.image_size, 3), np.uint8
    )
    request = infer_request(model, frame)
    async with InferenceClient(f"127.0.0.1:{port}") as client:
        await client.wait_ready(within_s=600)
        for _ in range(5):
            await client.infer_raw(request)
        times: list[float] = []
        end = time.perf_counter() + args.latency_seconds
        while time.perf_counter() < end or len(times) < 20:
            t = time.perf_counter()
            await client.infer_raw(request)
            times.append(time.perf_counter() - t)
        p50 = statistics.median(times)

        async def stream_fps() -> float:
            window = asyncio.Semaphore(args.in_flight)
            done = 0
            stop = False

            async def requests():  # type: ignore[no-untyped-def]
                while not stop:
                    await window.acquire()
                    yield request

            call = client.stub.ModelStreamInfer(requests())
            t0 = time.perf_counter()
            warm_until = t0 + args.warmup_seconds
            start = 0.0
            async for answer in call:
                if answer.error_message:
                    raise RuntimeError(answer.error_message)
                window.release()
                now = time.perf_counter()
                if start == 0.0 and now >= warm_until:
                    start, done = now, 0
                elif start:
                    done += 1
                    if now - start >= args.seconds:
                        stop = True
                        call.cancel()
                        return done / (now - start)
            raise RuntimeError("stream ended early")

        async def unary_fps() -> float:
            counts = [0]
            t_start = time.perf_counter() + args.warmup_seconds
            t_end = t_start + args.seconds

            async def loop() -> None:
                while (now := time.perf_counter()) < t_end:
                    reply: pb.ModelInferResponse = await client.infer_raw(request)
                    if reply.outputs and time.perf_counter() >= t_start and now >= t_start:
                        counts[0] += 1

            await asyncio.gather(*(loop() for _ in range(args.in_flight)))
            return counts[0] / args.seconds

        stream = await stream_fps()
        unary = await unary_fps()
    return {"p50": p50, "stream_fps": stream, "unary_fps": unary}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="builtin:resnet18")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-batch-size", type=int, default=8, help="largest raw batch measured")
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument(
        "--in-flight", type=int, default=0, help="requests in flight (default 2 x served batch)"
    )
    p.add_argument("--seconds", type=float, default=20.0, help="each served saturation window")
    p.add_argument("--warmup-seconds", type=float, default=3.0)
    p.add_argument("--raw-seconds", type=float, default=6.0, help="per raw batch size")
    p.add_argument("--latency-seconds", type=float, default=8.0)
    p.add_argument("--raw-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw_only:
        data = measure_raw(args)
        print(json.dumps(data))
        return 0

    from fleet_server.models import default_name

    model = default_name(args.model)
    print(f"model {args.model}, {args.threads} torch threads, {args.image_size}x{args.image_size}")
    print(f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} at start")
    raw1 = run_raw_subprocess(args)
    fps0: dict[int, float] = raw1["fps"]  # type: ignore[assignment]
    serve_batch = max(fps0, key=lambda b: fps0[b])
    in_flight = args.in_flight or max(4, 2 * serve_batch)
    args.in_flight = in_flight
    print(f"served with --max-batch-size {serve_batch} (the raw best), {in_flight} in flight")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "fleet_server.serve", "--model", args.model,
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
            "--threads", str(args.threads), "--image-size", str(args.image_size),
            "--max-batch-size", str(serve_batch),
            "--max-queue-delay-us", str(args.max_queue_delay_us),
            "--max-queue-size", str(max(64, 4 * args.in_flight)),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT / "server")},
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        result = asyncio.run(served(args, port, model))
    finally:
        server.terminate()
        server.wait(timeout=60)
    raw2 = run_raw_subprocess(args)

    fps1: dict[int, float] = raw1["fps"]  # type: ignore[assignment]
    fps2: dict[int, float] = raw2["fps"]  # type: ignore[assignment]
    for batch in sorted(fps1):
        print(f"raw batch {batch:>3}: {fps1[batch]:8.1f} frames/s before, {fps2[batch]:8.1f} after")
    best_batch = max(fps1, key=lambda b: max(fps1[b], fps2[b]))
    raw_best = max(fps1[best_batch], fps2[best_batch])
    raw_p50 = min(float(raw1["p50_b1"]), float(raw2["p50_b1"]))  # type: ignore[arg-type]
    print(f"raw best: {raw_best:.1f} frames/s at batch {best_batch}")
    print(f"served, 1 stream, {args.in_flight} in flight: {result['stream_fps']:.1f} frames/s")
    print(f"served, {args.in_flight} concurrent unary calls: {result['unary_fps']:.1f} frames/s")
    served_best = max(result["stream_fps"], result["unary_fps"])
    print(f"unary/raw ratio: {result['unary_fps'] / raw_best:.2f}")
    print(f"served/raw ratio: {served_best / raw_best:.2f}")
    added = (result["p50"] - raw_p50) * 1e3
    print(
        f"p50 at concurrency 1: served {result['p50'] * 1e3:.2f} ms, raw batch-1 "
        f"{raw_p50 * 1e3:.2f} ms, added {added:.2f} ms"
    )
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
