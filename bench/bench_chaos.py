"""Chaos, measured on this machine, each part bounded in time:

1. kill: a local fleet (`inferencefleet run`, 3 workers) under `inferencefleet bench` load, plus
   callers that check every answer against the model run in this process; each round SIGKILLs
   one worker. Reported: restarts, answers checked, wrong answers, errors by code for the killed
   workers' callers and for everyone else, the workers' peak RSS.
2. fuzz: malformed ModelInfer requests (mutated messages and corrupted bytes) against one worker.
   Reported: status codes, crashes (the worker process gone), peak RSS.
3. overload: `inferencefleet bench` at 10x the requests the worker's queue holds. Reported:
   status codes, peak RSS before and after.

    .venv/bin/python bench/bench_chaos.py --json-file chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "operator")]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'server'}:{ROOT / 'operator'}"}

from fleet_client.client import InferenceClient, infer_request  # noqa: E402
from fleet_proto import inference_pb2 as pb  # noqa: E402

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "inferencefleet.cli", *args]


def wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until check() held; fails after timeout_s."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reference(image_size: int, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Frames and the logits the worker must answer for them (the same runner, in-process)."""
    from fleet_server.models import load_model
    from fleet_server.runner import ModelRunner, resolve_device

    runner = ModelRunner(
        load_model("builtin:tiny"),
        device=resolve_device("cpu"),
        dtype=__import__("torch").float32,
        image_size=image_size,
    )
    runner.warm_up(1)
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 256, (1, image_size, image_size, 3), np.uint8) for _ in range(count)]
    return frames, [runner.infer([f]) for f in frames]


class Checker:
    """Callers of one worker that compare every answer with the reference logits."""

    def __init__(self, address: str, frames: list[np.ndarray], logits: list[np.ndarray]) -> None:
        self.address = address
        self.frames, self.logits = frames, logits
        self.checked = 0
        self.wrong = 0
        self.errors: Counter[str] = Counter()
        self.stop = False

    async def run(self, callers: int) -> None:
        async with InferenceClient(self.address) as client:
            await asyncio.gather(*(self._loop(client, i) for i in range(callers)))

    async def _loop(self, client: InferenceClient, seed: int) -> None:
        pick = random.Random(seed)
        while not self.stop:
            i = pick.randrange(len(self.frames))
            try:
                got = await client.infer("tiny", self.frames[i], deadline_s=10)
            except grpc.aio.AioRpcError as exc:
                self.errors[exc.code().name] += 1
                await asyncio.sleep(0.05)
                continue
            self.checked += 1
            if not np.allclose(got, self.logits[i], rtol=1e-3, atol=1e-4):
                self.wrong += 1


