"""The worker under faults, with real `serve` processes: a drain that answers every admitted
stream request, a bounded stream window, a cap on open calls, NOT_SERVING while forward passes
keep failing, IPv6 and IPv4 on one port, and workers that die with their supervisor."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from fleet_client.client import InferenceClient, infer_request
from fleet_proto import inference_pb2_grpc as pb_grpc
from fleet_server.batcher import FAILURES_UNHEALTHY
from fleet_server.serve import HEALTH_DIR_ENV
from fleet_server.servicer import STREAM_WINDOW
from fleet_spec.contract import HEALTH_SERVICE
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

DEADLINE_S = 300.0  # a loaded 2-core machine takes minutes to import torch twice
HTTP2_BUFFERED_ANSWERS = 2048  # 8 MiB of 4 KB answers: more than gRPC's flow control buffers


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def requests_total(metrics_port: int) -> float:
    """inferencefleet_requests_total over every status code."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "inferencefleet_requests_total"
    )


def stub(channel: grpc.aio.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def frame_requests(count: int, size: int = 32, value: int | None = None) -> list[Any]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        frames = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        if value is not None:
            frames[:] = value
        out.append(infer_request("tiny", frames, request_id=str(i)))
    return out


def test_sigterm_answers_every_admitted_stream_request_and_ends_the_stream_ok(
    start_worker: Callable[..., Any],
) -> None:
    worker = start_worker("--model", "builtin:tiny", "--grace-period-s", "60")
    count = STREAM_WINDOW - 4  # all admitted at once, none held back by the window
    requests = frame_requests(count)

    async def go() -> tuple[list[str], grpc.StatusCode]:
        async with grpc.aio.insecure_channel(worker.target) as channel:
            call = stub(channel).ModelStreamInfer()
            for request in requests:
                await call.write(request)
            # every answer computed and waiting to be written: the client has read none yet
            await asyncio.to_thread(
                wait_for,
                "every request computed",
                lambda: requests_total(worker.metrics_port) >= count,
            )
            os.kill(worker.proc.pid, signal.SIGTERM)
            ids = []
            async for reply in call:
                assert not reply.error_message, reply.error_message
                ids.append(reply.infer_response.id)
            return ids, await call.code()

    ids, code = asyncio.run(go())
    assert sorted(ids, key=int) == [str(i) for i in range(count)]
    assert code is grpc.StatusCode.OK  # ended by the worker after its last answer, not cut off
    assert worker.proc.wait(timeout=100) == 0


def test_a_stream_that_is_never_read_holds_at_most_its_window(
    start_worker: Callable[..., Any],
) -> None:
    worker = start_worker("--model", "builtin:tiny")
    sent = 5000  # 15 MB of frames, 20 MB of answers
    requests = frame_requests(sent)

    async def go() -> tuple[float, float, int]:
        async with grpc.aio.insecure_channel(worker.target) as channel:
            call = stub(channel).ModelStreamInfer()

            async def send() -> None:
                for request in requests:
                    await call.write(request)
                await call.done_writing()

            sender = asyncio.create_task(send())
            await asyncio.to_thread(
                wait_for,
                "the window to fill",
                lambda: requests_total(worker.metrics_port) >= STREAM_WINDOW,
            )
            # the only timed part: give a worker that ignored the window a chance to read on
            await asyncio.sleep(2.0)
            held = requests_total(worker.metrics_port)
            answers = 0
            async for _ in call:  # now read: everything flows again
                answers += 1
            await sender
            return held, requests_total(worker.metrics_port), answers

    held, total, answers = asyncio.run(go())
    # Admitted and unanswered: STREAM_WINDOW at most. Answered but unread: what HTTP/2 flow
    # control lets gRPC buffer (measured here: about 1,040 answers of 4 KB). Not all 5,000.
    assert held <= STREAM_WINDOW + HTTP2_BUFFERED_ANSWERS
    assert total == answers == sent


def test_calls_past_max_concurrent_rpcs_are_resource_exhausted(
    start_worker: Callable[..., Any],
) -> None:
    worker = start_worker("--model", "builtin:tiny", "--max-concurrent-rpcs", "2")
    request = frame_requests(1)[0]

    async def go() -> tuple[grpc.StatusCode, str, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(worker.target) as channel:
            streams = [stub(channel).ModelStreamInfer() for _ in range(2)]
            for call in streams:  # an answer proves the worker counts this stream as open
                await call.write(request)
                await call.read()
            try:
                await stub(channel).ModelInfer(request, timeout=30)
                refused, message = grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as exc:
                refused, message = exc.code(), exc.details() or ""
            for call in streams:
                await call.done_writing()
                await call.code()
            await stub(channel).ModelInfer(request, timeout=30)
            return refused, message, grpc.StatusCode.OK

    refused, message, after = asyncio.run(go())
    assert refused is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-concurrent-rpcs 2" in message
    assert after is grpc.StatusCode.OK


class Picky(torch.nn.Module):
    """Fails on bright frames (as a device in a sticky error state fails on every batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.min() > 2.0):
            raise RuntimeError("device error")
        return x.mean(dim=(2, 3))


def test_health_is_not_serving_while_forward_passes_keep_failing(
    start_worker: Callable[..., Any], tmp_path: Path
) -> None:
    path = tmp_path / "picky.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream
        torch.jit.save(torch.jit.script(Picky()), str(path))
    worker = start_worker("--model", str(path))
    bright = frame_requests(1, value=255)[0]
    bright.model_name = "picky"
    dark = frame_requests(1, value=0)[0]
    dark.model_name = "picky"

    async def health(client: InferenceClient) -> tuple[str, str]:
        return await client.health(), await client.health(HEALTH_SERVICE)

    async def wait_health(client: InferenceClient, want: str) -> tuple[str, str]:
        for _ in range(600):
            got = await health(client)
            if got == (want, want):
                return got
            await asyncio.sleep(0.1)
        return await health(client)

    async def go() -> list[tuple[str, str]]:
        async with InferenceClient(worker.target) as client:
            seen = [await health(client)]
            for _ in range(FAILURES_UNHEALTHY):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await client.stub.ModelInfer(bright, timeout=30)
                assert failed.value.code() is grpc.StatusCode.INTERNAL
            seen.append(await wait_health(client, "NOT_SERVING"))
            assert not await client.server_ready()
            await client.stub.ModelInfer(dark, timeout=30)  # the device works again
            seen.append(await wait_health(client, "SERVING"))
            return seen

    assert asyncio.run(go()) == [
        ("SERVING", "SERVING"),
        ("NOT_SERVING", "NOT_SERVING"),
        ("SERVING", "SERVING"),
    ]


def test_listens_on_ipv6_and_ipv4_by_default(start_worker: Callable[..., Any]) -> None:
    worker = start_worker("--model", "builtin:tiny", "--host", "::")

    async def ready(target: str) -> bool:
        async with InferenceClient(target) as client:
            return await client.server_ready()

    assert asyncio.run(ready(f"[::1]:{worker.port}"))
    assert asyncio.run(ready(f"127.0.0.1:{worker.port}"))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_workers_stop_when_their_supervisor_is_killed_while_they_load(
    start_worker: Callable[..., Any],
) -> None:
    supervisor = start_worker("--model", "builtin:tiny", "--workers", "2", wait=False)
    pid = supervisor.proc.pid
    wait_for("two workers", lambda: len(_children(pid)) == 2)
    children = _children(pid)
    supervisor.proc.kill()  # while they still import torch
    supervisor.proc.wait()
    try:
        wait_for("the workers to stop", lambda: not any(_alive(c) for c in children))
    finally:
        for child in children:
            if _alive(child):
                os.kill(child, signal.SIGKILL)


def test_processes_behind_one_port_answer_probes_for_all(
    start_worker: Callable[..., Any],
) -> None:
    supervisor = start_worker("--model", "builtin:tiny", "--workers", "2", wait=False)
    target = f"127.0.0.1:{supervisor.port}"

    async def probes() -> set[str]:
        """What 8 connections (landing on either process) hear."""
        answers = set()
        for _ in range(8):
            async with InferenceClient(target) as client:
                try:
                    answers.add(await client.health(HEALTH_SERVICE))
                except grpc.aio.AioRpcError as exc:  # not listening yet
                    answers.add(exc.code().name)
        return answers

    wait_for("both processes serving", lambda: asyncio.run(probes()) == {"SERVING"})
    child = _children(supervisor.proc.pid)[0]
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{child}/environ").read_text().split("\0")
        if "=" in item
    )
    verdict = Path(environ[HEALTH_DIR_ENV]) / "1"
    verdict.write_text("NOT_SERVING")  # as process 1 says when its forward passes keep failing
    wait_for("every probe to hear it", lambda: asyncio.run(probes()) == {"NOT_SERVING"})
    verdict.write_text("SERVING")
    wait_for("serving again", lambda: asyncio.run(probes()) == {"SERVING"})
