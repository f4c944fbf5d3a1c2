"""A real `inferencefleet serve` process on 127.0.0.1, driven by our grpc.aio client."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from fleet_client.client import InferenceClient, infer_request
from fleet_proto import inference_pb2 as pb
from fleet_server.runner import ModelRunner
from fleet_spec.contract import HEALTH_SERVICE
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

pytestmark = pytest.mark.integration

Frames = Callable[..., npt.NDArray[np.uint8]]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        got = series[len(name) :].strip("{}")
        if ",".join(sorted(p for p in got.split(",") if p)) == want:
            return float(value)
    return 0.0


def test_many_concurrent_clients_each_get_their_own_answers(
    tiny_worker: Any, tiny_reference: ModelRunner, frames: Frames
) -> None:
    target = tiny_worker.target
    # 1 or 2 frames each: 8 clients hold at most 16 frames in flight, within the worker's
    # queue of 16, so however slowly the model runs nothing is turned away.
    inputs = {
        f"c{c}-r{r}": frames(1 + (c + r) % 2, seed=100 * c + r) for c in range(8) for r in range(6)
    }

    async def one_client(c: int) -> dict[str, npt.NDArray[np.float32]]:
        got = {}
        async with InferenceClient(target) as client:
            for r in range(6):
                key = f"c{c}-r{r}"
                reply = await client.infer_raw(infer_request("tiny", inputs[key], key))
                assert reply.id == key
                got[key] = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(
                    tuple(reply.outputs[0].shape)
                )
        return got

    async def go() -> dict[str, npt.NDArray[np.float32]]:
        results: dict[str, npt.NDArray[np.float32]] = {}
        for part in await asyncio.gather(*(one_client(c) for c in range(8))):
            results.update(part)
        return results

    results = asyncio.run(go())
    assert set(results) == set(inputs)
    for key, x in inputs.items():
        np.testing.assert_allclose(results[key], tiny_reference.infer([x]), rtol=1e-4, atol=1e-5)


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_bad_input_gets_a_clear_status_and_the_worker_serves_on(
    tiny_worker: Any, frames: Frames
) -> None:
    target = tiny_worker.target

    async def go() -> list[tuple[grpc.StatusCode, str]]:
        async with InferenceClient(target) as client:
            wrong_type = infer_request("tiny", frames(1, seed=0))
            wrong_type.inputs[0].datatype = "FP32"
            short = infer_request("tiny", frames(2, seed=0))
            short.raw_input_contents[0] = short.raw_input_contents[0][:100]
            answers = [
                await _code(client.infer("resnet50", frames(1, seed=0))),
                await _code(client.infer_raw(wrong_type)),
                await _code(client.infer_raw(short)),
                await _code(client.infer("tiny", frames(1, seed=0, size=16))),
                await _code(client.infer("tiny", frames(400, seed=0))),  # 1.2 MB > 1 MiB limit
                await _code(client.infer("tiny", frames(17, seed=0))),  # never fits the queue of 16
                await _code(client.infer("tiny", frames(1, seed=0))),
            ]
        return answers

    answers = asyncio.run(go())
    assert [code for code, _ in answers] == [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OK,
    ]
    messages = [message for _, message in answers]
    assert "unknown model 'resnet50'" in messages[0]
    assert "datatype 'FP32'" in messages[1]
    assert "100 bytes do not match shape [2, 32, 32, 3]" in messages[2]
    assert "does not match [-1, 32, 32, 3]" in messages[3]
    assert "larger than max" in messages[4]
    assert "can never fit the queue of maxQueueSize 16" in messages[5]
    assert not any("Traceback" in m or 'File "' in m for m in messages)


def test_stream_answers_every_request_by_id_and_survives_a_bad_one(
    tiny_worker: Any, tiny_reference: ModelRunner, frames: Frames
) -> None:
    target = tiny_worker.target
    # 12 frames in all: the whole stream fits the worker's queue (16) even if it arrives at once
    inputs = {f"s{i}": frames(1 + i % 2, seed=500 + i) for i in range(8)}

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for key, x in inputs.items():
            yield infer_request("tiny", x, key)
        bad = infer_request("tiny", frames(1, seed=0), "bad")
        bad.inputs[0].name = "images"
        yield bad

    async def go() -> dict[str, Any]:
        async with InferenceClient(target) as client:
            return {r.request_id: r async for r in client.stream(requests())}

    answers = asyncio.run(go())
    assert set(answers) == {*inputs, "bad"}
    assert "INVALID_ARGUMENT: unknown input 'images'" in answers["bad"].error
    for key, x in inputs.items():
        logits = answers[key].logits
        np.testing.assert_allclose(logits, tiny_reference.infer([x]), rtol=1e-4, atol=1e-5)


def test_metadata_health_reflection_and_metrics(tiny_worker: Any) -> None:
    worker = tiny_worker
    target = worker.target

    async def go() -> tuple[Any, ...]:
        async with InferenceClient(target) as client:
            await client.infer("tiny", np.zeros((3, 32, 32, 3), np.uint8))
            reflection = reflection_pb2_grpc.ServerReflectionStub(client._channels[0])

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            services = [
                s.name
                async for reply in reflection.ServerReflectionInfo(ask())
                for s in reply.list_services_response.service
            ]
            return (
                await client.health(),
                await client.health(HEALTH_SERVICE),
                await client.server_live(),
                await client.server_ready(),
                await client.model_ready("tiny"),
                await client.model_metadata("tiny"),
                await client.server_metadata(),
                services,
                await client.repository_index(ready=True),
            )

    health, health_service, live, ready, model_ready, meta, server, services, index = asyncio.run(
        go()
    )
    assert index == [("tiny", "READY")]
    assert (health, health_service, live, ready, model_ready) == (
        "SERVING",
        "SERVING",
        True,
        True,
        True,
    )
    assert meta.name == "tiny"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("frames", "UINT8", [-1, 32, 32, 3])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 1000])
    ]
    assert "statistics" in server.extensions
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(services)
    text = scrape(worker.metrics_port)
    assert sample(text, "inferencefleet_requests_total", model="tiny", code="OK") >= 1
    assert sample(text, "inferencefleet_frames_total", model="tiny") >= 3
    assert sample(text, "inferencefleet_batch_size_count", model="tiny") >= 1
    assert sample(text, "inferencefleet_model_load_seconds", model="tiny") > 0
    for name in (
        "inferencefleet_request_duration_seconds_bucket",
        "inferencefleet_queue_duration_seconds_sum",
        "inferencefleet_compute_duration_seconds_sum",
        "inferencefleet_queue_depth",
        "inferencefleet_inflight_requests",
    ):
        assert name in text


def test_not_serving_until_warm_and_sigterm_drains_in_flight_calls(
    start_worker: Callable[..., Any], frames: Frames
) -> None:
    # 224x224 frames and batch sizes up to 16 make the warm-up last a while
    worker = start_worker(
        "--model", "builtin:tiny", "--image-size", "224", "--max-batch-size", "16",
        "--max-queue-size", "512", "--grace-period-s", "120", wait=False,
    )  # fmt: skip
    target = worker.target
    x = frames(16, seed=1, size=224)

    async def go() -> tuple[str, list[tuple[grpc.StatusCode, str]], tuple[grpc.StatusCode, str]]:
        async with InferenceClient(target) as client:
            first = await client.health()
            await client.wait_ready(within_s=300)
            calls = [asyncio.create_task(_code(client.infer("tiny", x))) for _ in range(12)]
            stats = await client.model_statistics("tiny")
            while stats.model_stats[0].execution_count == 0:
                stats = await client.model_statistics("tiny")
            os.kill(worker.proc.pid, signal.SIGTERM)
            results = list(await asyncio.gather(*calls))
            after = await _code(client.infer("tiny", x))
        return first, results, after

    first, results, after = asyncio.run(go())
    assert first == "NOT_SERVING"
    assert [code for code, _ in results] == [grpc.StatusCode.OK] * 12
    assert after[0] is grpc.StatusCode.UNAVAILABLE
    assert worker.proc.wait(timeout=100) == 0
    assert any("shutting down" in line for line in worker.log)


def test_deregister_delay_serves_new_connections_while_not_serving(
    start_worker: Callable[..., Any], frames: Frames
) -> None:
    """With --deregister-delay-s, SIGTERM turns health NOT_SERVING at once, but a client that
    connects in that time (kube-proxy still routing here) is answered; then the drain refuses
    new calls and the process ends cleanly."""
    worker = start_worker(
        "--model", "builtin:tiny", "--deregister-delay-s", "4", "--grace-period-s", "5"
    )  # fmt: skip
    x = frames(2, seed=3)

    async def one_call() -> tuple[str, tuple[grpc.StatusCode, str]]:
        async with InferenceClient(worker.target) as client:  # a new connection each time
            return await client.health(), await _code(client.infer("tiny", x, deadline_s=5))

    os.kill(worker.proc.pid, signal.SIGTERM)
    worker.wait_for(re.compile(r"still serving for 4\.0s"), within_s=30)
    health, answered = asyncio.run(one_call())
    assert health == "NOT_SERVING"
    assert answered == (grpc.StatusCode.OK, "")
    assert not any("draining for up to" in line for line in worker.log)  # still in the delay
    worker.wait_for(re.compile(r"draining for up to"), within_s=30)
    assert worker.proc.wait(timeout=30) == 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(one_call())
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_batching_file_changes_apply_without_restart(
    start_worker: Callable[..., Any], tmp_path: Path
) -> None:
    path = tmp_path / "batching.yaml"
    path.write_text("maxBatchSize: 2\nmaxQueueSize: 9\n")
    worker = start_worker(
        "--model", "builtin:tiny", "--batching-config", str(path), "--watch-interval-s", "0.1"
    )
    target = worker.target

    async def go() -> tuple[int, int, int]:
        async with InferenceClient(target) as client:
            before = (await client.model_config("tiny")).max_batch_size
            gauge = sample(
                scrape(worker.metrics_port), "inferencefleet_max_batch_size", model="tiny"
            )
            assert gauge == 2
            path.write_text("maxBatchSize: 3\n")
            for _ in range(1200):  # the file is polled every 0.1 s; give up after ~60 s
                if (await client.model_config("tiny")).max_batch_size == 3:
                    break
                await asyncio.sleep(0.05)
            config = await client.model_config("tiny")
            return (
                before,
                config.max_batch_size,
                config.dynamic_batching.default_queue_policy.max_queue_size,
            )

    assert asyncio.run(go()) == (2, 3, 9)
    assert sample(scrape(worker.metrics_port), "inferencefleet_max_batch_size", model="tiny") == 3


def test_workers_share_one_port_and_stop_together(start_worker: Callable[..., Any]) -> None:
    worker = start_worker("--model", "builtin:tiny", "--workers", "2", wait=False)
    worker.wait_for(re.compile(r"worker\[1:\d+\] INFO SERVING"))
    worker.wait_for(re.compile(r"worker\[0:\d+\] INFO SERVING"))
    pids = {int(m) for m in re.findall(r"worker\[\d:(\d+)\] INFO SERVING", worker.text())}
    assert len(pids) == 2

    async def go() -> None:
        # several connections: SO_REUSEPORT spreads connections, not calls
        async with InferenceClient(worker.target, channels=8) as client:
            for i in range(40):
                await client.infer("tiny", np.zeros((1, 32, 32, 3), np.uint8), request_id=str(i))

    asyncio.run(go())
    text = scrape(worker.metrics_port)
    assert sample(text, "inferencefleet_requests_total", model="tiny", code="OK") == 40
    assert sample(text, "inferencefleet_model_load_seconds", model="tiny") > 0
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=100) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _torchscript_tiny(path: Path) -> None:
    import warnings

    import torch
    from fleet_server.models import TinyNet

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream
        torch.jit.save(torch.jit.script(TinyNet().eval()), str(path))


def test_a_torchscript_file_is_served_under_its_stem(
    start_worker: Callable[..., Any], tmp_path: Path, tiny_reference: ModelRunner, frames: Frames
) -> None:
    path = tmp_path / "detector.pt"
    _torchscript_tiny(path)
    worker = start_worker("--model", str(path))
    x = frames(3, seed=42)

    async def go() -> npt.NDArray[np.float32]:
        async with InferenceClient(worker.target) as client:
            assert await client.model_ready("detector")
            return await client.infer("detector", x)

    np.testing.assert_allclose(asyncio.run(go()), tiny_reference.infer([x]), rtol=1e-4, atol=1e-4)