def kill_rounds(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    manifest = yaml.safe_load((ROOT / "examples" / "fleet.yaml").read_text())
    manifest["spec"]["replicas"] = 3
    fleet = folder / "fleet.yaml"
    fleet.write_text(yaml.safe_dump(manifest))
    status_file, ready = folder / "status.json", folder / "ready"
    run = subprocess.Popen(
        cli("run", str(fleet), "--model", "builtin:tiny", "--image-size", str(args.image_size),
            "--threads", "1", "--port", str(args.port), "--metrics-port", "0",
            "--status-file", str(status_file), "--ready-file", str(ready), "--no-table",
            "--log-dir", str(folder / "logs"), "--backoff-s", "0.5", "--grace-period-s", "2"),
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def status() -> dict[str, Any]:
        try:
            document: dict[str, Any] = json.loads(status_file.read_text())
        except (OSError, ValueError):
            return {}
        return document

    try:
        wait_for("the fleet", ready.exists, 600)
        endpoints = ready.read_text().strip().split(",")
        frames, logits = reference(args.image_size, 16)
        load = subprocess.Popen(
            cli("bench", ",".join(endpoints), "--model", "tiny", "-c", "6", "--warmup", "0",
                "--duration", str(args.rounds * 30), "--json", "--quiet", "--timeout", "10"),
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        checkers = {address: Checker(address, frames, logits) for address in endpoints}
        restart_s: list[float] = []
        victim_errors: Counter[str] = Counter()  # callers of the worker killed in that round
        other_errors: Counter[str] = Counter()  # callers of the others, in the same round
        peak = 0.0

        async def chaos() -> None:
            nonlocal peak
            callers = [asyncio.create_task(c.run(1)) for c in checkers.values()]
            await asyncio.sleep(3)  # load settles
            for round_ in range(args.rounds):
                workers = status()["workers"]
                victim = workers[round_ % len(workers)]
                peak = max([peak, *(peak_rss_mib(w["pid"]) for w in workers)])
                before = {a: c.errors.copy() for a, c in checkers.items()}
                os.kill(victim["pid"], signal.SIGKILL)
                want = victim["restarts"] + 1

                def back(name: str = victim["name"], want: int = want) -> bool:
                    for w in status().get("workers", []):
                        if w["name"] == name:
                            return bool(w["state"] == "ready" and w["restarts"] >= want)
                    return False

                restart_s.append(
                    await asyncio.to_thread(wait_for, f"{victim['name']} restarted", back, 300)
                )
                for address, checker in checkers.items():  # errors during this round, by whom
                    new = checker.errors - before[address]
                    (victim_errors if address == victim["address"] else other_errors).update(new)
                await asyncio.sleep(3)
            for checker in checkers.values():
                checker.stop = True
            await asyncio.gather(*callers)

        asyncio.run(chaos())
        out, err = load.communicate(timeout=args.rounds * 30 + 120)
        bench: dict[str, Any] = {"error": err.strip()[-300:]}
        if out.strip().startswith("{"):
            bench = json.loads(out)
        steps = bench.get("steps", [{}])
        bench_errors = steps[0].get("errors", {}) if steps else {}
        return {
            "what": f"SIGKILL a worker mid-load (3 workers, {args.rounds} rounds)",
            "rounds": args.rounds,
            "restart_s": [round(s, 1) for s in restart_s],
            "checked": sum(c.checked for c in checkers.values()),
            "wrong": sum(c.wrong for c in checkers.values()),
            "victim_errors": dict(victim_errors),
            "other_errors": dict(other_errors),
            "bench_requests": steps[0].get("requests") if steps else None,
            "bench_errors": bench_errors,
            "bench_exit": load.returncode,
            "bench_failure": bench.get("error", ""),
            "peak_rss_mib": round(peak, 1),
        }
    finally:
        run.send_signal(signal.SIGINT)
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()


def start_worker(args: argparse.Namespace, *flags: str) -> subprocess.Popen[bytes]:
    worker = subprocess.Popen(
        cli("serve", "--model", "builtin:tiny", "--image-size", str(args.image_size),
            "--host", "127.0.0.1", "--port", str(args.port + 50), "--metrics-port", "0",
            "--threads", "2", *flags),
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    async def ready() -> None:
        async with InferenceClient(f"127.0.0.1:{args.port + 50}") as client:
            await client.wait_ready(within_s=600)

    asyncio.run(ready())
    if worker.poll() is not None:
        raise SystemExit(
            f"the worker exited with {worker.returncode}: is port {args.port + 50} taken?"
        )
    return worker


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()


def malformed(rng: random.Random, good: pb.ModelInferRequest) -> bytes:
    """A request broken in one to three ways: its fields, or its bytes."""
    if rng.random() < 0.3:  # corrupted bytes: flipped, cut, or random
        data = bytearray(good.SerializeToString())
        kind = rng.randrange(3)
        if kind == 0:  # in the fields and framing (a flipped pixel is still a valid frame)
            header = len(data) - len(good.raw_input_contents[0])
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(header)] = rng.randrange(256)
        elif kind == 1:
            data = data[: rng.randrange(len(data))]
        else:
            data = bytearray(rng.randbytes(rng.randint(1, 512)))
        return bytes(data)
    request = pb.ModelInferRequest()
    request.CopyFrom(good)
    tensor = request.inputs[0]
    sizes = [-7, -1, 0, 1, 3, 16, 2**31, 2**62]
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(9)
        if kind == 0:
            request.model_name = rng.choice(["", "tinyy", "x" * 300, "tiny\x00"])
        elif kind == 1:
            request.model_version = rng.choice(["2", "-1", "latest"])
        elif kind == 2:
            tensor.datatype = rng.choice(["FP32", "INT8", "BYTES", "", "uint8"])
        elif kind == 3:
            tensor.shape[:] = [rng.choice(sizes) for _ in range(rng.randrange(7))]
        elif kind == 4:
            pixels = good.raw_input_contents[0]
            del request.raw_input_contents[:]
            cut = pixels[: rng.randrange(len(pixels))] if rng.random() < 0.5 else pixels
            request.raw_input_contents.append(cut + rng.randbytes(rng.randint(cut == pixels, 3)))
        elif kind == 5:
            del request.raw_input_contents[:]
            values = [rng.choice([0, 255, 256, 2**32 - 1]) for _ in range(rng.randrange(64))]
            tensor.contents.uint_contents.extend(values)
        elif kind == 6:
            request.inputs.add(name=rng.choice(["frames", "other"]), datatype="UINT8", shape=[1])
        elif kind == 7:
            request.outputs.add(name=rng.choice(["probabilities", "", "logits "]))
        else:
            tensor.name = rng.choice(["", "images", "frames " * 10])
    return request.SerializeToString()


def fuzz(args: argparse.Namespace) -> dict[str, Any]:
    worker = start_worker(args)
    rng = random.Random(12)
    frame = np.zeros((1, args.image_size, args.image_size, 3), np.uint8)
    good = infer_request("tiny", frame)
    bodies = [malformed(rng, good) for _ in range(args.fuzz)]
    codes: Counter[str] = Counter()
    internal: Counter[str] = Counter()

    async def go() -> bool:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{args.port + 50}") as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                MODEL_INFER
            )  # bytes in, bytes out: nothing decodes them on this side
            queue = list(reversed(bodies))

            async def sender() -> None:
                while queue:
                    body = queue.pop()
                    try:
                        await call(body, timeout=30)
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1
                        if exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                            internal[(exc.details() or "")[:60]] += 1

            await asyncio.gather(*(sender() for _ in range(16)))
        async with InferenceClient(f"127.0.0.1:{args.port + 50}") as client:
            return (await client.infer("tiny", frame)).shape == (1, 1000)

    idle = peak_rss_mib(worker.pid)
    try:
        serves_on = asyncio.run(go())
        crashed = worker.poll() is not None
        peak = peak_rss_mib(worker.pid)
    finally:
        stop_worker(worker)
    return {
        "what": "malformed ModelInfer requests",
        "requests": args.fuzz,
        "codes": dict(codes),
        "internal_details": dict(internal),
        "crashes": int(crashed),
        "serves_on": serves_on,
        "peak_rss_mib_before": round(idle, 1),
        "peak_rss_mib": round(peak, 1),
    }


def overload(args: argparse.Namespace) -> dict[str, Any]:
    queue = 64
    worker = start_worker(args, "--max-queue-size", str(queue), "--max-concurrent-rpcs", "256")
    target = f"127.0.0.1:{args.port + 50}"

    def bench(concurrency: int, seconds: float) -> dict[str, Any]:
        done = subprocess.run(
            cli("bench", target, "--model", "tiny", "-c", str(concurrency), "--warmup", "1",
                "--duration", str(seconds), "--json", "--quiet", "--timeout", "30",
                "--connections", "4"),
            env=ENV, capture_output=True, text=True, timeout=seconds + 300, check=True,
        )  # fmt: skip
        step: dict[str, Any] = json.loads(done.stdout)["steps"][0]
        return step

    try:
        nominal = bench(queue // 8, 5)
        before = peak_rss_mib(worker.pid)
        heavy = bench(10 * queue, args.overload_s)
        after = peak_rss_mib(worker.pid)
        alive = worker.poll() is None
    finally:
        stop_worker(worker)
    return {
        "what": f"10x overload ({10 * queue} requests in flight, maxQueueSize {queue})",
        "nominal": {k: nominal.get(k) for k in ("requests", "errors", "frames_per_s")},
        "requests": heavy.get("requests", 0) + sum(heavy.get("errors", {}).values()),
        "ok": heavy.get("requests"),
        "errors": heavy.get("errors"),
        "frames_per_s": heavy.get("frames_per_s"),
        "alive": alive,
        "peak_rss_mib_before": round(before, 1),
        "peak_rss_mib": round(after, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fuzz", type=int, default=10_000)
    parser.add_argument("--overload-s", type=float, default=10.0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--port", type=int, default=23100)
    parser.add_argument("--parts", default="kill,fuzz,overload")
    parser.add_argument("--json-file", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="inferencefleet-chaos-") as tmp:
        for part in args.parts.split(","):
            started = time.monotonic()
            if part == "kill":
                result = kill_rounds(args, Path(tmp))
            elif part == "fuzz":
                result = fuzz(args)
            else:
                result = overload(args)
            result["seconds"] = round(time.monotonic() - started, 1)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json_file is not None:
        args.json_file.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
